"""The size half of ``fedpeft check``: what trains and what travels, counted from shapes.

The model is built on PyTorch's meta device (no weight is read) and peft is not imported:
every count follows from the module shapes and the config. A peft LoRA pair on a linear
module ``in -> out`` is ``A`` (``r x in``) and ``B`` (``out x r``): LoRA trains and sends
both, ``r (in + out)`` scalars; FFA-LoRA (``peft.lora-variant = "ffa"``) freezes A at its
seeded initialisation, so only B trains and travels, ``r out`` scalars. A client of rank
r (``clients.rank-profile``) receives and returns its rank's slice of the adapter.

Bytes per client-round are payload bytes, as in the byte ledger (fedpeft/comm.py): the
fp32 arrays of the adapter state sent down, and of the delta of the same shapes sent up.
"""

from __future__ import annotations

from fedpeft.config import ExperimentConfig, parse_rank_profile
from fedpeft.ranks import candidate_ranks

#: arrays travel as fp32 (fedpeft/records.py)
BYTES_PER_SCALAR = 4


def lora_factor_scalars(model, cfg: ExperimentConfig) -> int | None:
    """Scalars per rank slice over all adapted modules: ``sum (in + out)``, or ``sum out`` for FFA.

    None unless ``peft.method = "lora"``. Raises :class:`~fedpeft.config.ConfigError` for a
    ``peft.target-modules`` / ``peft.layers`` entry that matches nothing.
    """
    if cfg.peft.method != "lora":
        return None
    from fedpeft import adapters

    head_root = _head_root(model)
    modules = dict(model.named_modules())
    linear = {n: m for n, m in modules.items() if _is_linear(m) and not n.startswith(head_root)}
    adapters.check_lora_targets(cfg.peft, list(modules), list(linear))
    targets = [t.strip() for t in cfg.peft.target_modules.split(",") if t.strip()]
    layers = adapters.parse_layers(cfg.peft.layers)
    per_slice = 0
    for name, module in linear.items():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        match = adapters._LAYER_INDEX.search(name)
        if layers is not None and (match is None or int(match.group(1)) not in layers):
            continue
        # A (r x in) is frozen under FFA-LoRA: only B (out x r) trains and travels.
        per_slice += module.out_features if cfg.peft.lora_variant == "ffa" else module.in_features + module.out_features
    return per_slice


def count_trainable(model, cfg: ExperimentConfig, rank: int | None = None) -> int | None:
    """Trainable scalars of ``cfg.peft`` on ``model`` (at LoRA rank ``rank``, default ``peft.lora-rank``).

    LoRA: :func:`lora_factor_scalars` x rank; prompt tuning: one embedding row per virtual
    token; the head (``modules_to_save``) trains in full with ``peft.train-head``; BitFit
    trains every bias; full every parameter. ``ia3``: None (IA3's modules come from peft's
    per-architecture tables; the run prints the count).
    """
    head_root = _head_root(model)
    head = getattr(model, head_root)
    head_count = sum(p.numel() for p in head.parameters()) if cfg.peft.train_head else 0
    method = cfg.peft.method
    if method == "head":
        return sum(p.numel() for p in head.parameters())
    if method == "bitfit":
        biases = sum(
            p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith(head_root)
        )
        head_bias = (
            0 if cfg.peft.train_head else sum(p.numel() for n, p in head.named_parameters() if n.endswith("bias"))
        )
        return biases + head_count + head_bias
    if method == "full":  # every weight, the head with peft.train-head
        return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in head.parameters()) + head_count
    if method == "lst":  # the side network only (fedpeft/lst.py); raises for a bad reduction / layer list
        from fedpeft.backbone import head_module
        from fedpeft.lst import plan_for_backbone

        return plan_for_backbone(model, cfg.peft).num_params(head_module(model)[1].out_features)
    if method == "prompt":  # peft's PromptEmbedding: one token-embedding row per virtual token
        return cfg.peft.num_virtual_tokens * model.get_input_embeddings().embedding_dim + head_count
    per_slice = lora_factor_scalars(model, cfg)
    if per_slice is None:
        return None
    return (rank or cfg.peft.lora_rank) * per_slice + head_count


def rank_tiers(cfg: ExperimentConfig) -> tuple[list[int], str]:
    """The LoRA ranks clients may train, and how they are chosen.

    One rank without ``clients.rank-profile``; the listed ranks for ``"2,4,8"``; the
    candidate ranks for ``"mem:..."`` (the run picks them from the loaded backbone's bytes).
    """
    kind, values = parse_rank_profile(cfg.clients.rank_profile)
    if kind == "ranks":
        return sorted({int(v) for v in values}), "clients.rank-profile"
    if kind == "mem":
        return candidate_ranks(cfg.peft.lora_rank), "candidates for the memory budgets"
    return [cfg.peft.lora_rank], ""


def trainable_by_rank(model, cfg: ExperimentConfig) -> dict[int, int]:
    """``{rank: trainable scalars}`` for every rank tier (:func:`rank_tiers`); empty unless LoRA."""
    if cfg.peft.method != "lora":
        return {}
    return {r: int(count_trainable(model, cfg, r)) for r in rank_tiers(cfg)[0]}


def payload_bytes_per_client_round(trainable: int) -> int:
    """Payload bytes one way (down: the state; up: the delta, same shapes) for ``trainable`` scalars."""
    return trainable * BYTES_PER_SCALAR


def size_summary(cfg: ExperimentConfig, trainable: int | None, by_rank: dict[int, int]) -> str:
    """``N trainable parameters, B payload bytes each way per client-round``, one entry per rank tier."""
    if trainable is None:
        return "trainable count unknown"
    zeroth = cfg.strategy.name == "spsa"  # SPSA clients send one-byte codes, not arrays (fedpeft/zo_log.py)
    tiers, source = rank_tiers(cfg)
    per_round = " payload bytes each way per client-round"
    if len(by_rank) <= 1:
        text = f"{trainable:,} trainable parameters"
        return text if zeroth else f"{text}, {payload_bytes_per_client_round(trainable):,}{per_round}"
    if zeroth:
        return f"trainable parameters by rank ({source}): " + ", ".join(f"rank {r}: {by_rank[r]:,}" for r in tiers)
    cells = [f"rank {r}: {by_rank[r]:,} / {payload_bytes_per_client_round(by_rank[r]):,}" for r in tiers]
    return f"trainable parameters /{per_round} by rank ({source}): " + ", ".join(cells)


def _head_root(model) -> str:
    from fedpeft import backbone

    head_name, _ = backbone.head_module(model)
    return head_name.split(".")[0]


def _is_linear(module) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear)
