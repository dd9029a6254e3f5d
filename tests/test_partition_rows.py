"""Partition rows read once from the table (fedpeft/partition.py's partition_rows) equal flwr-datasets' load_partition."""

import time

import numpy as np
import pytest

import fedpeft.partition as partition
from fedpeft.config import PartitionConfig
from fedpeft.partition import partition_indices


def _one_by_one(partitioner, table, n):  # what partition_indices did before: one Dataset per partition
    return [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(n)]


@pytest.mark.parametrize(
    ("scheme", "rows", "n"),
    [
        ("iid", 103, 10),  # 103 = 10 x 10 + 3: the first three shards hold one row more
        ("iid", 7, 7),
        ("dirichlet", 400, 6),
        ("pathological", 300, 5),
        ("inner-dirichlet", 300, 5),
        ("size-linear", 300, 5),
        ("size-square", 300, 4),
        ("size-exponential", 300, 4),
    ],
)
def test_every_scheme_gives_the_rows_load_partition_gives_in_the_same_order(monkeypatch, scheme, rows, n):
    labels = np.arange(rows) % 3
    cfg = PartitionConfig(num_partitions=n, scheme=scheme, alpha=0.5, min_partition_size=5)
    fast = partition_indices(labels, cfg, seed=11)
    monkeypatch.setattr(partition, "partition_rows", _one_by_one)
    slow = partition_indices(labels, cfg, seed=11)
    assert len(fast) == len(slow) == n
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ten_thousand_iid_partitions_are_computed_in_seconds_not_minutes():
    labels = np.arange(10_000) % 2
    start = time.process_time()
    parts = partition_indices(labels, PartitionConfig(num_partitions=10_000, scheme="iid"), seed=0)
    assert time.process_time() - start < 5.0  # one Dataset per partition took ~100 s of CPU here
    assert sorted(np.concatenate(parts).tolist()) == list(range(10_000))
    assert {len(p) for p in parts} == {1}
