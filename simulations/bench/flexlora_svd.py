"""FlexLoRA's server cost per round: the dense SVD of the averaged update vs the low-rank route.

    python -m simulations.bench.flexlora_svd [--clients 10] [--ranks 2,4,8] [--repeats 3]

MiniLM's shapes with the default targets (``query,key,value,dense``): in each of 6 layers
query, key, value and attention.output.dense (384 x 384), intermediate.dense (1536 x 384)
and output.dense (384 x 1536), plus the pooler's dense (384 x 384): 37 matrices. Client k
has rank ``ranks[k % len(ranks)]``; the server's rank is the largest. Per round and route:

- dense (the route before): form every client's ``B_k A_k``, average them into the
  ``out x in`` matrix G, take its truncated SVD (strategies/lora_hetero.py ``split_svd``);
- low rank (``flex_average`` now): QR the stacked factors, SVD the small R x R core
  (R = sum of the ranks), map back (``split_svd_of_product``).

BLAS runs with its default threads (set ``OPENBLAS_NUM_THREADS`` to compare). Prints the
median and minimum seconds per round of each route and their ratios (the machine is
shared: the minima are the least disturbed); both routes give the same factors
(tests/test_lora_hetero.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from strategies.lora_hetero import flex_average, normalised, split_svd, split_svd_of_product

LAYERS = 6
HIDDEN, INTERMEDIATE = 384, 1536


def minilm_shapes() -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of every linear module the default targets adapt in MiniLM."""
    shapes = {}
    for layer in range(LAYERS):
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[f"layer.{layer}.{name}"] = (HIDDEN, HIDDEN)
        shapes[f"layer.{layer}.intermediate.dense"] = (INTERMEDIATE, HIDDEN)
        shapes[f"layer.{layer}.output.dense"] = (HIDDEN, INTERMEDIATE)
    shapes["pooler.dense"] = (HIDDEN, HIDDEN)
    return shapes


def build_round(ranks: list[int], seed: int = 0) -> tuple[dict, list[dict], list[float]]:
    """A rank-max(ranks) global state and one delta per client (peft's names, trained-LoRA scale)."""
    rng = np.random.default_rng(seed)
    top = max(ranks)
    current, deltas = {}, [{} for _ in ranks]
    for module, (out_dim, in_dim) in minilm_shapes().items():
        a_key, b_key = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
        current[a_key] = (rng.standard_normal((top, in_dim)) / np.sqrt(in_dim)).astype(np.float32)
        current[b_key] = (0.01 * rng.standard_normal((out_dim, top))).astype(np.float32)
        for delta, r in zip(deltas, ranks, strict=True):
            delta[a_key] = (1e-3 * rng.standard_normal((r, in_dim))).astype(np.float32)
            delta[b_key] = (1e-3 * rng.standard_normal((out_dim, r))).astype(np.float32)
    weights = [float(w) for w in rng.integers(20, 200, len(ranks))]
    return current, deltas, weights


def stacked_factors(current: dict, deltas: list[dict], weights: list[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per matrix: ``[c_1 B_1 | ... | c_K B_K]`` and ``[A_1; ...; A_K]`` (client k's new factors)."""
    coefs = normalised(weights)
    out = []
    for module in minilm_shapes():
        a_key, b_key = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
        lefts, rights = [], []
        for c, d in zip(coefs, deltas, strict=True):
            r = d[a_key].shape[0]
            lefts.append(c * (current[b_key][:, :r].astype(np.float64) + d[b_key]))
            rights.append(current[a_key][:r].astype(np.float64) + d[a_key])
        out.append((np.hstack(lefts), np.vstack(rights)))
    return out


def dense_round(factors: list, ranks: list[int], top: int) -> float:
    """Seconds for the dense route: sum_k c_k B_k A_k formed per client, then the SVD of G."""
    tic = time.perf_counter()
    for left, right in factors:
        bounds = np.cumsum([0, *ranks])
        average = sum(left[:, i:j] @ right[i:j] for i, j in zip(bounds[:-1], bounds[1:], strict=True))
        split_svd(average, top)
    return time.perf_counter() - tic


def low_rank_round(factors: list, top: int) -> float:
    """Seconds for the low-rank route on the same stacked factors."""
    tic = time.perf_counter()
    for left, right in factors:
        split_svd_of_product(left, right, top)
    return time.perf_counter() - tic


def blas_threads() -> str:
    """The BLAS library and its thread count, when threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    return ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info()) or "none found"


def _list(times: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in times)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--ranks", default="2,4,8", help="client k has rank ranks[k % len(ranks)]")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    profile = [int(r) for r in args.ranks.split(",")]
    ranks = [profile[k % len(profile)] for k in range(args.clients)]
    top = max(ranks)
    current, deltas, weights = build_round(ranks)
    factors = stacked_factors(current, deltas, weights)
    print(
        f"{len(factors)} matrices, {args.clients} clients of ranks {ranks} (sum {sum(ranks)}), BLAS: {blas_threads()}"
    )
    dense, low, whole = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in the shared machine's load hits both routes
        dense.append(dense_round(factors, ranks, top))
        low.append(low_rank_round(factors, top))
        tic = time.perf_counter()
        flex_average(current, deltas, weights, top)
        whole.append(time.perf_counter() - tic)
    d, lr, w = statistics.median(dense), statistics.median(low), statistics.median(whole)
    print(f"dense SVD route:     median {d:.3f} s, min {min(dense):.3f} s per round (runs: {_list(dense)})")
    print(f"low-rank route:      median {lr:.3f} s, min {min(low):.3f} s per round (runs: {_list(low)})")
    print(f"flex_average, whole: median {w:.3f} s per round (stacking, SVDs, head)")
    print(f"ratio dense / low-rank: {d / lr:.1f}x of the medians, {min(dense) / min(low):.1f}x of the minima")
    return 0


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
