"""LoRA factors of unequal rank: zero padding (HetLoRA) and SVD redistribution (FlexLoRA).

Numpy only. peft names a LoRA pair ``<module>.lora_A.<adapter>.weight`` (shape ``r x in``)
and ``<module>.lora_B.<adapter>.weight`` (``out x r``); the adapted weight is
``W + s B A`` with one scaling ``s`` for every client (see ``fedpeft.adapters``), so
``B A`` is comparable across ranks. Rank slice ``j`` is row ``j`` of A and column ``j``
of B. Every other tensor (the head) has one shape for all clients.

HetLoRA-style zero padding (Cho et al. 2024): a rank-r client's factors are the first r
slices of the server's rank-R factors; the server averages slice ``j`` over the clients
whose rank exceeds ``j`` only, with their aggregation weights renormalised over them:

    d_j = sum_{k: r_k > j} c_k^{(j)} d_{k,j},   c^{(j)} = coefficients(w restricted to r_k > j).

FlexLoRA (Bai et al. 2024, Eq. 3-4): the server averages the clients' full products
``G = sum_k c_k B_k A_k`` per adapted matrix and sends client k the truncated SVD of G at
rank r_k, split symmetrically: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``. A rank-r
truncation is the first r slices of the rank-R truncation, so the server keeps rank-R
factors and slices them like zero padding does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

import numpy as np

State = dict[str, np.ndarray]
Coefficients = Callable[[list[float]], list[float]]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight$")


def lora_factor(name: str) -> str | None:
    """``"A"`` or ``"B"`` if ``name`` is a peft LoRA factor, else ``None``."""
    match = _LORA_KEY.match(name)
    return match.group("factor") if match else None


def lora_pairs(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{module: (A key, B key)}`` for every LoRA pair in ``names``; an unpaired factor raises."""
    found: dict[str, dict[str, str]] = {}
    for name in names:
        match = _LORA_KEY.match(name)
        if match:
            key = f"{match.group('module')}.{match.group('adapter')}"
            found.setdefault(key, {})[match.group("factor")] = name
    unpaired = [k for k, v in found.items() if len(v) != 2]
    if unpaired:
        raise ValueError(f"LoRA factors without their partner (A and B must both be present): {unpaired[:3]}")
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def state_rank(state: State) -> int:
    """The LoRA rank of a state's factors (all must agree); 0 if it has none."""
    ranks = {arr.shape[0] if lora_factor(k) == "A" else arr.shape[1] for k, arr in state.items() if lora_factor(k)}
    if len(ranks) > 1:
        raise ValueError(f"LoRA factors of different ranks {sorted(ranks)} in one state")
    return ranks.pop() if ranks else 0


def slice_rank(state: State, rank: int) -> State:
    """The first ``rank`` slices of every factor (a client's share); other tensors as they are."""
    if rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    out: State = {}
    for name, arr in state.items():
        factor = lora_factor(name)
        have = arr.shape[0] if factor == "A" else arr.shape[1] if factor == "B" else rank
        if rank > have:
            raise ValueError(f"cannot slice rank {rank} from {name!r} of rank {have}")
        sliced = arr[:rank] if factor == "A" else arr[:, :rank] if factor == "B" else arr
        out[name] = np.ascontiguousarray(sliced)
    return out


def pad_rank(state: State, rank: int) -> State:
    """Embed every factor in ``rank`` slices, zeros beyond its own rank; other tensors as they are."""
    out: State = {}
    for name, arr in state.items():
        factor = lora_factor(name)
        if factor == "A":
            padded = np.zeros((rank, arr.shape[1]), arr.dtype)
            padded[: arr.shape[0]] = arr
        elif factor == "B":
            padded = np.zeros((arr.shape[0], rank), arr.dtype)
            padded[:, : arr.shape[1]] = arr
        else:
            padded = arr
        if factor and padded.size < arr.size:
            raise ValueError(f"cannot pad {name!r} of shape {arr.shape} to rank {rank}")
        out[name] = padded
    return out


def normalised(weights: list[float]) -> list[float]:
    """``w_i / sum w`` (FedAvg's coefficients)."""
    total = float(np.sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}; they must be positive")
    return [float(w) / total for w in weights]


def zero_pad_average(
    deltas: list[State], weights: list[float], max_rank: int, coefficients: Coefficients = normalised
) -> State:
    """Per-rank-slice weighted sum of unequal-rank deltas, at ``max_rank`` (HetLoRA).

    Slice ``j`` of the result sums over the clients whose rank exceeds ``j``, with
    ``coefficients`` of their weights only; a slice no client has stays zero. Tensors
    other than LoRA factors use ``coefficients`` of all weights.
    """
    if not deltas or len(deltas) != len(weights):
        raise ValueError("need one weight per delta and at least one delta")
    ranks = [state_rank(d) for d in deltas]
    table = slice_coefficients(ranks, weights, max_rank, coefficients)
    padded = [pad_rank(d, max_rank) for d in deltas]
    all_coefs = coefficients(list(weights))
    out: State = {}
    for name in deltas[0]:
        factor = lora_factor(name)
        if factor is None:
            out[name] = _weighted_sum([p[name] for p in padded], all_coefs)
            continue
        total = np.zeros(padded[0][name].shape, np.float64)
        for k, p in enumerate(padded):
            # A: slice j is row j; B: slice j is column j.
            scale = table[:, k][:, None] if factor == "A" else table[:, k][None, :]
            total += scale * p[name].astype(np.float64)
        out[name] = total.astype(np.float32)
    return out


def slice_coefficients(
    ranks: list[int], weights: list[float], max_rank: int, coefficients: Coefficients = normalised
) -> np.ndarray:
    """``(max_rank, clients)`` table: entry ``[j, k]`` is client k's coefficient for rank slice j.

    Zero where ``r_k <= j``; a row no client covers is all zero.
    """
    table = np.zeros((max_rank, len(ranks)))
    for j in range(max_rank):
        members = [k for k, r in enumerate(ranks) if r > j]
        if members:
            table[j, members] = coefficients([weights[k] for k in members])
    return table


def _weighted_sum(arrays: list[np.ndarray], coefs: list[float]) -> np.ndarray:
    return sum(np.float64(c) * a.astype(np.float64) for a, c in zip(arrays, coefs, strict=True)).astype(np.float32)


def split_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B, A, s)``: the rank-``rank`` truncated SVD of ``matrix`` as ``B = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) V_r^T``, and all singular values ``s`` (descending).

    ``B @ A`` is the best rank-``rank`` approximation of ``matrix`` in Frobenius and
    spectral norm (Eckart-Young). Ranks beyond ``min(matrix.shape)`` get zero slices.
    """
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    keep = min(rank, s.size)
    root = np.sqrt(s[:keep])
    b = np.zeros((matrix.shape[0], rank))
    a = np.zeros((rank, matrix.shape[1]))
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vt[:keep]
    return b.astype(np.float32), a.astype(np.float32), s


def split_svd_of_product(left: np.ndarray, right: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`split_svd` of ``left @ right`` without forming it (``left``: out x S, ``right``: S x in).

    ``left @ right`` has rank <= S (S: the sum of the clients' ranks). With the reduced QRs
    ``left = Q_l R_l`` and ``right^T = Q_r R_r``, ``left @ right = Q_l (R_l R_r^T) Q_r^T``,
    so the SVD ``U_s S V_s^T`` of the small S x S core gives G's: ``U = Q_l U_s``,
    ``V = Q_r V_s``, in O((out + in) S^2 + S^3) instead of O(out in min(out, in)). The split
    is :func:`split_svd`'s (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``). When
    ``S >= min(out, in)`` the product is formed and :func:`split_svd` runs on it (the dense
    SVD is then no larger than the core's). Returns ``min(S, out, in)`` singular values;
    G's others are zero.
    """
    if left.shape[1] >= min(left.shape[0], right.shape[1]):
        return split_svd(left.astype(np.float64) @ right.astype(np.float64), rank)
    q_l, r_l = np.linalg.qr(left.astype(np.float64))
    q_r, r_r = np.linalg.qr(right.T.astype(np.float64))
    u, s, vt = np.linalg.svd(r_l @ r_r.T)
    keep = min(rank, s.size)
    root = np.sqrt(s[:keep])
    b = np.zeros((left.shape[0], rank))
    a = np.zeros((rank, right.shape[1]))
    b[:, :keep] = (q_l @ u[:, :keep]) * root
    a[:keep] = root[:, None] * (vt[:keep] @ q_r.T)
    return b.astype(np.float32), a.astype(np.float32), s


def flex_average(
    current: State,
    deltas: list[State],
    weights: list[float],
    max_rank: int,
    *,
    server_lr: float = 1.0,
    coefficients: Coefficients = normalised,
) -> tuple[State, dict[str, float]]:
    """FlexLoRA's new rank-``max_rank`` global state, and its SVD cost.

    Client k trained from ``slice_rank(current, r_k)`` and sent ``deltas[k]``; its full
    update is ``P_k = B_k A_k`` with its new factors. Per adapted matrix
    ``G = G_old + server_lr (sum_k c_k P_k - G_old)`` with ``G_old = B A`` of ``current``
    (``server_lr = 1``: the paper's plain average of products), then the rank-``max_rank``
    truncated SVD of G, computed from the stacked factors (:func:`split_svd_of_product`).
    Other tensors: ``current + server_lr sum_k c_k delta_k``.

    Returns
    -------
    (state, stats)
        ``stats``: ``flex-svd-seconds`` (wall time of the SVDs), ``flex-svd-matrices``, and
        ``flex-energy-kept`` (sum of kept s^2 / sum of all s^2, over all matrices).
    """
    if not deltas or len(deltas) != len(weights):
        raise ValueError("need one weight per delta and at least one delta")
    coefs = coefficients(list(weights))
    pairs = lora_pairs(list(current))
    out: State = {}
    svd_s, kept, energy = 0.0, 0.0, 0.0
    for a_key, b_key in pairs.values():
        lefts, rights = [], []
        for c, d in zip(coefs, deltas, strict=True):
            r = d[a_key].shape[0]
            lefts.append(server_lr * c * (current[b_key][:, :r].astype(np.float64) + d[b_key]))
            rights.append(current[a_key][:r].astype(np.float64) + d[a_key])
        if server_lr != 1.0:
            lefts.append((1.0 - server_lr) * current[b_key].astype(np.float64))
            rights.append(current[a_key].astype(np.float64))
        tic = time.perf_counter()
        b, a, s = split_svd_of_product(np.hstack(lefts), np.vstack(rights), max_rank)
        svd_s += time.perf_counter() - tic
        out[a_key], out[b_key] = a, b
        kept += float(np.sum(s[:max_rank] ** 2))
        energy += float(np.sum(s**2))
    factor_keys = {k for pair in pairs.values() for k in pair}
    for name in current:
        if name not in factor_keys:
            step = _weighted_sum([d[name] for d in deltas], coefs)
            out[name] = (current[name] + np.float32(server_lr) * step).astype(np.float32)
    stats = {
        "flex-svd-seconds": svd_s,
        "flex-svd-matrices": float(len(pairs)),
        "flex-energy-kept": kept / energy if energy > 0 else 1.0,
    }
    return {k: out[k] for k in current}, stats


def factor_bytes(state: State) -> int:
    """fp32 bytes of a state's arrays (what an fp32 message of it carries as payload)."""
    return sum(int(arr.size) * 4 for arr in state.values())
