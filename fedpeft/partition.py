"""Split the training pool across clients with flwr-datasets' partitioners.

``FederatedDataset`` downloads from the hub, so the partitioners are fed a local
``datasets.Dataset`` holding only the row index and label; they return row indices.
"""

from __future__ import annotations

import numpy as np

from fedpeft.config import PartitionConfig
from fedpeft.rng import derive_seed


def partition_indices(
    labels: np.ndarray, cfg: PartitionConfig, seed: int, *, allow_empty: bool = False
) -> list[np.ndarray]:
    """Row indices of each partition; every index lands in exactly one partition.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every row of the pool.
    cfg : PartitionConfig
        ``iid`` or ``dirichlet`` (label skew with concentration ``alpha``).
    seed : int
        Run seed; the partitioner's seed is derived from it.
    allow_empty : bool
        Return empty partitions instead of raising (property tests).
    """
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
