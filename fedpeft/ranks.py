"""Which LoRA rank each client trains: a device profile, round-robin or by memory budget.

``clients.rank-profile = "2,4,8"``: partition i trains rank ``profile[i % len(profile)]``.
``clients.rank-profile = "mem:54,56,60,..."``: one budget in MB (10^6 bytes) per partition;
the client trains the largest rank in 1, 2, 4, ..., ``peft.lora-rank`` whose training
memory fits. Training memory here is deterministic, so the server and every client compute
the same ranks: the frozen backbone's bytes (quantized weights at their packed size) plus
the trainable parameters x 4 bytes x (parameter + gradient + optimizer moments). Activations
and the runtime are left out: they hardly depend on the rank, and the process's peak RSS
(fedpeft/memory.py) varies from machine to machine.
"""

from __future__ import annotations

from collections.abc import Callable

from fedpeft.config import ConfigError, ExperimentConfig, parse_rank_profile

# torch-free on purpose: strategies (numpy only) read the round-robin ranks from here.


def candidate_ranks(max_rank: int) -> list[int]:
    """1, 2, 4, ... below ``max_rank``, then ``max_rank`` itself."""
    ranks, r = [], 1
    while r < max_rank:
        ranks.append(r)
        r *= 2
    return [*ranks, max_rank]


def training_bytes(frozen_bytes: int, trainable_params: int, optimizer: str) -> int:
    """Frozen backbone + trainable parameters with their gradients and optimizer state."""
    from fedpeft.memory import OPTIMIZER_STATE_TENSORS

    return int(frozen_bytes + trainable_params * 4 * (2 + OPTIMIZER_STATE_TENSORS[optimizer]))


def client_ranks(cfg: ExperimentConfig, need_bytes: Callable[[int], int] | None = None) -> list[int]:
    """The LoRA rank of every partition, in partition order.

    Parameters
    ----------
    cfg : ExperimentConfig
        Reads ``clients.rank-profile``, ``peft.lora-rank`` and ``partition.num-partitions``.
    need_bytes : callable, optional
        ``rank -> training bytes`` (:func:`training_bytes` of the model at that rank); needed
        only by the ``mem:`` form.
    """
    kind, values = parse_rank_profile(cfg.clients.rank_profile)
    num = cfg.partition.num_partitions
    if not kind:
        return [cfg.peft.lora_rank] * num
    if kind == "ranks":
        return [int(values[i % len(values)]) for i in range(num)]
    if need_bytes is None:
        raise ValueError("a 'mem:' rank profile needs need_bytes (rank -> training bytes)")
    needs = {r: need_bytes(r) for r in candidate_ranks(cfg.peft.lora_rank)}
    ranks = []
    for pid, budget_mb in enumerate(values):
        fits = [r for r, need in needs.items() if need <= budget_mb * 1e6]
        if not fits:
            table = ", ".join(f"rank {r}: {b / 1e6:.2f} MB" for r, b in needs.items())
            raise ConfigError(
                f"clients.rank-profile gives partition {pid} {budget_mb:g} MB, which fits no LoRA rank "
                f"({table}); raise that budget to at least {needs[min(needs)] / 1e6:.2f} MB "
                "or use a smaller backbone (model.quantization=nf4)"
            )
        ranks.append(max(fits))
    return ranks
