import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.config import PartitionConfig
from fedpeft.participation import Always, Uniform, trace
from fedpeft.partition import label_histograms, partition_indices


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(40, 400),
    parts=st.integers(1, 8),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.sampled_from([0.1, 0.5, 5.0]),
    seed=st.integers(0, 10),
)
def test_partitions_cover_every_index_exactly_once(n, parts, scheme, alpha, seed):
    labels = np.random.default_rng(seed).integers(0, 3, size=n)
    cfg = PartitionConfig(num_partitions=parts, scheme=scheme, alpha=alpha, min_partition_size=0)
    got = np.concatenate(partition_indices(labels, cfg, seed, allow_empty=True))
    np.testing.assert_array_equal(np.sort(got), np.arange(n))


def test_the_same_seed_gives_the_same_partitions_and_another_seed_differs():
    labels = np.repeat([0, 1], 100)
    cfg = PartitionConfig(num_partitions=4, scheme="dirichlet", alpha=0.5, min_partition_size=5)
    a, b, c = (partition_indices(labels, cfg, s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels = np.repeat([0, 1], 500)
    skew = {}
    for alpha in (0.1, 100.0):
        cfg = PartitionConfig(num_partitions=5, scheme="dirichlet", alpha=alpha, min_partition_size=5)
        hist = label_histograms(labels, partition_indices(labels, cfg, 0), 2)
        skew[alpha] = np.mean(np.abs(hist[:, 0] / hist.sum(1) - 0.5))
    assert skew[0.1] > skew[100.0] + 0.1


def test_an_infeasible_dirichlet_split_names_the_fix():
    cfg = PartitionConfig(num_partitions=7, scheme="dirichlet", alpha=0.1, min_partition_size=5)
    with pytest.raises(ValueError, match="lower partition.min-partition-size"):
        partition_indices(np.repeat([0, 1], 20), cfg, 0)


def test_more_partitions_than_examples_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill partition.num-partitions=5"):
        partition_indices(np.array([0, 1, 0]), PartitionConfig(num_partitions=5, scheme="iid"), 0)


def test_uniform_participation_is_seeded_and_has_the_configured_size():
    a, b = Uniform(10, 0.5, 1, seed=3), Uniform(10, 0.5, 1, seed=3)
    np.testing.assert_array_equal(trace(a, 20, 10), trace(b, 20, 10))
    assert all(len(a.online(t)) == 5 for t in range(1, 21))
    assert trace(a, 20, 10).sum(0).min() > 0  # everyone gets picked at some point
    assert trace(Always(4), 3, 4).all()
