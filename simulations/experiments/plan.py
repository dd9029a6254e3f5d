"""A sweep's plan: seeds and grid from the command line, the runs and their folders (pure, no I/O but the TOMLs).

Every input error is raised as :class:`fedpeft.config.ConfigError` before any run starts.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.check import Sources, check_settings
from fedpeft.config import DEFAULTS, ConfigError, ExperimentConfig, flatten, parse_override

log = logging.getLogger(__name__)

_SEED_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: the resolved config and the folder its results go to."""

    source: str  # the config file it comes from
    label: str  # the grid values, "" without a grid
    seed: int
    run_dir: Path
    cfg: ExperimentConfig

    @property
    def name(self) -> str:
        """``<config name>/<label>/seed-<s>``: how progress lines and the manifest name the run."""
        return "/".join(p for p in (self.cfg.name, self.label, f"seed-{self.seed}") if p)

    def manifest_entry(self, status: str) -> dict[str, Any]:
        return {
            "dir": str(self.run_dir),
            "config": self.source,
            "label": self.label,
            "seed": self.seed,
            "status": status,
        }


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> ``[0, 1, 2, 3, 4]``; also ``"0,1,2"`` and ``"0-2,7"``."""
    seeds: list[int] = []
    for item in text.split(","):
        match = _SEED_ITEM.match(item.strip())
        if not match:
            raise ConfigError(f"--seeds {text!r}: {item.strip()!r} is not a seed or range; write e.g. 0-4 or 0,1,2")
        lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if hi < lo:
            raise ConfigError(f"--seeds {text!r}: range {item.strip()!r} runs backwards; write {hi}-{lo}")
        seeds.extend(range(lo, hi + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"--seeds {text!r} lists seeds {repeated} more than once")
    return seeds


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["train.lr=0.01,0.1", "strategy.name=fedavg,fedau"]`` -> ``{key: [values]}`` in the order given.

    Values are read as TOML like ``--set`` values (bare words are strings). A value that
    itself holds commas is written as a TOML array: ``peft.target-modules=["query,value", "value"]``.
    """
    known = list(ExperimentConfig().to_flat())
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {item!r} must look like key=v1,v2, e.g. --grid train.lr=0.01,0.1")
        if key in ("seed", "out-dir"):
            raise ConfigError(f"--grid {key}: use --seeds for seeds and --out for the sweep folder")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" did you mean {', '.join(close)}?" if close else " see fedpeft/config.py for the keys"
            raise ConfigError(f"--grid key {key!r} is not a config key;{hint}")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values once: --grid {key}=v1,v2")
        if raw.startswith("["):
            try:
                values = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"--grid {item!r}: not a TOML array ({err})") from err
        else:
            texts = raw.split(",")
            if any(not t.strip() for t in texts):
                raise ConfigError(f"--grid {item!r} has an empty value; write --grid {key}=v1,v2")
            values = [parse_override(f"{key}={t}")[1] for t in texts]
        if not values:
            raise ConfigError(f"--grid {key} has no values; write --grid {key}=v1,v2")
        if len({repr(v) for v in values}) < len(values):
            raise ConfigError(f"--grid {item!r} lists a value twice")
        grid[key] = values
    return grid


def grid_label(combo: dict[str, Any]) -> str:
    """A readable, deterministic folder name for one grid point: ``strategy.name=fedau,train.lr=0.01``.

    A value with characters unsafe in a path (``/``, spaces, ...) has them replaced and
    a short hash of the exact value appended, so two values never share a folder.
    """
    parts = []
    for key, value in combo.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        safe = _SAFE.sub("-", text)
        if safe != text or not safe:
            safe += "-" + hashlib.sha1(text.encode()).hexdigest()[:6]
        parts.append(f"{key}={safe}")
    return ",".join(parts)


def plan_sweep(
    configs: list[str | Path],
    seeds: list[int],
    grid: dict[str, list[Any]],
    overrides: list[str],
    out: str | Path,
) -> list[PlannedRun]:
    """Every (config, grid point, seed), validated, with its run folder ``out/<name>/<label>/seed-<s>``.

    Refuses a grid key also given in ``overrides`` and two config files that would write
    different runs into the same folder (same ``name``).
    """
    if not configs:
        raise ConfigError("give at least one experiment TOML to sweep")
    if not seeds:
        raise ConfigError("--seeds names no seed; write e.g. --seeds 0-4")
    fixed = dict(parse_override(o) for o in overrides)
    both = sorted(set(fixed) & set(grid))
    if both:
        raise ConfigError(f"{', '.join(both)} given in both --set and --grid; keep one")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    plan: dict[Path, PlannedRun] = {}
    for source in configs:
        base = _read_flat(source)  # validated per run below: a grid value may complete a --set
        for combo in combos:
            label = grid_label(combo)
            for seed in seeds:
                try:
                    cfg = ExperimentConfig.from_flat({**base, **fixed, **combo, "seed": seed})
                    # as fedpeft check: a file's setting of a mode the grid or --set switched off is a warning
                    warnings = check_settings(cfg, Sources(base, {**fixed, **combo}, known=True))
                except ConfigError as err:
                    raise ConfigError(f"{source} with {label or 'no grid'}, seed {seed}: {err}") from err
                for warning in warnings if seed == seeds[0] else []:
                    log.warning("%s with %s: %s", source, label or "no grid", warning)
                if cfg.tracking.backend == "mlflow" and not cfg.tracking.experiment:  # one experiment per sweep
                    cfg = cfg.replace({"tracking.experiment": f"sweep {Path(out).resolve().name}"})
                run_dir = Path(out) / _SAFE.sub("-", cfg.name) / label / f"seed-{seed}"
                run = PlannedRun(str(source), label, seed, run_dir, cfg)
                other = plan.get(run_dir)
                if other is not None and other.cfg != cfg:
                    a, b = {**DEFAULTS, **other.cfg.to_flat()}, {**DEFAULTS, **cfg.to_flat()}  # modes differ in keys
                    differ = sorted(k for k in a if a[k] != b[k])
                    raise ConfigError(
                        f"{other.source} and {source} both write {run_dir} (name {cfg.name!r}) but differ in "
                        f"{', '.join(differ)}; change the name in one of the files"
                    )
                plan[run_dir] = run
    return list(plan.values())


def _read_flat(path: str | Path) -> dict[str, Any]:
    """The TOML file's flat keys, unvalidated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; see simulations/configs/ for examples")
    with path.open("rb") as fh:
        try:
            return flatten(tomllib.load(fh))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
