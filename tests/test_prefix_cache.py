"""The frozen-prefix cache on the real embedded backbone (NF4 MiniLM): same loss, same gradients."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft import adapters, data, prefix_cache
from fedpeft.tasks import load_task
from fedpeft.train import forward_logits
from tests.helpers import tiny_config

TOP_ONLY = {
    "lora-layers-4-5": {"peft.layers": "4,5"},
    "lora-layers-4-5-mean": {"peft.layers": "4,5", "model.pooling": "mean"},
    "head": {"peft.method": "head"},
    "head-mean": {"peft.method": "head", "model.pooling": "mean"},
}


@pytest.fixture(autouse=True)
def fresh_stores():
    """Every test starts from empty process-wide stores (they are shared by equal prefixes)."""
    prefix_cache.clear_stores()
    yield
    prefix_cache.clear_stores()


@contextmanager
def dropout_off(model: nn.Module):
    """Train mode with every dropout probability at 0, so two forwards can be compared exactly."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    model.train()
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p
        model.eval()


def loss_and_grads(model: nn.Module, batch: dict, logits_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(logits_fn(batch).float(), batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("overrides", list(TOP_ONLY.values()), ids=list(TOP_ONLY))
def test_cached_loss_and_every_gradient_equal_the_full_forward(overrides):
    task = load_task(tiny_config(**overrides))
    model, cache = task.model, task.model.fedpeft_prefix_cache
    cache.clear()
    rows = task.partition(0)
    # Fill the cache from batches of another size (other padding), so the check covers reuse.
    for batch in data.build_loader(rows, task.tokenizer, max_seq_len=64, batch_size=5, shuffle=False):
        cache.hidden_states(batch)
    assert len(cache) == len(rows) and cache.misses == len(rows)
    batch = next(iter(task.train_loader(rows, 1, 0)))
    with dropout_off(model):
        full_loss, full_grads = loss_and_grads(model, batch, lambda b: forward_logits(model, b))
        cached_loss, cached_grads = loss_and_grads(model, batch, task.logits_fn())
    assert cache.hits == batch["labels"].shape[0]
    torch.testing.assert_close(cached_loss, full_loss, atol=1e-5, rtol=1e-5)
    assert cached_grads.keys() == full_grads.keys() == set(adapters.trainable_names(model))
    for name, grad in full_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_first_trainable_layer_is_what_the_peft_method_touches():
    assert prefix_cache.first_trainable_layer(load_task(tiny_config(**{"peft.layers": "4,5"})).model) == 4
    assert prefix_cache.first_trainable_layer(load_task(tiny_config(**{"peft.layers": "2,5"})).model) == 2
    assert prefix_cache.first_trainable_layer(load_task(tiny_config(**{"peft.method": "head"})).model) == 6
    for method in ("lora", "bitfit", "prompt"):  # every layer, embedding biases, virtual tokens
        task = load_task(tiny_config(**{"peft.method": method}))
        assert prefix_cache.first_trainable_layer(task.model) == 0, method
        assert task.model.fedpeft_prefix_cache is None and task.logits_fn() is None


def test_auto_leaves_lora_on_every_layer_exactly_as_before():
    auto, off = tiny_config(), tiny_config(**{"train.prefix-cache": "off"})
    deltas = []
    for cfg in (auto, off):
        task = load_task(cfg)
        deltas.append(task.local_update(task.initial_state, 0, 1)[0])
    assert deltas[0].keys() == deltas[1].keys()
    assert all(np.array_equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


def test_off_and_left_padding_run_the_full_forward():
    task = load_task(tiny_config(**{"peft.layers": "4,5", "train.prefix-cache": "off"}))
    assert task.model.fedpeft_prefix_cache is not None and task.logits_fn() is None
    cache = task.model.fedpeft_prefix_cache
    batch = next(iter(task.train_loader(task.partition(0), 1, 0)))
    flipped = {k: v.flip(1) for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="right-padded"):
        cache.logits(flipped)


def test_a_full_cache_stops_storing_but_keeps_the_logits():
    task = load_task(tiny_config(**{"peft.method": "head"}))
    bounded = prefix_cache.PrefixCache(task.model, 6, max_bytes=0)
    batch = next(iter(task.train_loader(task.partition(0), 1, 0)))
    with torch.no_grad():
        torch.testing.assert_close(bounded.logits(batch), forward_logits(task.model, batch), atol=1e-5, rtol=1e-5)
    assert len(bounded) == 0 and bounded.nbytes == 0


def test_a_cached_state_does_not_depend_on_the_batch_it_first_arrived_in():
    task = load_task(tiny_config(**{"peft.layers": "4,5"}))
    rows = task.partition(2)
    stored = []
    for batch_size in (3, 16):
        prefix_cache.clear_stores()  # each pass computes every state itself
        cache = prefix_cache.PrefixCache(task.model, 4)
        for batch in data.build_loader(rows, task.tokenizer, max_seq_len=64, batch_size=batch_size, shuffle=True):
            cache.hidden_states(batch)
        assert cache.misses == len(rows)
        stored.append(dict(cache._states))
    assert stored[0].keys() == stored[1].keys()
    for key, state in stored[0].items():
        assert torch.equal(state, stored[1][key])


def test_models_with_the_same_frozen_prefix_share_one_store_and_a_changed_prefix_does_not():
    # Two seeds: different adapters and heads, the same frozen embeddings + layers 0-3.
    first = load_task(tiny_config(**{"peft.layers": "4,5", "seed": 0}))
    second = load_task(tiny_config(**{"peft.layers": "4,5", "seed": 1}))
    assert first.model is not second.model
    a, b = first.model.fedpeft_prefix_cache, second.model.fedpeft_prefix_cache
    batch = next(iter(first.train_loader(first.partition(0), 1, 0)))
    states = a.hidden_states(batch)
    a.misses = b.misses = b.hits = 0
    torch.testing.assert_close(b.hidden_states(batch), states, atol=0, rtol=0)
    assert b.misses == 0 and b.hits == batch["input_ids"].shape[0]
    # A prefix that differs in one layer (k = 5 includes layer 4) is keyed apart.
    assert prefix_cache.PrefixCache(first.model, 5)._states is not a._states
    with torch.no_grad():
        weight = first.model.get_base_model().base_model.embeddings.LayerNorm.weight
        saved = weight.clone()
        weight.add_(1.0)
        try:
            assert prefix_cache.PrefixCache(first.model, 4)._states is not a._states
        finally:
            weight.copy_(saved)
    assert prefix_cache.PrefixCache(first.model, 4)._states is a._states


def test_local_training_through_the_cache_fills_it_once_per_example_and_lowers_the_loss(fresh_task):
    cfg = tiny_config(**{"peft.layers": "4,5", "train.local-steps": 6, "train.lr": 3e-3})
    task = fresh_task(cfg)
    cache = task.model.fedpeft_prefix_cache
    cache.clear()
    cache.hits = cache.misses = 0
    rows = task.partition(1)
    before = task.evaluate(task.initial_state, task.train_loader(rows, 0, 1))["loss"]
    delta, result = task.local_update(task.initial_state, 1, 1)
    after = task.evaluate(adapters.apply_delta(task.initial_state, delta), task.train_loader(rows, 0, 1))["loss"]
    assert len(cache) == cache.misses == len(rows)
    assert result.num_steps == 6 and after < before, (before, after)


def test_opacus_per_sample_gradients_are_the_same_through_the_cache(fresh_task):
    from fedpeft.privacy import dp_sgd
    from fedpeft.train import build_optimizer

    cfg = tiny_config(**{"peft.layers": "4,5", "train.optimizer": "sgd", "train.lr": 1.0})
    task = fresh_task(cfg)
    loader = task.train_loader(task.partition(0), 1, 0)
    batch = next(iter(loader))
    states = []
    for logits_fn in (lambda b: forward_logits(task.model, b), task.logits_fn()):
        adapters.set_adapter_state(task.model, task.initial_state)
        optimizer = build_optimizer(task.model, cfg.train)
        with (
            dp_sgd(
                task.model,
                optimizer,
                loader,
                noise_multiplier=0.0,
                clip_norm=0.01,
                noise_seed=0,
                sampling_seed=0,
                poisson=False,
            ) as session,
            dropout_off(task.model),
        ):
            session.optimizer.zero_grad()
            F.cross_entropy(logits_fn(batch), batch["labels"]).backward()
            session.optimizer.step()
        states.append(adapters.get_adapter_state(task.model))
    moved = [k for k in states[0] if not np.array_equal(states[0][k], task.initial_state[k])]
    assert moved, "the clipped step changed nothing"
    for key in states[0]:
        np.testing.assert_allclose(states[1][key], states[0][key], atol=1e-6, err_msg=key)
