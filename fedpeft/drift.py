"""Client-drift corrections of the local update: FedProx's proximal term and SCAFFOLD's control variates.

Both change each local gradient before the optimizer step, over the trainable PEFT
tensors only (the frozen backbone never moves, so it has no drift to correct):

- FedProx (Li et al., MLSys 2020, eq. 2): the client minimises
  ``F_i(w) + mu/2 ||w - w_global||^2``, whose gradient adds ``mu (w - w_global)``.
- SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1 line 10): the corrected gradient is
  ``g - c_i + c``. After ``K`` local SGD steps of size ``eta_l`` the client's control
  variate becomes (option II, line 12)
  ``c_i+ = c_i - c + (x - y_i) / (K eta_l) = c_i - c - delta_i / (K eta_l)``
  and it sends ``delta c_i = c_i+ - c_i`` beside its model delta.

The strategy decides (it puts ``prox-mu`` in the train message's config and SCAFFOLD's
server control ``c`` in an extra ArrayRecord); the client applies. The numpy math here is
torch-free; :func:`gradient_hook` imports torch when it is called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedpeft.state import State

#: train-config key: FedProx's mu (absent or 0 = no proximal term)
PROX_MU_KEY = "prox-mu"
#: train-message ArrayRecord: SCAFFOLD's server control variate c
SCAFFOLD_C_KEY = "scaffold-c"
#: train-reply ArrayRecord: the client's control-variate change delta c_i
SCAFFOLD_DELTA_C_KEY = "scaffold-delta-c"
#: node-state ArrayRecord: the client's own control variate c_i (kept across rounds)
SCAFFOLD_CI_STATE = "scaffold-ci"


@dataclass(frozen=True)
class DriftCorrection:
    """What the local update adds to every gradient.

    Attributes
    ----------
    prox_mu : float
        FedProx's ``mu``; 0 adds nothing.
    control : dict of str to ndarray, optional
        SCAFFOLD's ``c - c_i`` per trainable tensor; None adds nothing.
    """

    prox_mu: float = 0.0
    control: State | None = None

    @property
    def active(self) -> bool:
        """Whether any term changes the gradient."""
        return self.prox_mu > 0 or self.control is not None


def scaffold_client_update(c_i: State, c: State, delta: State, *, num_steps: int, lr: float) -> tuple[State, State]:
    """SCAFFOLD option II: ``(c_i+, delta c_i)`` after ``num_steps`` SGD steps of size ``lr``.

    ``c_i+ = c_i - c - delta / (K lr)`` with ``delta = y_i - x`` (the model delta the client
    sends); computed in float64, returned as float32.
    """
    if num_steps < 1 or lr <= 0:
        raise ValueError(f"SCAFFOLD needs num_steps >= 1 and lr > 0, got {num_steps} and {lr}")
    scale = 1.0 / (num_steps * lr)
    new_c_i, delta_c = {}, {}
    for name in delta:
        old = c_i[name].astype(np.float64)
        new = old - c[name].astype(np.float64) - scale * delta[name].astype(np.float64)
        new_c_i[name] = new.astype(np.float32)
        delta_c[name] = (new - old).astype(np.float32)
    return new_c_i, delta_c


def zeros_like(state: State) -> State:
    """A float32 zero per tensor of ``state`` (every control variate starts at 0)."""
    return {k: np.zeros(v.shape, dtype=np.float32) for k, v in state.items()}


def control_difference(c: State, c_i: State) -> State:
    """``c - c_i`` per tensor: SCAFFOLD's gradient correction."""
    return {k: (c[k].astype(np.float64) - c_i[k].astype(np.float64)).astype(np.float32) for k in c}


def gradient_hook(params: dict, anchor: State, correction: DriftCorrection) -> Callable[[], None] | None:
    """A function that adds the correction's terms to ``params``' gradients; None when inactive.

    Parameters
    ----------
    params : dict of str to torch.nn.Parameter
        The trainable tensors, named as in the adapter state.
    anchor : dict of str to ndarray
        ``w_global``, the state the round started from (FedProx's centre).
    correction : DriftCorrection
        The terms to add.

    Call the returned function after ``loss.backward()`` and before ``optimizer.step()``.
    A tensor that got no gradient this step (unused) gets the correction alone, as the
    gradient of the corrected objective would be.
    """
    if not correction.active:
        return None
    import torch

    def on_device(state: State) -> dict:
        return {n: torch.as_tensor(state[n]).to(p.device, p.dtype) for n, p in params.items()}

    centre = on_device(anchor) if correction.prox_mu > 0 else None
    control = on_device(correction.control) if correction.control is not None else None
    mu = float(correction.prox_mu)

    @torch.no_grad()
    def add_terms() -> None:
        for name, p in params.items():
            term = torch.zeros_like(p) if p.grad is None else p.grad
            if centre is not None:
                term.add_(p.detach() - centre[name], alpha=mu)  # d/dw mu/2 ||w - w_global||^2
            if control is not None:
                term.add_(control[name])  # g - c_i + c
            p.grad = term

    return add_terms
