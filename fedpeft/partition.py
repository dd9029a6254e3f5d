"""Split the training pool across clients with flwr-datasets' partitioners.

``FederatedDataset`` downloads from the hub, so the partitioners are fed a local
``datasets.Dataset`` holding only the row index and label; they return row indices.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from fedpeft import partitioners
from fedpeft.config import ConfigError, PartitionConfig
from fedpeft.rng import derive_seed

log = logging.getLogger("fedpeft")


def partition_indices(
    labels: np.ndarray,
    cfg: PartitionConfig,
    seed: int,
    *,
    allow_empty: bool = False,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Row indices of each partition; every index lands in exactly one partition.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every row of the pool.
    cfg : PartitionConfig
        ``iid``, ``dirichlet`` (label skew with concentration ``alpha``), ``natural-id``
        (one partition per distinct value of ``groups``; see :func:`natural_id_indices`), or a
        scheme of fedpeft/partitioners.py (shard, pathological, inner-dirichlet, size-*).
    seed : int
        Run seed; the partitioner's seed is derived from it.
    allow_empty : bool
        Return empty partitions instead of raising (property tests).
    groups : np.ndarray, optional
        Natural id of every row (``natural-id`` only).
    """
    if cfg.scheme == "natural-id":
        if groups is not None and len(groups) != len(labels):
            raise ValueError(f"{len(groups)} groups for {len(labels)} rows: give one group per row")
        return _checked(natural_id_indices(groups, cfg.num_partitions), len(labels), allow_empty)
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = cfg.num_partitions
    if len(labels) < n:
        raise ValueError(
            f"{len(labels)} examples cannot fill partition.num-partitions={n}; "
            f"set partition.num-partitions <= {len(labels)} or raise data.num-train-examples"
        )
    table = datasets.Dataset.from_dict({"row": np.arange(len(labels)), "label": np.asarray(labels)})
    part_seed = derive_seed(seed, "partition") % (2**32)
    if cfg.scheme == "iid":
        partitioner = IidPartitioner(num_partitions=n)
        table = table.shuffle(seed=part_seed)
    elif cfg.scheme in OTHER_SCHEMES:
        partitioner, table = _other_partitioner(labels, cfg, part_seed, table, allow_empty)
        if partitioner is None:  # shard: computed here, not by a flwr-datasets partitioner
            return _checked(partitioners.shard_partitions(labels, cfg, part_seed), len(labels), allow_empty)
    else:
        min_size = cfg.min_partition_size
        if min_size * n > len(labels):
            raise ValueError(
                f"partition.min-partition-size={min_size} x partition.num-partitions={n} needs {min_size * n} examples "
                f"but the pool has {len(labels)}: the maximum is {len(labels) // n}; lower one of them or use more data"
            )
        partitioner = DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=min_size,
            self_balancing=True,
            shuffle=True,
            seed=part_seed,
        )
    partitioner.dataset = table
    # flwr-datasets warns once per Dirichlet redraw (a paragraph each); one line that names our keys instead
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parts = partition_rows(partitioner, table, n)
        except ValueError as err:  # the Dirichlet draw could not meet min_partition_size
            raise ValueError(
                f"Dirichlet partitioning of {len(labels)} examples into {n} partitions failed ({err}); "
                "lower partition.min-partition-size, raise partition.alpha or use more data"
            ) from err
    redraws = sum("min_partition_size" in str(w.message) for w in caught)
    for w in caught:
        if "min_partition_size" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if redraws:
        log.info(
            "partition: the Dirichlet split needed many draws (%d warnings) to give every client "
            "partition.min-partition-size=%d rows; lower it or raise partition.alpha (%g) to draw once",
            redraws, cfg.min_partition_size, cfg.alpha,
        )  # fmt: skip
    return _checked(parts, len(labels), allow_empty)


def partition_rows(partitioner, table, n: int) -> list[np.ndarray]:
    """Each partition's ``row`` values, equal to ``partitioner.load_partition(i)["row"]`` for every ``i``.

    ``load_partition`` builds a ``datasets.Dataset`` per partition (fingerprints, deep copies):
    about 10-25 ms each, so 10,000 partitions took minutes in every process that partitions
    (the launcher's check, the server, each Ray actor on its first client). Here the table's
    ``row`` column is read once and indexed: for IID by the contiguous shards ``Dataset.shard``
    takes (the first ``len % n`` one row longer), for the others by the index lists the
    partitioner assigns to all partitions at its first ``load_partition`` call. A partitioner
    without such a list is asked partition by partition. tests/test_partition_rows.py checks
    every scheme against ``load_partition``.
    """
    from flwr_datasets.partitioner import IidPartitioner

    rows = np.asarray(table["row"], dtype=np.int64)
    if type(partitioner) is IidPartitioner:
        div, mod = divmod(len(rows), n)
        starts = [div * i + min(i, mod) for i in range(n + 1)]
        return [rows[starts[i] : starts[i + 1]] for i in range(n)]
    partitioner.load_partition(0)  # runs the partitioner's checks and assigns every partition's indices
    assigned = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(assigned, dict) or len(assigned) != n:
        return [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(n)]
    return [rows[np.asarray(assigned[i], dtype=np.int64)] for i in range(n)]


def _checked(parts: list[np.ndarray], num_rows: int, allow_empty: bool) -> list[np.ndarray]:
    """``parts`` once every row is in exactly one of them and (unless ``allow_empty``) none is empty."""
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(rows) != num_rows or len(np.unique(rows)) != num_rows:
        raise ValueError(
            f"the partitions hold {len(np.unique(rows))} distinct of {num_rows} rows; "
            "use partition.scheme='dirichlet' or 'iid', or report this scheme's setting"
        )
    for i, part in enumerate(parts):
        if len(part) == 0 and not allow_empty:
            raise ValueError(f"partition {i} is empty; lower partition.num-partitions or raise partition.alpha")
    return parts


OTHER_SCHEMES = ("shard", "pathological", "inner-dirichlet", *partitioners.SIZE_SCHEMES)


def _other_partitioner(labels: np.ndarray, cfg: PartitionConfig, seed: int, table, allow_empty: bool):
    """``(flwr-datasets partitioner or None for shard, table)`` for a scheme of fedpeft/partitioners.py."""
    if cfg.scheme == "pathological":
        return partitioners.pathological_partitioner(labels, cfg, seed), table
    if cfg.scheme == "inner-dirichlet":
        return partitioners.inner_dirichlet_partitioner(labels, cfg, seed), table
    if cfg.scheme in partitioners.SIZE_SCHEMES:
        sizes = partitioners.size_shares(cfg.scheme, cfg.num_partitions, len(labels))
        if min(sizes) < 1:
            raise ValueError(
                f"partition.scheme={cfg.scheme!r} gives {len(labels)} rows to {cfg.num_partitions} clients as "
                f"{sizes[:4]}...: client 0 gets none; lower partition.num-partitions, use more data, "
                "or a flatter scheme (size-linear)"
            )
        return partitioners.size_partitioner(cfg), table.shuffle(seed=seed)  # sizes by position: shuffle first
    return None, table


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_labels: int) -> np.ndarray:
    """(partitions, labels) count matrix, for reports and label-correlated participation."""
    return np.stack([np.bincount(labels[p], minlength=num_labels) for p in parts])


def natural_id_indices(groups: np.ndarray | None, num_partitions: int) -> list[np.ndarray]:
    """Row indices of each natural id (flwr-datasets' ``NaturalIdPartitioner``), one partition per id.

    Partition ``i`` holds the ``i``-th id in sorted order (the partitioner's own mapping), its
    rows in pool order. ``num_partitions`` must equal the number of distinct ids: merging ids
    or splitting one across clients would no longer be the data's natural split.
    """
    import contextlib
    import io

    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if groups is None:  # the classification task's data path reads no group column
        raise ConfigError(
            "partition.scheme='natural-id' got no group per example: it partitions instruction data (the causal-LM "
            "task: data.dataset='embedded-dialog' or data.group-column); choose another partition.scheme here"
        )
    ids = np.asarray(groups).astype(str)
    distinct = sorted(set(ids.tolist()) - {""})
    if not distinct:
        raise ConfigError(
            "partition.scheme='natural-id' needs a group per example but every group is empty; set data.group-column "
            "to a column that holds one or use data.dataset='embedded-dialog'"
        )
    if "" in set(ids.tolist()):
        row = int(np.flatnonzero(ids == "")[0])
        raise ConfigError(f"data row {row + 1} of the training pool has an empty group; fill or delete that row")
    if len(distinct) != num_partitions:
        shown = ", ".join(distinct[:12]) + (", ..." if len(distinct) > 12 else "")
        raise ConfigError(
            f"partition.scheme='natural-id' gives one partition per group and the training pool has "
            f"{len(distinct)} groups ({shown}); set partition.num-partitions={len(distinct)}"
        )
    partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = datasets.Dataset.from_dict({"row": np.arange(len(ids)), "group": ids})
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar over the rows says nothing here
        parts = [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(num_partitions)]
    return parts


def group_histograms(groups: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """(partitions, groups) count matrix, groups in sorted order: the label histograms of a natural split.

    Label-correlated participation (fedpeft/probabilities.py) takes it in place of
    :func:`label_histograms`, so participation is correlated with the category.
    """
    ids = np.asarray(groups).astype(str)
    names, codes = np.unique(ids, return_inverse=True)
    return label_histograms(codes.reshape(-1), parts, len(names))
