"""The ClientApp's side of FedProx and SCAFFOLD: read what the strategy asked for, keep ``c_i``.

A train message asks for FedProx with ``config["prox-mu"] > 0`` and for SCAFFOLD with an
extra ArrayRecord ``"scaffold-c"`` (the server control ``c``). The client's own control
variate ``c_i`` lives in its node state (``context.state["scaffold-ci"]``; a cohort worker
keeps one per client, simulations/cohort.py), starts at zero and is updated by
:func:`fedpeft.drift.scaffold_client_update`; the reply carries ``delta c_i`` in an extra
ArrayRecord ``"scaffold-delta-c"``, which the byte ledger counts like the delta.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.app import Context, RecordDict

from fedpeft.drift import (
    PROX_MU_KEY,
    SCAFFOLD_C_KEY,
    SCAFFOLD_CI_STATE,
    SCAFFOLD_DELTA_C_KEY,
    DriftCorrection,
    control_difference,
    scaffold_client_update,
    zeros_like,
)
from fedpeft.records import record_to_state, state_to_record
from fedpeft.state import State

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaffoldRound:
    """One SCAFFOLD round of one client: the server's ``c`` and the client's ``c_i`` it started with."""

    c: State
    c_i: State

    def finish(self, context: Context, delta: State, *, num_steps: int, lr: float) -> State:
        """Store ``c_i+`` in the node state and return ``delta c_i`` for the reply."""
        new_c_i, delta_c = scaffold_client_update(self.c_i, self.c, delta, num_steps=num_steps, lr=lr)
        context.state[SCAFFOLD_CI_STATE] = state_to_record(new_c_i)
        return delta_c


def drift_terms(content: RecordDict, context: Context) -> tuple[DriftCorrection | None, ScaffoldRound | None]:
    """The gradient correction a train message asks for, and SCAFFOLD's round (None when off)."""
    mu = float(content["config"].get(PROX_MU_KEY, 0.0))
    scaffold = None
    if SCAFFOLD_C_KEY in content.array_records:
        c = record_to_state(content.array_records[SCAFFOLD_C_KEY])
        c_i = zeros_like(c)
        if SCAFFOLD_CI_STATE in context.state.array_records:
            stored = record_to_state(context.state.array_records[SCAFFOLD_CI_STATE])
            if {k: v.shape for k, v in stored.items()} == {k: v.shape for k, v in c.items()}:
                c_i = stored
            else:  # another adapter shape (a new run on a reused node): start again from zero
                log.warning("stored SCAFFOLD c_i does not fit the server's c; starting from zero")
        scaffold = ScaffoldRound(c=c, c_i=c_i)
    if mu <= 0 and scaffold is None:
        return None, None
    control = control_difference(scaffold.c, scaffold.c_i) if scaffold is not None else None
    return DriftCorrection(prox_mu=max(mu, 0.0), control=control), scaffold


def add_scaffold_reply(reply: RecordDict, delta_c: State) -> RecordDict:
    """The train reply with ``delta c_i`` as its extra ArrayRecord."""
    reply[SCAFFOLD_DELTA_C_KEY] = state_to_record(delta_c)
    return reply
