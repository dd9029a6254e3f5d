"""Split the training pool across clients with flwr-datasets' partitioners.

``FederatedDataset`` downloads from the hub, so the partitioners are fed a local
``datasets.Dataset`` holding only the row index and label; they return row indices.
"""

from __future__ import annotations

import numpy as np

from fedpeft.config import ConfigError, PartitionConfig
from fedpeft.rng import derive_seed


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
        ``iid``, ``dirichlet`` (label skew with concentration ``alpha``) or ``natural-id``
        (one partition per distinct value of ``groups``; see :func:`natural_id_indices`).
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
        return natural_id_indices(groups, cfg.num_partitions)
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
    try:
        parts = [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(n)]
    except ValueError as err:  # the Dirichlet draw could not meet min_partition_size
        raise ValueError(
            f"Dirichlet partitioning of {len(labels)} examples into {n} partitions failed ({err}); "
            "lower partition.min-partition-size, raise partition.alpha or use more data"
        ) from err
    for i, part in enumerate(parts):
        if len(part) == 0 and not allow_empty:
            raise ValueError(f"partition {i} is empty; lower partition.num-partitions or raise partition.alpha")
    return parts


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

    ids = np.asarray([] if groups is None else groups).astype(str)
    distinct = sorted(set(ids.tolist()) - {""})
    if not distinct:
        raise ConfigError(
            "partition.scheme='natural-id' needs a group per example but the data has none; set data.group-column "
            "or use data.dataset='embedded-dialog'"
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
