"""The server's half of FedProx and SCAFFOLD: what the train message asks, what the reply must carry.

The strategy decides, the client applies (fedpeft/drift.py, simulations/drift_client.py):

- FedProx (Li et al., MLSys 2020): ``prox-mu`` goes into every train message's config; the
  client adds ``mu (w - w_global)`` to each gradient. Nothing else changes on the server.
- SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1 option II): the server keeps the
  control variate ``c`` (zero at the start, checkpointed), sends it with every train message
  (ArrayRecord ``"scaffold-c"``, the adapter's shapes: the downlink doubles) and expects
  ``delta c_i`` back (ArrayRecord ``"scaffold-delta-c"``: the uplink doubles); a reply
  without a valid one is rejected like a bad delta. After aggregating the model deltas as
  usual (line 16's ``x <- x + eta_g mean(delta y_i)`` is the strategy's aggregator and server
  step), ``c <- c + (1/N) sum_{i in S} delta c_i`` (line 17), ``N`` all clients.

Both are plain settings of one :class:`ClientDrift` part; with neither on it adds nothing to
any message (default runs keep their bytes). Numpy and flwr only.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, Message

from fedpeft.drift import PROX_MU_KEY, SCAFFOLD_C_KEY, SCAFFOLD_DELTA_C_KEY
from fedpeft.records import record_to_state, state_to_record
from fedpeft.state import DeltaError, State, check_state

log = logging.getLogger(__name__)

#: checkpoint array prefix of SCAFFOLD's server control variate
C_PREFIX = "scaffold-c/"


class ClientDrift:
    """FedProx's ``mu`` and SCAFFOLD's server control variate (see the module docstring).

    Parameters
    ----------
    prox_mu : float
        FedProx's ``mu`` sent to every client; 0 sends nothing.
    scaffold : bool
        Run SCAFFOLD's control variates.
    num_clients : int
        ``N``, the total client count (SCAFFOLD's ``c`` update divides by it).
    """

    def __init__(self, *, prox_mu: float = 0.0, scaffold: bool = False, num_clients: int = 1) -> None:
        if prox_mu < 0:
            raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.prox_mu = float(prox_mu)
        self.scaffold = bool(scaffold)
        self.num_clients = num_clients
        self.c: State | None = None  # SCAFFOLD's c; zeros of the adapter's shapes at the first round

    @property
    def active(self) -> bool:
        """Whether the part changes any message."""
        return self.prox_mu > 0 or self.scaffold

    def describe(self) -> str:
        """A short description for the strategy's summary line."""
        parts = [f"FedProx mu={self.prox_mu:g}"] if self.prox_mu > 0 else []
        parts += ["SCAFFOLD control variates"] if self.scaffold else []
        return ", ".join(parts) or "plain local steps"

    def train_config(self) -> dict[str, float]:
        """Entries for the train message's config (``prox-mu`` when FedProx is on)."""
        return {PROX_MU_KEY: self.prox_mu} if self.prox_mu > 0 else {}

    def train_arrays(self, current: State) -> dict[str, ArrayRecord]:
        """Extra downlink ArrayRecords: SCAFFOLD's ``c`` (zeros shaped like ``current`` at first)."""
        if not self.scaffold:
            return {}
        if self.c is None:
            self.c = {k: np.zeros(v.shape, dtype=np.float32) for k, v in current.items()}
        return {SCAFFOLD_C_KEY: state_to_record(self.c)}

    def parse_reply(self, msg: Message, shapes: dict[str, tuple[int, ...]]) -> State | None:
        """SCAFFOLD's ``delta c_i`` of a reply (None when SCAFFOLD is off); raises DeltaError when invalid."""
        if not self.scaffold:
            return None
        if SCAFFOLD_DELTA_C_KEY not in msg.content.array_records:
            raise DeltaError(f"SCAFFOLD reply has no {SCAFFOLD_DELTA_C_KEY!r} ArrayRecord (the client's delta c_i)")
        delta_c = record_to_state(msg.content.array_records[SCAFFOLD_DELTA_C_KEY])
        check_state(delta_c, shapes, what="SCAFFOLD delta c_i")
        return delta_c

    def after_round(self, delta_cs: list[State]) -> dict[str, float]:
        """``c <- c + (1/N) sum_i delta c_i`` over the aggregated clients; report fields."""
        if not self.scaffold or self.c is None:
            return {}
        for name in self.c:
            total = np.zeros(self.c[name].shape, dtype=np.float64)
            for delta_c in delta_cs:  # accepted replies come sorted by partition: a fixed order
                total += delta_c[name].astype(np.float64)
            self.c[name] = (self.c[name].astype(np.float64) + total / self.num_clients).astype(np.float32)
        norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in self.c.values())))
        return {"scaffold_c_norm": norm}

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """SCAFFOLD's ``c`` as named arrays (the clients' ``c_i`` live on the clients)."""
        if self.c is None:
            return {}, {}
        return {"scaffold": True}, {f"{C_PREFIX}{k}": v for k, v in self.c.items()}

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Undo :meth:`checkpoint_state`."""
        c = {
            k.removeprefix(C_PREFIX): np.array(v, dtype=np.float32) for k, v in arrays.items() if k.startswith(C_PREFIX)
        }
        self.c = c or None
