"""Ladder Side-Tuning on the causal LM (tiny random Llama): sizes, round 0, stored activations, export, check."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedpeft import adapters
from fedpeft.config import ConfigError, PeftConfig
from fedpeft.lm_batches import response_loss
from fedpeft.lst_lm_build import plan_lm
from fedpeft.lst_store import ActivationStore
from fedpeft.tasks import load_task
from tests.lm_helpers import tiny_lm_config

# SmolLM2-135M's shapes (its config.json): no weight is read to plan the side network.
SMOLLM2 = SimpleNamespace(
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    num_hidden_layers=30,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return load_task(tiny_lm_config(**{"peft.method": "lst", "out-dir": str(tmp_path_factory.mktemp("lst-lm"))}))


def _batch(task, n: int = 6):
    batch = next(iter(task.train_loader(task.client_rows(0), 1, 0)))
    return {k: v[:n] for k, v in batch.items()}


def _loss_and_grads(model, logits_fn, batch):
    model.zero_grad(set_to_none=True)
    loss = response_loss(logits_fn(batch), batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_side_network_sizes_are_hand_counted_on_smollm2_and_the_tiny_llama(task):
    # SmolLM2, r = 8, every 3rd layer (10 of 30, ending at 29): width 72, head dim 8 (4 rotary pairs), SwiGLU 192.
    plan = plan_lm(PeftConfig(method="lst", lst_every=3), SMOLLM2)
    assert plan.layers == tuple(range(2, 30, 3))
    block = 72 * 72 + 2 * 72 * 24 + 72 * 72 + 3 * 72 * 192 + 2 * 72  # q, k, v, o, gate/up/down, two RMSNorms
    assert block == plan.block_params() == 55_440
    ladders = 11 * (576 * 72 + 72)  # embeddings + 10 layers
    assert plan.num_params() == ladders + 10 * (block + 1) + 72 + 72 * 576 == 1_052_938
    assert plan.bytes_per_token() == 11 * 576 * 4  # 25,344 B per stored token
    # Every layer would train more than LoRA r = 8 on every linear of SmolLM2 (2,442,240): hence lst-every.
    assert plan_lm(PeftConfig(method="lst"), SMOLLM2).num_params() == 31 * 41_544 + 30 * 55_441 + 41_544 > 2_442_240
    # The tiny Llama (hidden 64, 4 heads / 2 kv heads of 16, SwiGLU 128, 2 layers): width 8, head dim 2.
    tiny = 3 * (64 * 8 + 8) + 2 * ((8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16 + 16) + 1) + 8 + 8 * 64
    state = adapters.get_adapter_state(task.model)
    assert sum(a.size for a in state.values()) == tiny == 3_266
    assert sum(a.nbytes for a in state.values()) == 4 * 3_266  # what travels each way per client-round
    assert all(n.startswith("side.") for n in state) and not any(
        p.requires_grad for p in task.model.backbone.parameters()
    )


def test_round_zero_predicts_what_the_backbone_predicts_and_only_the_side_network_gets_gradients(task):
    batch = _batch(task)
    model = task.model
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], base[real], rtol=0, atol=1e-5)  # up-projection starts at zero
    _, grads = _loss_and_grads(model, lambda b: model(b["input_ids"], b["attention_mask"]).logits, batch)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert set(grads) == {f"{n}" for n in adapters.get_adapter_state(model)}
    assert grads["side.up.weight"].abs().sum() > 0 and all(torch.isfinite(g).all() for g in grads.values())


def test_stored_ladder_inputs_give_bitwise_equal_response_loss_and_gradients_to_recomputing(task):
    model, batch = task.model, _batch(task)
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]  # rows of unequal length
    store = ActivationStore(max_bytes=2**30)
    first = _loss_and_grads(model, store.logits_fn(model), batch)
    stored = _loss_and_grads(model, store.logits_fn(model), batch)
    assert (store.misses, store.hits, len(store)) == (6, 6, 6)
    recomputed = _loss_and_grads(model, lambda b: model(b["input_ids"], b["attention_mask"]).logits, batch)
    for other in (stored, recomputed):
        assert torch.equal(first[0], other[0])
        assert all(torch.equal(first[1][n], other[1][n]) for n in first[1])
    # One stored example: (embeddings + 2 layers) x its tokens x hidden 64, fp32.
    lengths = batch["attention_mask"].sum(1)
    assert store.nbytes == int(lengths.sum()) * 3 * 64 * 4


def test_a_clients_second_round_reads_the_store_and_training_lowers_the_response_loss(task):
    model = task.model
    delta, first = task.local_update(task.initial_state, 1, 1)
    store = task.lst_store(1)
    assert len(store) == len(task.client_rows(1)) and store.path.is_file()
    misses = store.misses
    state = adapters.apply_delta(task.initial_state, delta)
    _, second = task.local_update(state, 1, 2)
    assert store.misses == misses  # the second round ran the side network only
    rows = task.train_loader(task.client_rows(1), 9, 1)
    adapters.set_adapter_state(model, task.initial_state)
    before = task.evaluate(task.initial_state, rows)["loss"]
    after = task.evaluate(state, rows)["loss"]
    assert after < before and first.num_steps == 2


def test_export_reloads_to_the_same_logits_and_generation_and_merging_is_refused(task, tmp_path):
    from fedpeft.lm_export import export_lm_adapter, export_merged, generate_text, load_lm_export

    model = task.model
    with torch.no_grad():  # a trained-looking side network: nonzero up-projection
        model.side.up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    out = export_lm_adapter(model, task.tokenizer, tmp_path / "adapter", task.cfg)
    assert (out / "lst_side.safetensors").is_file() and (out / "fedpeft_model.json").is_file()
    loaded, tokenizer = load_lm_export(out)
    batch = _batch(task, 3)
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"]).logits
        b = loaded(batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(a, b)
    reply = generate_text(loaded, tokenizer, "Is this review positive?", max_new_tokens=3)
    assert reply == generate_text(model, task.tokenizer, "Is this review positive?", max_new_tokens=3)
    with pytest.raises(ConfigError, match="cannot be merged"):
        export_merged(out, tmp_path / "merged")
    adapters.set_adapter_state(model, task.initial_state)


def test_evaluation_scores_labels_and_greedy_replies_through_the_side_network(task):
    scores = task.evaluate(task.initial_state)
    assert scores["num_examples"] == 24 and 0 <= scores["accuracy"] <= 1
    assert len(scores["generations"]) == 2 and all(isinstance(g["reply"], str) for g in scores["generations"])


def test_fedpeft_check_shows_trainable_bytes_and_store_per_example_and_refuses_bad_layers():
    from fedpeft.check import check_experiment

    text = check_experiment(tiny_lm_config(**{"peft.method": "lst"})).text()
    assert "3,266" in text and "13,064" in text  # trainable, payload bytes each way
    assert "store <= 72 KB per example at data.max-seq-len=96 (768 bytes per token)" in text
    with pytest.raises(ConfigError, match="must include the last layer 1"):
        check_experiment(tiny_lm_config(**{"peft.method": "lst", "peft.lst-layers": "0"}))
    with pytest.raises(ConfigError, match="head_dim / r must be even"):
        check_experiment(tiny_lm_config(**{"peft.method": "lst", "peft.lst-reduction": 16}))
