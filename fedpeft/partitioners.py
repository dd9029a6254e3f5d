"""The partition schemes beyond IID and Dirichlet: shard, pathological, inner Dirichlet, size.

Each scheme is one function of (labels, config, seed) -> row indices per partition, called
by :func:`fedpeft.partition.partition_indices`, and checked there to place every row in
exactly one partition.

- ``shard`` (McMahan et al. 2017, sec. 3): rows sorted by label, cut into
  ``num-partitions x shards-per-client`` near-equal shards, each client drawing
  ``shards-per-client`` of them at random. Written here rather than with flwr-datasets'
  ``ShardPartitioner``, which drops the ``rows mod shards`` remainder (measured: 96 of 103
  rows kept, 91 with ``keep_incomplete_shard``), and a partition must hold every row.
- ``pathological``: flwr-datasets' ``PathologicalPartitioner``, ``classes-per-client``
  labels per client. Its ``first-deterministic`` mode gives client i label ``i mod C`` first,
  so with at least as many clients as labels every label has an owner; with fewer clients,
  ``deterministic`` (labels i, ..., i + k - 1) covers ``n + k - 1`` labels, and fewer than
  all is refused: a label nobody holds would drop its rows.
- ``inner-dirichlet``: flwr-datasets' ``InnerDirichletPartitioner``: equal sizes (the first
  ``rows mod n`` clients one more), label mix drawn from Dirichlet(``alpha``) inside each.
- ``size-linear`` / ``size-square`` / ``size-exponential``: flwr-datasets' Linear / Square /
  Exponential partitioners: client i (1-based) gets a share proportional to i, i^2 or e^i
  of the shuffled pool, rounded down, the remainder to the last client.
"""

from __future__ import annotations

import numpy as np

from fedpeft.config import PartitionConfig

SIZE_SCHEMES = {"size-linear": "LinearPartitioner", "size-square": "SquarePartitioner"}
SIZE_SCHEMES["size-exponential"] = "ExponentialPartitioner"


def shard_partitions(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Label-sorted shards, ``cfg.shards_per_client`` per client (see the module docstring)."""
    n, k = cfg.num_partitions, cfg.shards_per_client
    num_labels = len(np.unique(labels))
    if n * k > len(labels):
        raise ValueError(
            f"{n} clients x partition.shards-per-client={k} = {n * k} shards but the pool has {len(labels)} rows; "
            "lower partition.shards-per-client or partition.num-partitions, or use more data"
        )
    if n * k < num_labels:
        raise ValueError(
            f"{n} clients x partition.shards-per-client={k} = {n * k} shards cannot cover the {num_labels} labels "
            f"(shards would mix labels); set partition.shards-per-client >= {-(-num_labels // n)}"
        )
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(labels)), labels))  # by label, shuffled within each label
    shards = np.array_split(order, n * k)
    owner = rng.permutation(n * k) % n  # k shards per client, drawn at random
    return [np.sort(np.concatenate([shards[s] for s in np.flatnonzero(owner == i)])) for i in range(n)]


def pathological_partitioner(labels: np.ndarray, cfg: PartitionConfig, seed: int):
    """flwr-datasets' ``PathologicalPartitioner`` with ``cfg.classes_per_client`` labels per client."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    n, k = cfg.num_partitions, cfg.classes_per_client
    num_labels = len(np.unique(labels))
    if k > num_labels:
        raise ValueError(
            f"partition.classes-per-client={k} but the pool has {num_labels} labels; "
            f"set partition.classes-per-client <= {num_labels}"
        )
    if n + k - 1 < num_labels:
        raise ValueError(
            f"{n} clients with partition.classes-per-client={k} cover only {n + k - 1} of {num_labels} labels; "
            f"set partition.classes-per-client >= {num_labels - n + 1} or partition.num-partitions >= {num_labels}"
        )
    mode = "first-deterministic" if n >= num_labels else "deterministic"
    return PathologicalPartitioner(
        num_partitions=n, partition_by="label", num_classes_per_partition=k, class_assignment_mode=mode, seed=seed
    )


def inner_dirichlet_partitioner(labels: np.ndarray, cfg: PartitionConfig, seed: int):
    """flwr-datasets' ``InnerDirichletPartitioner``: equal sizes, Dirichlet(``cfg.alpha``) label mix in each."""
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    n = cfg.num_partitions
    sizes = [len(labels) // n + (i < len(labels) % n) for i in range(n)]
    return InnerDirichletPartitioner(partition_sizes=sizes, partition_by="label", alpha=cfg.alpha, seed=seed)


def size_partitioner(cfg: PartitionConfig):
    """flwr-datasets' Linear / Square / Exponential partitioner (on a shuffled pool)."""
    import flwr_datasets.partitioner as partitioners

    return getattr(partitioners, SIZE_SCHEMES[cfg.scheme])(num_partitions=cfg.num_partitions)


def size_shares(scheme: str, num_partitions: int, num_rows: int) -> list[int]:
    """The sizes a size scheme gives: share proportional to i, i^2 or e^i, floored, remainder to the last.

    The same arithmetic as flwr-datasets' ``IdToSizeFncPartitioner``, written out so that
    ``fedpeft check`` can name an empty client before partitioning.
    """
    i = np.arange(1, num_partitions + 1, dtype=np.float64)
    units = {"size-linear": i, "size-square": i**2, "size-exponential": np.exp(i)}[scheme]
    sizes = np.array(units / units.sum() * num_rows, dtype=np.int64)
    sizes[-1] += num_rows - sizes.sum()
    return [int(s) for s in sizes]
