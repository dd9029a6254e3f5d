"""Logit adjustment of the local loss against label skew (fedpeft/logit_adjust.py, ``train.logit-adjust``)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpeft.cohort import train_cohort
from fedpeft.config import ConfigError
from fedpeft.logit_adjust import PRIOR_FLOOR, adjusted, label_log_prior
from fedpeft.tasks import load_task
from tests.helpers import tiny_config
from tests.test_cohort import ROUND, UNEQUAL, backbone_dropout_off


def test_the_label_prior_is_the_client_s_own_frequencies_with_a_floor_for_an_absent_class():
    torch.testing.assert_close(label_log_prior(np.array([0, 0, 0, 1]), 2), torch.log(torch.tensor([0.75, 0.25])))
    got = label_log_prior(np.array([1, 1]), 3)  # classes 0 and 2 absent: floored, not -inf
    torch.testing.assert_close(got, torch.log(torch.tensor([PRIOR_FLOOR, 1.0, PRIOR_FLOOR])))
    with pytest.raises(ValueError, match="no rows"):
        label_log_prior(np.array([], dtype=np.int64), 2)


def test_the_adjusted_loss_of_a_two_class_toy_matches_the_hand_computed_value():
    log_prior = torch.log(torch.tensor([0.75, 0.25]))
    logits = torch.zeros(2, 2)  # the model is indifferent
    labels = torch.tensor([0, 1])

    per_row = F.cross_entropy(adjusted(logits, log_prior, 1.0), labels, reduction="none")

    # softmax([log .75, log .25]) = (.75, .25): the majority row costs -log .75, the minority row -log .25
    assert per_row.tolist() == pytest.approx([-math.log(0.75), -math.log(0.25)], abs=1e-6)
    # tau scales the offset: tau = 0 is plain cross-entropy, log 2 for both rows
    assert F.cross_entropy(adjusted(logits, log_prior, 0.0), labels, reduction="none").tolist() == pytest.approx(
        [math.log(2)] * 2, abs=1e-6
    )


def _bias_gradient(bias: list[float], tau: float) -> list[float]:
    """d(mean loss)/d(class biases) on a client batch of three class-0 rows and one class-1 row."""
    b = torch.tensor(bias, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1])
    log_prior = label_log_prior(labels.numpy(), 2)
    F.cross_entropy(adjusted(b.expand(4, 2), log_prior, tau), labels).backward()
    return b.grad.tolist()


def test_the_adjusted_gradient_pushes_towards_the_minority_class_where_plain_cross_entropy_pushes_away():
    # Plain CE at an indifferent model: mean(softmax - onehot) = (.5 - .75, .5 - .25), so a descent
    # step raises the majority class's bias: the local optimum is "predict my majority".
    assert _bias_gradient([0.0, 0.0], tau=0.0) == pytest.approx([-0.25, 0.25], abs=1e-6)
    # Adjusted: softmax(b + log prior) = prior at b = 0, so the balanced model is stationary.
    assert _bias_gradient([0.0, 0.0], tau=1.0) == pytest.approx([0.0, 0.0], abs=1e-6)
    # From a majority-biased model (b = (1, 0)), p0 = .75e / (.75e + .25) = 0.8908: the gradient is
    # (+0.1408, -0.1408), so descent lowers the majority's bias and raises the minority's.
    p0 = 0.75 * math.e / (0.75 * math.e + 0.25)
    assert _bias_gradient([1.0, 0.0], tau=1.0) == pytest.approx([p0 - 0.75, 0.75 - p0], abs=1e-6)
    assert p0 - 0.75 > 0.14


def test_logit_adjust_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="train.logit-adjust"):
        tiny_config(**{"train.logit-adjust": -1.0})
    with pytest.raises(ConfigError, match="spsa"):
        tiny_config(**{"train.logit-adjust": 1.0, "strategy.name": "spsa"})
    with pytest.raises(ConfigError, match="dp.mode='sample'"):
        tiny_config(**{"train.logit-adjust": 1.0, "dp.mode": "sample"})
    with pytest.raises(ConfigError, match="causal-lm"):
        tiny_config(**{"train.logit-adjust": 1.0, "task.kind": "causal-lm", "data.dataset": "embedded-dialog"})
    client_dp = {"train.logit-adjust": 1.0, "dp.mode": "client", "strategy.weighting": "uniform"}
    assert tiny_config(**client_dp).train.logit_adjust == 1.0


def test_batched_cohort_and_each_client_alone_train_on_the_same_adjusted_loss():
    """Task.local_update (the adjusted forward) and the batched cohort (per-row offsets) agree, and differ from tau 0."""
    sgd = {**UNEQUAL, "train.optimizer": "sgd", "train.lr": 0.5}
    task = load_task(tiny_config(**sgd, **{"train.logit-adjust": 1.0}))
    plain = load_task(tiny_config(**sgd))  # the same cached model: only the config differs
    jobs = [(task.initial_state, pid, ROUND) for pid in range(3)]
    priors = [np.bincount(task.partition(pid).labels, minlength=2) for pid in range(3)]
    assert any(abs(c[0] - c[1]) > 2 for c in priors), priors  # some client is skewed, so the offset matters

    with backbone_dropout_off(task.model):
        batched = train_cohort(task, jobs, batched=True)
        alone = [task.local_update(*job) for job in jobs]
        unadjusted = [plain.local_update(*job) for job in jobs]

    for (got_delta, got), (delta, want), (_, raw) in zip(batched, alone, unadjusted, strict=True):
        assert got.first_loss == pytest.approx(want.first_loss, rel=1e-5)
        assert got.mean_loss == pytest.approx(want.mean_loss, rel=1e-5)
        for name in delta:
            np.testing.assert_allclose(got_delta[name], delta[name], rtol=0, atol=1e-6, err_msg=name)
        assert abs(raw.first_loss - want.first_loss) > 1e-3  # the adjustment is on in both paths
