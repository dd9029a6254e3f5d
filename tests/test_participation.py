"""Participation models: seeded, pure, right rates, and replayable traces."""

import json

import numpy as np
import pytest

from fedpeft.config import PARTICIPATION, ConfigError, ExperimentConfig
from fedpeft.participation import (
    Always,
    Cyclic,
    Markov,
    Replay,
    Uniform,
    build_participation,
    load_trace,
    save_trace,
    trace,
)
from fedpeft.probabilities import build_probabilities, label_correlated_probabilities

P = [0.05, 0.2, 0.5, 0.9]
P_LIST = ",".join(str(p) for p in P)


def _model(kind: str, seed: int = 0, **kw):
    cfg = PARTICIPATION.build(model=kind, p_source="list", p_list=P_LIST, **kw)
    return build_participation(cfg, len(P), seed)


@pytest.mark.parametrize("kind", ["bernoulli", "markov", "cyclic"])
def test_the_same_seed_gives_the_same_trace_and_another_seed_a_different_one(kind):
    a, b, c = trace(_model(kind, 1), 300, 4), trace(_model(kind, 1), 300, 4), trace(_model(kind, 2), 300, 4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("kind", ["bernoulli", "markov", "cyclic"])
def test_online_is_a_pure_function_of_the_round_whatever_the_call_order(kind):
    forward = trace(_model(kind), 60, 4)
    backward_model = _model(kind)
    for t in range(60, 0, -1):
        assert backward_model.online(t) == [int(i) for i in np.flatnonzero(forward[t - 1])]


@pytest.mark.parametrize("kind,tol", [("bernoulli", 0.02), ("markov", 0.04), ("cyclic", 0.01)])
def test_the_empirical_rate_over_many_rounds_is_close_to_p(kind, tol):
    rates = trace(_model(kind), 20_000, 4).mean(axis=0)
    np.testing.assert_allclose(rates, P, atol=tol)


def test_every_model_returns_sorted_partition_ids_and_rounds_start_at_one():
    model = _model("bernoulli")
    for t in range(1, 50):
        ids = model.online(t)
        assert ids == sorted(ids) and all(isinstance(i, int) for i in ids)
    with pytest.raises(ValueError, match="rounds start at 1"):
        model.online(0)


def test_markov_rescales_both_transitions_when_the_off_probability_exceeds_one():
    # p = 0.02, a = 0.05: P(on->off) = 0.05 * 49 = 2.45 > 1, so up = 0.05 / 2.45, down = 1
    up, down = Markov(np.array([0.02, 0.5]), seed=0, rate=0.05).transitions
    np.testing.assert_allclose(up, [0.05 / 2.45, 0.05])
    np.testing.assert_allclose(down, [1.0, 0.05])
    # the stationary on-probability up / (up + down) is still p
    np.testing.assert_allclose(up / (up + down), [0.02, 0.5])


def test_cyclic_is_off_for_its_phase_then_on_round_l_p_rounds_then_off_the_rest():
    # L = 10, p = 0.3: on 3 rounds, off 7, first on at round phase + 1
    model = Cyclic(np.array([0.3]), seed=5, cycle_length=10)
    phase = int(model.phases[0])
    assert 0 <= phase < 7
    on = [t for t in range(1, 41) if model.online(t)]
    first = phase + 1
    assert on == [t for k in range(4) for t in range(first + 10 * k, first + 10 * k + 3) if t <= 40]


def test_label_correlated_p_is_the_floored_scaled_dot_product_of_label_mix_and_q():
    class FixedQ:
        def dirichlet(self, alpha):
            assert list(alpha) == [0.1, 0.1]
            return np.array([0.9, 0.1])

    hist = np.array([[10, 0], [0, 10], [5, 5], [40, 0]])
    p, q = label_correlated_probabilities(hist, mean=0.1, floor=0.02, alpha=0.1, rng=FixedQ())
    # C * mean * <mix, q> = 0.2 * [0.9, 0.1, 0.5, 0.9] = [0.18, 0.02, 0.10, 0.18]; floor 0.02
    np.testing.assert_allclose(p, [0.18, 0.02, 0.10, 0.18])
    np.testing.assert_allclose(q, [0.9, 0.1])
    p, _ = label_correlated_probabilities(hist, mean=0.5, floor=0.3, alpha=0.1, rng=FixedQ())
    np.testing.assert_allclose(p, [0.9, 0.3, 0.5, 0.9])  # 1.0 * mix @ q, floored at 0.3


@pytest.mark.parametrize("kind", ["bernoulli", "markov", "cyclic"])
def test_label_correlated_p_combines_with_every_heterogeneous_model(kind):
    hist = np.array([[30, 0], [0, 30], [15, 15], [29, 1], [2, 28]])
    cfg = PARTICIPATION.build(model=kind, p_source="label-correlated", p_mean=0.3)
    model = build_participation(cfg, 5, seed=3, label_hist=hist)
    np.testing.assert_allclose(model.probabilities, build_probabilities(cfg, 5, 3, hist))
    assert model.probabilities.min() >= 0.02 and model.probabilities.max() <= 1
    with pytest.raises(ValueError, match="label histograms"):
        build_participation(cfg, 5, seed=3)


def test_a_saved_trace_replays_identically_from_npz_and_from_results_json(tmp_path):
    model = _model("markov", 7)
    matrix = trace(model, 80, 4)
    path = save_trace(tmp_path / "t.npz", matrix, model.probabilities)
    replay = build_participation(PARTICIPATION.build(model="trace", trace_file=str(path)), 4, seed=99)
    np.testing.assert_array_equal(trace(replay, 80, 4), matrix)
    np.testing.assert_allclose(replay.probabilities, P)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"participation_trace": matrix.astype(int).tolist()}))
    loaded, probs = load_trace(results)
    np.testing.assert_array_equal(loaded, matrix)
    assert probs is None
    np.testing.assert_allclose(Replay(loaded).probabilities, matrix.mean(axis=0))
    with pytest.raises(ValueError, match="has 80 rounds"):
        replay.online(81)


def test_always_and_uniform_still_work_and_expose_their_rates():
    assert Always(3).online(5) == [0, 1, 2]
    uniform = Uniform(10, 0.3, 1, seed=0)
    assert len(uniform.online(4)) == 3 and uniform.online(4) == uniform.online(4)
    np.testing.assert_allclose(uniform.probabilities, 0.3)


def test_config_rejects_a_probability_list_of_the_wrong_length_or_range():
    with pytest.raises(ConfigError, match="participation.p-list"):
        ExperimentConfig.from_flat(
            {"participation.model": "bernoulli", "participation.p-source": "list", "participation.p-list": "0.5,0.5"}
        )
    with pytest.raises(ConfigError, match="participation.p-list"):
        ExperimentConfig.from_flat(
            {
                "partition.num-partitions": 2,
                "participation.model": "markov",
                "participation.p-source": "list",
                "participation.p-list": "0.5,0",
            }
        )
    with pytest.raises(ConfigError, match="participation.trace-file"):
        ExperimentConfig.from_flat({"participation.model": "trace"})
