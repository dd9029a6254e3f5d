"""Shard, pathological, inner-Dirichlet and size partitions: every row once, seeded, hand-checked sizes, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.check_plan import label_mix
from fedpeft.config import ConfigError, ExperimentConfig, PartitionConfig
from fedpeft.participation import build_participation
from fedpeft.partition import label_histograms, partition_indices
from fedpeft.partitioners import size_shares

SCHEMES = ["shard", "pathological", "inner-dirichlet", "size-linear", "size-square", "size-exponential"]


def _cfg(scheme: str, n: int, **kw) -> PartitionConfig:
    return PartitionConfig(num_partitions=n, scheme=scheme, min_partition_size=20, **kw)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(60, 300),
    n=st.integers(3, 6),
    scheme=st.sampled_from(SCHEMES),
    k=st.integers(1, 3),
    seed=st.integers(0, 20),
)
def test_every_row_lands_in_exactly_one_partition(rows, n, scheme, k, seed):
    labels = np.random.default_rng(seed).integers(0, 3, size=rows)
    cfg = _cfg(scheme, n, shards_per_client=k, classes_per_client=k)
    try:
        parts = partition_indices(labels, cfg, seed, allow_empty=True)
    except ValueError as err:  # refused settings name the key to change; a dropped row is never refused
        assert "partition." in str(err) and "distinct" not in str(err)
        return
    assert len(parts) == n
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(rows))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_is_seeded_and_another_seed_differs(scheme):
    labels = np.repeat([0, 1, 2, 3], 50)
    cfg = _cfg(scheme, 4)
    a, b, c = (partition_indices(labels, cfg, s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_size_partitions_have_the_hand_computed_sizes():
    # linear 1:2:3:4 of 100 -> 10, 20, 30, 40
    assert size_shares("size-linear", 4, 100) == [10, 20, 30, 40]
    # square 1:4:9:16 (sum 30) of 100 -> 3.3, 13.3, 30, 53.3 floored; the 1 left over goes to the last
    assert size_shares("size-square", 4, 100) == [3, 13, 30, 54]
    # exponential e:e^2:e^3 (sum 30.19) of 100 -> 9.0, 24.5, 66.5 floored -> 9, 24, 66 + 1
    assert size_shares("size-exponential", 3, 100) == [9, 24, 67]
    labels = np.zeros(100, dtype=np.int64)
    for scheme in ("size-linear", "size-square"):
        parts = partition_indices(labels, _cfg(scheme, 4), 0)
        assert [len(p) for p in parts] == size_shares(scheme, 4, 100)


def test_shard_gives_each_client_its_shards_of_sorted_labels():
    labels = np.repeat([0, 1, 2, 3], 24)  # 96 rows: 4 clients x 2 shards of 12 rows
    parts = partition_indices(labels, _cfg("shard", 4, shards_per_client=2), 0)
    assert [len(p) for p in parts] == [24, 24, 24, 24]
    hist = label_histograms(labels, parts, 4)
    assert (np.count_nonzero(hist, axis=1) <= 2).all()  # two shards: at most two labels each


def test_pathological_gives_each_client_k_labels_and_every_label_an_owner():
    labels = np.repeat(np.arange(5), 20)
    parts = partition_indices(labels, _cfg("pathological", 6, classes_per_client=2), 0)
    hist = label_histograms(labels, parts, 5)
    assert (np.count_nonzero(hist, axis=1) == 2).all()
    assert (hist.sum(axis=0) == 20).all()


def test_inner_dirichlet_keeps_equal_sizes_and_skews_labels():
    labels = np.repeat([0, 1], 101)
    parts = partition_indices(labels, _cfg("inner-dirichlet", 4, alpha=0.1), 0)
    assert [len(p) for p in parts] == [51, 51, 50, 50]
    hist = label_histograms(labels, parts, 2)
    assert np.abs(hist[:, 0] / hist.sum(1) - 0.5).mean() > 0.2


@pytest.mark.parametrize(
    ("scheme", "n", "kw", "message"),
    [
        ("shard", 2, {"shards_per_client": 1}, "cannot cover the 4 labels.*shards-per-client >= 2"),
        ("shard", 4, {"shards_per_client": 30}, "120 shards but the pool has 100 rows"),
        ("pathological", 2, {"classes_per_client": 2}, "cover only 3 of 4 labels.*classes-per-client >= 3"),
        ("pathological", 4, {"classes_per_client": 5}, "classes-per-client <= 4"),
        ("size-exponential", 12, {}, "client 0 gets none.*lower partition.num-partitions"),
    ],
)
def test_settings_that_cannot_cover_the_labels_or_fill_clients_name_the_fix(scheme, n, kw, message):
    with pytest.raises(ValueError, match=message):
        partition_indices(np.repeat(np.arange(4), 25), _cfg(scheme, n, **kw), 0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_label_correlated_participation_works_on_every_scheme(scheme):
    labels = np.repeat([0, 1, 2], 40)
    parts = partition_indices(labels, _cfg(scheme, 4), 3)
    hist = label_histograms(labels, parts, 3)
    cfg = ExperimentConfig.from_flat(
        {
            "participation.model": "bernoulli",
            "participation.p-source": "label-correlated",
            "partition.num-partitions": 4,
        }
    ).participation
    env = build_participation(cfg, 4, 0, label_hist=hist)
    p = np.asarray(env.probabilities)
    assert p.shape == (4,) and ((p > 0) & (p <= 1)).all()


def test_flwr_datasets_redraw_warnings_become_one_fedpeft_line(caplog, recwarn):
    cfg = PartitionConfig(num_partitions=4, scheme="dirichlet", alpha=0.3, min_partition_size=10)
    with caplog.at_level("INFO", logger="fedpeft"):
        partition_indices(np.repeat([0, 1], 100), cfg, 0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "partition.min-partition-size=10" in lines[0] and "raise partition.alpha" in lines[0]
    assert not [w for w in recwarn if "min_partition_size" in str(w.message)]


def test_the_check_prints_each_clients_size_and_label_mix():
    hist = np.array([[25, 15], [0, 12], [3, 0]])
    assert label_mix(hist, ("neg", "pos"), max_clients=2) == (
        "label mix (neg/pos) per client: 0: 40 = 25/15, 1: 12 = 0/12, ... (1 more)"
    )


def test_a_scheme_setting_of_another_scheme_is_refused_and_unknown_schemes_list_the_choices():
    from fedpeft.check import Sources, check_settings

    file = {"partition.scheme": "shard", "partition.classes-per-client": 3}
    cfg = ExperimentConfig.from_flat(file)
    with pytest.raises(ConfigError, match="partition.classes-per-client=3 has no effect because partition.scheme"):
        check_settings(cfg, Sources(file=file, known=True))
    with pytest.raises(ConfigError, match="size-exponential"):
        ExperimentConfig.from_flat({"partition.scheme": "natural"})
