"""The data half of ``fedpeft check``: rows, partitions, participation and the privacy plan.

Runs the same pure functions a run uses (``load_splits``, ``partition_indices``,
``build_participation``, Opacus' noise planning) on the real data, so the sizes printed
are the sizes the clients will get. No model weight is read; no Flower or Ray import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np

from fedpeft.config import ConfigError, ExperimentConfig


def load_checked_splits(cfg: ExperimentConfig, report):
    """The run's train pool and test set (the same ``load_splits`` the clients call); summary lines."""
    from fedpeft import data

    try:
        with _quiet_datasets() if cfg.data.dataset != "embedded" else nullcontext():  # embedded: no datasets import
            splits = data.load_splits(cfg.data)
    except (ConnectionError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r} could not be loaded ({type(err).__name__}: {err}); "
            "check the name, or pass a local CSV / JSON / Parquet file"
        ) from None
    report.summary.append(
        f"run: {cfg.name}, seed {cfg.seed}, {cfg.num_rounds} rounds, strategy {cfg.strategy.name}, "
        f"participation {cfg.participation.model}"
    )
    report.summary.append(
        f"data: {cfg.data.dataset}: {len(splits.train)} training rows, "
        + (f"{len(splits.validation)} validation rows, " if splits.validation is not None else "")
        + f"{len(splits.test)} test rows, "
        f"labels {', '.join(splits.train.label_names)}"
    )
    return splits


def check_plan(cfg: ExperimentConfig, splits, report) -> tuple[int, ...]:
    """Partition the pool, plan participation and privacy; add summary lines; return the partition sizes."""
    from fedpeft import partition

    parts = partition.partition_indices(splits.train.labels, cfg.partition, cfg.seed)
    sizes = tuple(len(p) for p in parts)
    report.summary.append(
        f"clients: {len(sizes)} ({cfg.partition.scheme}); examples per partition min/median/max "
        f"{min(sizes)}/{int(np.median(sizes))}/{max(sizes)}"
    )
    check_batch_size(cfg, sizes, report)
    hist = partition.label_histograms(splits.train.labels, parts, len(splits.train.label_names))
    report.summary.append(label_mix(hist, splits.train.label_names))
    online = check_participation(cfg, hist)
    report.summary.append(
        f"participation: {online.sum(axis=1).mean():.1f} of {len(sizes)} clients online per round on average, "
        f"{int((online.sum(axis=1) == 0).sum())} empty rounds"
    )
    report.summary.append(f"privacy: {plan_privacy(cfg, sizes, online)}")
    report.warnings += krum_round_warnings(cfg, online)
    return sizes


def krum_round_warnings(cfg: ExperimentConfig, online: np.ndarray) -> list[str]:
    """Rounds of the planned trace that put fewer than 2f + 3 clients online: Krum refuses them at run time."""
    s = cfg.strategy
    if s.aggregator != "krum":
        return []
    need = max(2 * s.krum_f + 3, s.krum_f + s.krum_m)
    short = int((online.sum(axis=1) < need).sum())
    if not short:
        return []
    return [
        f"strategy.aggregator='krum' with strategy.krum-f={s.krum_f}, krum-m={s.krum_m} needs >= {need} clients in "
        f"a round; {short} of {cfg.num_rounds} planned rounds have fewer online and will be refused (no update); "
        "lower strategy.krum-f / krum-m or raise the participation probabilities"
    ]


def label_mix(hist: np.ndarray, label_names, max_clients: int = 12) -> str:
    """``label mix (neg/pos): 0: 40 = 25/15, 1: 12 = 0/12, ...``: each client's size and label counts."""
    shown = [
        f"{i}: {int(row.sum())} = {'/'.join(str(int(c)) for c in row)}" for i, row in enumerate(hist[:max_clients])
    ]
    more = f", ... ({len(hist) - max_clients} more)" if len(hist) > max_clients else ""
    return f"label mix ({'/'.join(label_names)}) per client: {', '.join(shown)}{more}"


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Generating train split" progress bars or parser tracebacks around the check's own messages."""
    import datasets

    was, level = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if was:
            datasets.enable_progress_bars()


def check_batch_size(cfg: ExperimentConfig, sizes: tuple[int, ...], report) -> None:
    """A batch larger than every partition would silently shrink to the partition: an error."""
    key, batch = ("spsa.batch-size", cfg.spsa.batch_size) if cfg.strategy.name == "spsa" else (
        "train.batch-size", cfg.train.batch_size)  # fmt: skip
    if batch > max(sizes):
        raise ConfigError(
            f"{key}={batch} is larger than every partition (the largest holds {max(sizes)} examples); "
            f"set {key} <= {max(sizes)} or give each client more data"
        )
    small = sum(s < batch for s in sizes)
    if small:
        report.warnings.append(f"{key}={batch}: {small} of {len(sizes)} partitions hold fewer examples (one batch)")


def check_participation(cfg: ExperimentConfig, label_hist: np.ndarray) -> np.ndarray:
    """The (rounds, clients) online matrix the run will replay; a run where nobody is ever online is an error."""
    from fedpeft import participation

    try:
        env = participation.build_participation(
            cfg.participation, cfg.partition.num_partitions, cfg.seed, label_hist=label_hist
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    matrix = participation.trace(env, cfg.num_rounds, cfg.partition.num_partitions)
    if not matrix.any():
        raise ConfigError(
            f"participation.model={cfg.participation.model!r} puts no client online in any of the "
            f"{cfg.num_rounds} rounds; raise the participation probabilities or num-rounds"
        )
    return matrix


def plan_privacy(cfg: ExperimentConfig, sizes: tuple[int, ...], online: np.ndarray) -> str:
    """The noise multiplier(s) and the epsilon they give (the run's own plan), or raise when unreachable."""
    from fedpeft.privacy_plan import plan_privacy as plan

    return plan(cfg, sizes, online).text()
