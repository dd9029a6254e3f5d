"""FedProx's proximal term and SCAFFOLD's control variates in the local update (fedpeft/drift.py)."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedpeft.adapters import set_adapter_state
from fedpeft.config import ConfigError
from fedpeft.drift import (
    SCAFFOLD_C_KEY,
    SCAFFOLD_CI_STATE,
    DriftCorrection,
    gradient_hook,
    scaffold_client_update,
)
from fedpeft.records import record_to_state, state_to_record
from fedpeft.tasks import load_task
from simulations.drift_client import drift_terms
from tests.helpers import tiny_config


def _linear_loss(w: torch.Tensor) -> torch.Tensor:
    # d/dw sum(w * M) = M: a gradient known by hand
    return (w * torch.tensor([[1.0, 0.0], [0.0, 1.0]])).sum()


def test_proximal_term_adds_mu_times_the_distance_to_the_global_state_to_each_gradient():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    anchor = {"w": np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32)}
    hook = gradient_hook({"w": w}, anchor, DriftCorrection(prox_mu=0.5))
    _linear_loss(w).backward()
    hook()
    # g + mu (w - w0) = [[1, 0], [0, 1]] + 0.5 [[1, 2], [2, 3]]
    assert w.grad.tolist() == [[1.5, 1.0], [1.0, 2.5]]
    # the same as autograd through F(w) + mu/2 ||w - w0||^2
    v = torch.nn.Parameter(w.detach().clone())
    (_linear_loss(v) + 0.25 * ((v - torch.as_tensor(anchor["w"])) ** 2).sum()).backward()
    assert torch.equal(w.grad, v.grad)


def test_scaffold_correction_adds_c_minus_c_i_and_reaches_unused_tensors():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    unused = torch.nn.Parameter(torch.tensor([5.0]))
    control = {"w": np.array([0.25, -0.5], dtype=np.float32), "unused": np.array([2.0], dtype=np.float32)}
    hook = gradient_hook({"w": w, "unused": unused}, {}, DriftCorrection(control=control))
    (w * torch.tensor([3.0, 4.0])).sum().backward()
    hook()
    assert w.grad.tolist() == [3.25, 3.5]
    assert unused.grad.tolist() == [2.0]


def test_an_inactive_correction_installs_no_hook():
    w = torch.nn.Parameter(torch.zeros(2))
    assert gradient_hook({"w": w}, {"w": np.zeros(2, np.float32)}, DriftCorrection(prox_mu=0.0)) is None


def test_scaffold_option_two_control_update_by_hand():
    # c_i+ = c_i - c - delta / (K lr) = 1 - 0.5 + 0.2 / (2 * 0.1) = 1.5;  delta c_i = 0.5
    c_i = {"w": np.array([1.0, 0.0], np.float32)}
    c = {"w": np.array([0.5, 0.25], np.float32)}
    delta = {"w": np.array([-0.2, 0.1], np.float32)}
    new, delta_c = scaffold_client_update(c_i, c, delta, num_steps=2, lr=0.1)
    np.testing.assert_allclose(new["w"], [1.5, -0.75], rtol=1e-6)
    np.testing.assert_allclose(delta_c["w"], [0.5, -0.75], rtol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        scaffold_client_update(c_i, c, delta, num_steps=0, lr=0.1)


def test_client_control_variate_starts_at_zero_and_persists_in_node_state():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    c = {"w": np.array([0.5, 0.25], np.float32)}
    content = RecordDict({"config": ConfigRecord({"prox-mu": 0.0}), SCAFFOLD_C_KEY: state_to_record(c)})
    correction, scaffold = drift_terms(content, context)
    np.testing.assert_array_equal(correction.control["w"], [0.5, 0.25])  # c - 0
    assert correction.prox_mu == 0.0
    delta_c = scaffold.finish(context, {"w": np.array([-0.2, 0.1], np.float32)}, num_steps=2, lr=0.1)
    np.testing.assert_allclose(delta_c["w"], [0.5, -0.75], rtol=1e-6)  # -c - delta / (K lr)
    stored = record_to_state(context.state.array_records[SCAFFOLD_CI_STATE])
    np.testing.assert_allclose(stored["w"], [0.5, -0.75], rtol=1e-6)
    correction, _ = drift_terms(content, context)  # next round: c - c_i
    np.testing.assert_allclose(correction.control["w"], [0.0, 1.0], rtol=1e-6)
    plain = RecordDict({"config": ConfigRecord({"server-round": 1})})
    assert drift_terms(plain, context) == (None, None)


def _delta(cfg, correction):
    task = load_task(cfg)
    set_adapter_state(task.model, task.initial_state)
    delta, result = task.local_update(task.initial_state, 0, 1, correction=correction)
    set_adapter_state(task.model, task.initial_state)
    return delta, result


def test_fedprox_with_mu_zero_is_bit_identical_and_a_large_mu_keeps_the_client_near_the_global_state():
    cfg = tiny_config(**{"peft.method": "head", "train.local-steps": 6, "train.optimizer": "sgd", "train.lr": 0.5})
    plain, _ = _delta(cfg, None)
    zero, _ = _delta(cfg, DriftCorrection(prox_mu=0.0))
    assert all(np.array_equal(plain[k], zero[k]) for k in plain)
    near, result = _delta(cfg, DriftCorrection(prox_mu=1.5))
    norm = lambda d: float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in d.values())))  # noqa: E731
    assert result.num_steps == 6
    # with SGD each step contracts the distance by (1 - lr mu) = 0.25: the delta shrinks a lot
    assert norm(near) < 0.6 * norm(plain), (norm(near), norm(plain))


def test_drift_settings_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="train.prox-mu"):
        tiny_config(**{"train.prox-mu": -0.1})
    with pytest.raises(ConfigError, match="dp.mode='sample'"):
        tiny_config(**{"train.prox-mu": 0.1, "dp.mode": "sample"})
    with pytest.raises(ConfigError, match="train.optimizer"):
        tiny_config(**{"strategy.control-variates": "scaffold"})
    with pytest.raises(ConfigError, match="unclipped"):
        tiny_config(
            **{
                "strategy.control-variates": "scaffold",
                "train.optimizer": "sgd",
                "dp.mode": "client",
                "strategy.weighting": "uniform",
            }
        )
    with pytest.raises(ConfigError, match="spsa"):
        tiny_config(**{"train.prox-mu": 0.1, "strategy.name": "spsa"})


def test_the_server_part_adds_nothing_to_any_message_or_checkpoint_when_off():
    from strategies.client_drift import ClientDrift

    state = {"w": np.ones(3, np.float32)}
    off = ClientDrift(num_clients=3)
    assert not off.active and off.train_config() == {} and off.train_arrays(state) == {}
    assert off.after_round([]) == {} and off.checkpoint_state() == ({}, {})
    prox = ClientDrift(prox_mu=0.5, num_clients=3)
    assert prox.train_config() == {"prox-mu": 0.5} and prox.train_arrays(state) == {}


def test_the_server_control_variate_moves_by_the_sum_of_client_changes_over_n_by_hand():
    from strategies.client_drift import ClientDrift

    part = ClientDrift(scaffold=True, num_clients=4)
    sent = part.train_arrays({"w": np.ones(2, np.float32)})
    assert record_to_state(sent[SCAFFOLD_C_KEY])["w"].tolist() == [0.0, 0.0]
    part.after_round([{"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([3.0, -2.0], np.float32)}])
    assert part.c["w"].tolist() == [1.0, 0.0]  # (1 + 3) / 4, (2 - 2) / 4
    meta, arrays = part.checkpoint_state()
    again = ClientDrift(scaffold=True, num_clients=4)
    again.restore_state(meta, arrays)
    assert again.c["w"].tolist() == [1.0, 0.0]
