"""Batched cohorts: K clients trained together equal each client trained alone."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from fedpeft import adapters
from fedpeft.cohort import batch_blocker, concat_batches, find_sites, train_batched, train_cohort
from fedpeft.grouped import Segments, grouped_chain
from fedpeft.rng import derive_seed
from fedpeft.tasks import load_task
from fedpeft.train import build_optimizer, forward_logits, train_local
from tests.helpers import tiny_config

# 3 clients of 18 / 17 / 13 examples, batch 8, one epoch: 3 / 3 / 2 steps whose last
# batches hold 2 / 1 / 5 rows, so segments are unequal and the last step has two clients.
UNEQUAL = {
    "data.num-train-examples": 48,
    "data.max-seq-len": 32,
    "train.batch-size": 8,
    "train.local-steps": 0,
    "train.local-epochs": 1,
}
ROUND = 2


def test_segments_place_each_client_s_rows_in_its_own_padded_block():
    seg = Segments.from_counts([2, 1, 3])

    assert seg.width == 3
    assert seg.client.tolist() == [0, 0, 1, 2, 2, 2]
    assert seg.slot.tolist() == [0, 1, 3, 6, 7, 8]  # client k's rows start at k * width
    assert Segments.from_counts([2, 2]).slot is None  # equal counts: a reshape, no padding


def test_grouped_chain_applies_each_row_s_own_client_factors():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # rows of clients 0, 0, 1
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (K=2, r=1, d=2): client 0 reads x0, client 1 reads x1
    b = torch.tensor([[[2.0], [3.0]], [[10.0], [-1.0]]])  # (K=2, d_out=2, r=1)

    out = grouped_chain(x, [a, b], Segments.from_counts([2, 1]))

    # client 0: x0 * (2, 3); client 1: x1 * (10, -1)
    assert out.tolist() == [[2.0, 3.0], [6.0, 9.0], [60.0, -6.0]]


def test_concat_batches_right_pads_tokens_with_the_pad_id_and_masks_them():
    short = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]]), "labels": torch.tensor([1])}
    long = {
        "input_ids": torch.tensor([[7, 8, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1]]),
        "labels": torch.tensor([0]),
    }

    out = concat_batches([short, long], pad_id=3)

    assert out["input_ids"].tolist() == [[5, 6, 3], [7, 8, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out["labels"].tolist() == [1, 0]


@contextlib.contextmanager
def backbone_dropout_off(model: nn.Module):
    """Every ``nn.Dropout`` at p = 0 (BERT's attention reads it too), restored on exit: the model is cached."""
    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    for module, _ in dropouts:
        module.p = 0.0
    try:
        yield model
    finally:
        for module, p in dropouts:
            module.p = p


@pytest.fixture(scope="module")
def lora_task():
    """The tiny LoRA task on NF4 with the backbone's dropout off."""
    task = load_task(tiny_config(**UNEQUAL))
    with backbone_dropout_off(task.model):
        yield task
    adapters.set_adapter_state(task.model, task.initial_state)  # the alone runs trained the cached model


def _train_alone(task, state, pid):
    """``Task.local_update``'s body, keeping the optimizer to read its state."""
    model, cfg = task.model, task.cfg
    adapters.set_adapter_state(model, state)
    optimizer = build_optimizer(model, cfg.train)
    loader = task.train_loader(task.partition(pid), ROUND, pid)
    result = train_local(
        model, loader, cfg.train, dropout_seed=derive_seed(cfg.seed, "dropout", ROUND, pid), optimizer=optimizer
    )
    delta = adapters.compute_delta(adapters.get_adapter_state(model), state)
    params = dict(model.named_parameters())
    moments = {n: {k: v.clone() for k, v in optimizer.state[params[n]].items()} for n in delta}
    return delta, result, moments


def _snapshot(task):
    model = task.model
    batch = next(iter(task.test_loader()))
    with torch.no_grad():
        logits = forward_logits(model, batch)
    return {
        "state": adapters.get_adapter_state(model),
        "logits": logits,
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        "training": model.training,
    }


def _alone_then_batched(task):
    start = task.initial_state
    alone = [_train_alone(task, start, pid) for pid in range(3)]
    before = _snapshot(task)
    clients = train_batched(task, [(start, pid, ROUND) for pid in range(3)])
    return alone, clients, before, _snapshot(task)


@pytest.fixture(scope="module")
def alone_and_batched(lora_task):
    """Each client trained alone (AdamW), then the three batched, with the model snapshotted around the batched run."""
    return _alone_then_batched(lora_task)


def test_a_lora_cohort_trains_batched_and_covers_every_trainable_tensor(lora_task):
    sites, reason = find_sites(lora_task.model)

    assert batch_blocker(lora_task, 3) == "" and reason == ""
    assert len(sites.lora) == 6 * 6 + 1  # q, k, v, attention-out, intermediate, output per layer + pooler
    assert sites.head is not None


def _assert_same_results(alone, clients) -> np.ndarray:
    """TrainResults equal; returns |delta difference| over every element of every client."""
    diffs = []
    for (delta, result, _), client in zip(alone, clients, strict=True):
        got_delta, got = client.result()
        assert (got.num_steps, got.num_examples) == (result.num_steps, result.num_examples)
        np.testing.assert_allclose(
            [got.mean_loss, got.first_loss, got.last_loss],
            [result.mean_loss, result.first_loss, result.last_loss],
            rtol=1e-5,
        )
        diffs += [np.abs(got_delta[name] - delta[name]).ravel() for name in delta]
    assert [c.result()[1].num_steps for c in clients] == [3, 3, 2]
    return np.concatenate(diffs)


def test_batched_cohort_gives_each_client_its_alone_sgd_delta_to_every_element(lora_task):
    task = load_task(tiny_config(**UNEQUAL, **{"train.optimizer": "sgd", "train.lr": 0.5}))
    with backbone_dropout_off(task.model):
        alone, clients, _, _ = _alone_then_batched(task)

    diffs = _assert_same_results(alone, clients)

    assert diffs.max() < 1e-6  # deltas reach 0.44; measured max difference 7e-8


def test_batched_cohort_gives_each_client_its_alone_adamw_delta_and_train_result(alone_and_batched):
    alone, clients, _, _ = alone_and_batched

    diffs = _assert_same_results(alone, clients)

    # Adam divides by sqrt(v): where a gradient element is ~0, an fp-level difference in it moves
    # that element's update by a fraction of lr (measured: 3 of 1,016,070 elements above 1e-5,
    # at most 1.3e-4, lr 1e-3). Everywhere else the deltas agree to 1e-5.
    assert (diffs > 1e-5).mean() < 1e-4
    assert diffs.max() < 0.5 * clients[0].optimizer.param_groups[0]["lr"]


def test_batched_cohort_keeps_each_client_s_own_adamw_state(alone_and_batched):
    alone, clients, _, _ = alone_and_batched

    for (_, _, moments), client in zip(alone, clients, strict=True):
        for name, want in moments.items():
            got = client.optimizer.state[client.params[name]]
            assert float(got["step"]) == float(want["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                scale = float(want[key].abs().max()) or 1.0  # measured worst: 8e-5 x scale
                np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-3 * scale, err_msg=f"{name} {key}")


def test_batched_cohort_leaves_the_cached_model_as_found(alone_and_batched):
    _, _, before, after = alone_and_batched

    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    for name, value in before["state"].items():
        np.testing.assert_array_equal(after["state"][name], value)
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0)


def test_padding_a_batch_to_a_longer_one_leaves_its_logits_unchanged(lora_task):
    first = next(iter(lora_task.test_loader()))
    longer = {k: v[:4] for k, v in first.items()}
    longer["input_ids"] = torch.cat([longer["input_ids"], longer["input_ids"]], dim=1)
    longer["attention_mask"] = torch.ones_like(longer["input_ids"])
    longer["token_type_ids"] = torch.zeros_like(longer["input_ids"])
    assert longer["input_ids"].shape[1] > first["input_ids"].shape[1]

    with torch.no_grad():
        alone = forward_logits(lora_task.model, first)
        padded = forward_logits(lora_task.model, concat_batches([first, longer], lora_task.tokenizer.pad_token_id))

    torch.testing.assert_close(padded[: len(alone)], alone, rtol=0, atol=1e-5)


def test_a_non_lora_cohort_trains_one_client_after_another_exactly_as_alone():
    task = load_task(tiny_config(**{"peft.method": "ia3", "train.local-steps": 1}))
    jobs = [(task.initial_state, pid, ROUND) for pid in (2, 0)]

    got = train_cohort(task, jobs)
    want = [task.local_update(state, pid, rnd) for state, pid, rnd in jobs]

    assert "peft.method='ia3'" in batch_blocker(task, 2)
    for (got_delta, got_result), (delta, result) in zip(got, want, strict=True):
        assert got_result == result
        for name in delta:
            np.testing.assert_array_equal(got_delta[name], delta[name])
    with pytest.raises(ValueError, match="peft.method='ia3'"):
        train_cohort(task, jobs, batched=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_four_client_cohort_trains_batched_on_cuda_like_each_client_alone():
    overrides = {**UNEQUAL, "data.num-train-examples": 64, "partition.num-partitions": 4}
    cfg = tiny_config(**overrides, **{"partition.min-partition-size": 4, "model.device": "cuda"})
    task = load_task(cfg.replace({"model.compute-dtype": "float32"}))
    jobs = [(task.initial_state, pid, ROUND) for pid in range(4)]  # 21 / 13 / 21 / 9 examples

    with backbone_dropout_off(task.model):
        got = train_cohort(task, jobs, batched=True)
        want = [task.local_update(*job) for job in jobs]

    for (got_delta, got_result), (delta, result) in zip(got, want, strict=True):
        assert got_result.num_steps == result.num_steps
        for name in delta:
            np.testing.assert_allclose(got_delta[name], delta[name], atol=1e-4, rtol=0, err_msg=name)
    bf16 = load_task(cfg.replace({"model.compute-dtype": "auto"}))
    for delta, result in train_cohort(bf16, jobs, batched=True):
        assert np.isfinite(result.mean_loss) and all(np.isfinite(v).all() for v in delta.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cohort_too_large_for_the_gpu_trains_in_halves_and_loses_no_client(caplog):
    cfg = tiny_config(**{"model.device": "cuda", "train.batch-size": 32, "train.local-steps": 1})
    task = load_task(cfg)
    jobs = [(task.initial_state, pid % 3, ROUND) for pid in range(64)]
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    # Leave room for ~16 clients' activations: 64 at once cannot fit, smaller halves can.
    hog = torch.empty(max(free - 16 * 64 * 2**20, 0), dtype=torch.uint8, device="cuda")
    try:
        with caplog.at_level("WARNING", logger="fedpeft.cohort"):
            results = train_cohort(task, jobs, batched=True)
    finally:
        del hog
        torch.cuda.empty_cache()

    assert "ran out of device memory" in caplog.text
    assert len(results) == 64 and all(r.num_steps == 1 for _, r in results)
