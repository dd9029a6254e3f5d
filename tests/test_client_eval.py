"""Per-client evaluation: each client's held-out rows, the evaluated clients, the summary (item 7)."""

import numpy as np
import pytest

from fedpeft.holdout import holdout_count, split_holdout
from strategies.client_eval import client_accuracy_summary, evaluation_partitions


def test_holdout_is_seeded_disjoint_and_covers_every_row():
    train, held = split_holdout(23, 0.2, seed=0, partition_id=4)
    assert len(held) == 5 and len(train) == 18  # round(0.2 x 23) = 5
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(23))
    again = split_holdout(23, 0.2, seed=0, partition_id=4)
    assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])
    assert not np.array_equal(held, split_holdout(23, 0.2, seed=0, partition_id=5)[1])
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)  # original row order kept


def test_holdout_keeps_at_least_one_row_on_each_side():
    assert holdout_count(2, 0.01) == 1 and holdout_count(2, 0.99) == 1 and holdout_count(10, 0.2) == 2
    with pytest.raises(ValueError, match="min-partition-size"):
        holdout_count(1, 0.2)


def test_summary_reports_mean_worst_tenth_and_spread_by_hand():
    acc = [0.9, 0.5, 0.7, 0.8, 0.6, 1.0, 0.4, 0.3, 0.95, 0.85, 0.2]  # 11 clients: worst ceil(1.1) = 2
    s = client_accuracy_summary(acc)
    assert s["client_accuracy_mean"] == pytest.approx(sum(acc) / 11)
    assert s["client_accuracy_worst10"] == pytest.approx((0.2 + 0.3) / 2)
    assert s["client_accuracy_std"] == pytest.approx(float(np.std(acc)))
    assert (s["client_accuracy_min"], s["client_accuracy_max"]) == (0.2, 1.0)
    assert client_accuracy_summary([0.5])["client_accuracy_worst10"] == 0.5


def test_evaluated_clients_are_a_seeded_fraction_drawn_per_round():
    first = evaluation_partitions(10, 0.3, seed=0, server_round=1)
    assert len(first) == 3 and first == evaluation_partitions(10, 0.3, seed=0, server_round=1)
    rounds = {tuple(evaluation_partitions(10, 0.3, seed=0, server_round=r)) for r in range(1, 8)}
    assert len(rounds) > 1
    assert evaluation_partitions(10, 0.01, seed=0, server_round=1).__len__() == 1
    assert evaluation_partitions(4, 1.0, seed=3, server_round=2) == [0, 1, 2, 3]
