"""Settings of a feature that is switched off: the one rule that finds them, over flat keys.

Two sources, one answer ``(key, switch, why)``:

- a section with modes (fedpeft/config_variants.py): a key that the chosen mode's variant has no
  field for (``dp.clip-norm`` with ``dp.mode = "none"``); nothing else to write for those;
- :data:`RULES` for the switches that are not (yet) variants: ``(switch, why_off(flat) or None, keys)``.

Only a value that differs from the key's default counts (pyproject lists every key at its default).
``fedpeft check`` turns each into an error, except a key a file sets whose switch ``--set`` turned
off (a warning: ``--set dp.mode=none`` on dp_sample.toml); fedpeft/check.py decides which.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedpeft.choices import BYZANTINE_KINDS
from fedpeft.config import DEFAULTS, VARIANT_SECTIONS

Flat = Mapping[str, Any]


def _keys(section: str, names: str) -> tuple[str, ...]:
    return tuple(f"{section}.{n}" for n in names.split())


Test = tuple[str, ...] | Callable[[Flat], bool]


def _holds(switch: str, test: Test) -> Callable[[Flat], bool]:
    return test if callable(test) else (lambda f: f[switch] in test)


def byzantine_on(fraction: float, rate: float, kinds: str) -> bool:
    """Whether any client sends Byzantine deltas: a Byzantine share, or random faults of a Byzantine kind."""
    return fraction > 0 or (rate > 0 and bool({k.strip() for k in kinds.split(",")} & set(BYZANTINE_KINDS)))


def is_file_or_embedded(dataset: str) -> bool:
    """Whether ``data.dataset`` names the embedded set or a local file (no HF split to choose)."""
    local_suffixes = (".csv", ".json", ".jsonl", ".parquet", ".tsv")  # fedpeft.data.LOCAL_SUFFIXES, without torch
    return dataset == "embedded" or Path(dataset).suffix in local_suffixes


def _rule(switch: str, live: Test, why: str, keys: tuple[str, ...]) -> Rule:
    """``keys`` matter only while ``switch`` is one of ``live`` (or ``live(flat)``); ``why`` says what is off."""
    on = _holds(switch, live)
    return switch, (lambda f: None if on(f) else why), keys


def _unless(switch: str, dead: Test, why: str, keys: tuple[str, ...]) -> Rule:
    """``keys`` stop mattering while ``switch`` is one of ``dead`` (or ``dead(flat)``): it replaces them."""
    off = _holds(switch, dead)
    return switch, (lambda f: why if off(f) else None), keys


# (switch key, "why it is off" or None when on, keys that only matter when it is on)
Rule = tuple[str, Callable[[Flat], str | None], tuple[str, ...]]
RULES: tuple[Rule, ...] = (
    _unless("dp.target-epsilon", lambda f: f["dp.target-epsilon"] > 0, "a target epsilon picks the noise multiplier",
            ("dp.noise-multiplier",)),
    _rule("participation.p-source", ("list",), "p_n are not listed", ("participation.p-list",)),
    _unless("participation.p-source", ("list",), "p_n are listed", ("participation.p-mean",)),
    _rule("participation.p-source", ("uniform", "label-correlated"), "p_n have no floor", ("participation.p-floor",)),
    _rule("participation.p-source", ("label-correlated",), "p_n ignore labels", ("participation.label-alpha",)),
    _rule("partition.scheme", ("dirichlet", "inner-dirichlet"), "no Dirichlet label mix is drawn",
          ("partition.alpha",)),
    _rule("partition.scheme", ("dirichlet",), "only 'dirichlet' redraws for a minimum",
          ("partition.min-partition-size",)),
    _rule("partition.scheme", ("shard",), "only 'shard' cuts shards", ("partition.shards-per-client",)),
    _rule("partition.scheme", ("pathological",), "only 'pathological' counts labels",
          ("partition.classes-per-client",)),
    _rule("peft.method", ("lora",), "no LoRA is injected",
          _keys("peft", "lora-rank lora-alpha lora-dropout target-modules layers")),
    _rule("peft.method", ("lst",), "no side network is built",
          (*_keys("peft", "lst-reduction lst-layers lst-every"), "train.lst-store-mb")),
    _unless("peft.method", ("lst",), "LST always trains its side network's head", ("peft.train-head",)),
    _unless("peft.lst-layers", lambda f: bool(f["peft.lst-layers"].strip()), "listed layers replace every k-th",
            ("peft.lst-every",)),
    _rule("peft.method", ("prompt",), "no prompt is tuned", ("peft.num-virtual-tokens",)),
    _unless("peft.method", ("head",), "head-only always trains the head", ("peft.train-head",)),
    _rule("strategy.name", ("spsa",), "SPSA is off",
          _keys("spsa", "local-steps eps lr lr-schedule codec scale-rule scale-multiplier initial-scale batch-size "
                        "distribution")),
    _unless("strategy.name", ("spsa",), "SPSA clients use the spsa.* settings",
            _keys("train", "optimizer lr local-epochs local-steps batch-size weight-decay")),
    _rule("strategy.name", ("fedau",), "only FedAU cuts intervals", ("strategy.k-cap",)),
    _rule("strategy.server-optimizer", ("momentum",), "only FedAvgM keeps a velocity", ("strategy.server-momentum",)),
    _rule("strategy.server-optimizer", ("adam", "yogi", "adagrad"), "no adaptive moments",
          _keys("strategy", "beta1 tau")),
    _rule("strategy.server-optimizer", ("adam", "yogi"), "no decaying second moment", ("strategy.beta2",)),
    _rule("strategy.aggregator", ("trimmed-mean",), "nothing is trimmed", ("strategy.trim-fraction",)),
    _rule("strategy.aggregator", ("krum",), "Krum does not select", _keys("strategy", "krum-f krum-m")),
    _rule("model.head-init", ("prompts",), "the head is not built from prompts",
          _keys("model", "label-prompts head-scale")),
    _unless("train.local-steps", lambda f: f["train.local-steps"] > 0, "a step count replaces epochs",
            ("train.local-epochs",)),
    _unless("data.dataset", lambda f: is_file_or_embedded(f["data.dataset"]), "a split is chosen on HF datasets only",
            ("data.split",)),
    _unless("model.device", ("cpu",), "clients run on the CPU", ("simulation.num-gpus-per-client",)),
    _rule("model.quantization", ("int8",), "only int8 has an outlier threshold", ("model.int8-threshold",)),
    _rule("tracking.backend", ("mlflow",), "only MLflow has a store and experiments",
          _keys("tracking", "uri experiment")),
    _rule("faults.byzantine-fraction", lambda f: f["faults.byzantine-fraction"] > 0, "no client is Byzantine",
          ("faults.byzantine-kind",)),
    _rule("faults.byzantine-fraction",
          lambda f: byzantine_on(f["faults.byzantine-fraction"], f["faults.rate"], f["faults.kinds"]),
          "no Byzantine kind is injected", ("faults.byzantine-scale",)),
    _rule("evaluate.fraction-clients", lambda f: f["evaluate.fraction-clients"] > 0, "per-client evaluation is off",
          ("evaluate.holdout-fraction",)),
)  # fmt: skip


def dead_settings(flat: Flat) -> list[tuple[str, str, str]]:
    """``(key, switch, why)`` for every non-default setting of a switched-off feature in ``flat``.

    ``flat``: flat keys as a file and ``--set`` give them (missing keys take their defaults).
    """
    full = {**DEFAULTS, **flat}
    found: dict[str, tuple[str, str, str]] = {}
    for section, variants in VARIANT_SECTIONS.items():
        switch = f"{section}.{variants.switch}"
        mode = full[switch]
        if mode not in variants.classes:
            continue  # an unknown mode: validation names the choices
        for key in (k for k in DEFAULTS if k.startswith(f"{section}.") and full[k] != DEFAULTS[k]):
            modes = variants.modes_with(key.removeprefix(f"{section}.").replace("-", "_"))
            if mode not in modes:
                found[key] = (key, switch, f"it is read with {switch} = {' / '.join(modes)} only")
    for switch, why_off, keys in RULES:
        why = why_off(full)
        if why is None:
            continue
        for key in keys:
            if key not in found and key != switch and full[key] != DEFAULTS[key]:
                found[key] = (key, switch, why)
    return list(found.values())
