"""Ladder Side-Tuning on the real (NF4) MiniLM: what trains, what travels, stored activations, export."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedpeft import adapters
from fedpeft.check import Sources, check_settings
from fedpeft.config import ConfigError, PeftConfig
from fedpeft.lst import LSTPlan, chosen_layers, plan_lst
from fedpeft.lst_prune import _top, dense_weight
from fedpeft.lst_store import ActivationStore, store_fingerprint
from fedpeft.tasks import load_task
from fedpeft.train import forward_logits
from tests.helpers import tiny_config

MINILM = {"hidden": 384, "heads": 12, "intermediate": 1536, "num_layers": 6}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return load_task(tiny_config(**{"peft.method": "lst", "out-dir": str(tmp_path_factory.mktemp("lst-run"))}))


def _loss_and_grads(model, logits_fn, batch):
    model.zero_grad(set_to_none=True)
    logits = logits_fn(batch)
    loss = F.cross_entropy(logits, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_side_network_size_on_minilm_is_hand_counted():
    plan = plan_lst(PeftConfig(method="lst"), **MINILM)
    # width 48, head dim 4, feed-forward 192; 7 ladders (embeddings + 6 layers)
    block = 4 * (48 * 48 + 48) + (48 * 192 + 192) + (192 * 48 + 48) + 4 * 48  # 28,272
    assert (plan.side_hidden, plan.side_head_dim, plan.side_intermediate) == (48, 4, 192)
    assert plan.num_params(2) == 7 * (384 * 48 + 48) + 6 * (block + 1) + 48 * 2 + 2 == 299_096
    assert plan.bytes_per_token() == 7 * 384 * 4


def test_only_the_side_network_trains_and_travels_with_exact_bytes(task):
    state = adapters.get_adapter_state(task.model)
    assert all(name.startswith("side.") for name in state)
    assert not any(p.requires_grad for p in task.model.backbone.parameters())
    assert sum(a.size for a in state.values()) == 299_096
    assert sum(a.nbytes for a in state.values()) == 4 * 299_096  # what the byte ledger counts per direction
    gates = [n for n in state if ".gates." in n]
    assert len(gates) == 6 and all(state[n].shape == (1,) for n in gates)


def test_no_gradient_reaches_the_backbone_and_every_side_tensor_gets_one(task):
    batch = next(iter(task.test_loader()))
    _, grads = _loss_and_grads(task.model, lambda b: forward_logits(task.model, b), batch)
    assert all(p.grad is None for p in task.model.backbone.parameters())
    assert set(grads) == set(adapters.get_adapter_state(task.model))
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["side.gates.5.alpha"].abs().item() > 0


def test_stored_activations_give_bitwise_equal_loss_and_gradients_to_recomputing(task, caplog):
    batch = next(iter(task.test_loader()))
    batch = {k: v[:8] for k, v in batch.items()}
    model = task.model
    store = ActivationStore(max_bytes=2**30)
    first = _loss_and_grads(model, store.logits_fn(model), batch)  # fills the store
    assert store.misses == 8 and len(store) == 8
    stored = _loss_and_grads(model, store.logits_fn(model), batch)
    assert store.hits == 8
    recomputed = _loss_and_grads(model, lambda b: forward_logits(model, b), batch)
    with caplog.at_level(logging.WARNING, logger="fedpeft.lst_store"):
        full = ActivationStore(max_bytes=0)
        over_budget = _loss_and_grads(model, full.logits_fn(model), batch)
    assert "is full" in caplog.text and len(full) == 0 and full.skipped == 8
    for other in (stored, recomputed, over_budget):
        assert torch.equal(first[0], other[0])
        assert all(torch.equal(first[1][n], other[1][n]) for n in first[1])


def test_the_store_round_trips_through_its_file_and_reports_bytes_per_example(task, tmp_path):
    batch = next(iter(task.test_loader()))
    model = task.model
    fp = store_fingerprint(task.cfg.model, model.side.plan.layers)
    store = ActivationStore(max_bytes=2**30, path=tmp_path / "c.safetensors", fingerprint=fp)
    logits = store.logits_fn(model)(batch).detach()
    store.save()
    tokens = int(batch["attention_mask"].sum())
    assert store.nbytes == tokens * model.side.plan.bytes_per_token()
    assert store.bytes_per_example == store.nbytes / batch["input_ids"].shape[0]
    again = ActivationStore(max_bytes=2**30, path=tmp_path / "c.safetensors", fingerprint=fp)
    assert len(again) == len(store) and again.nbytes == store.nbytes
    assert torch.equal(again.logits_fn(model)(batch).detach(), logits) and again.misses == 0
    other = ActivationStore(max_bytes=2**30, path=tmp_path / "c.safetensors", fingerprint="another")
    assert len(other) == 0  # a file written for another backbone is ignored


def test_a_clients_second_round_reads_its_stored_activations_from_the_run_folder(task):
    from fedpeft import lst_store

    state = task.initial_state
    lst_store.clear_stores()  # as on another Ray actor: nothing in memory
    task.local_update(state, 1, 1)
    files = list(Path(task.cfg.out_dir).rglob("client-1.safetensors"))
    assert len(files) == 1
    lst_store.clear_stores()
    store = task.lst_store(1)
    assert len(store) == len(task.partition(1))
    task.local_update(state, 1, 2)
    assert store.misses == 0 and store.hits > 0


def test_local_training_lowers_the_loss_on_real_data(task):
    cfg = task.cfg.replace({"train.local-steps": 12, "train.lr": 0.003})
    from fedpeft.train import train_local

    loader = task.train_loader(task.partition(0), 1, 0)
    adapters.set_adapter_state(task.model, task.initial_state)
    result = train_local(
        task.model, loader, cfg.train, dropout_seed=0, logits_fn=task.lst_store(0).logits_fn(task.model)
    )
    adapters.set_adapter_state(task.model, task.initial_state)
    assert result.last_loss < result.first_loss - 0.05


def test_side_blocks_start_as_the_backbone_layers_pruned_by_l1_norm(task):
    side, layer = task.model.side, task.model.backbone.base_model.encoder.layer[0]
    stream = side.ladders[0].weight.argmax(1)  # the ladders start as the selection of the kept dimensions
    assert torch.equal(side.ladders[0].weight.sum(1), torch.ones(48))
    q = dense_weight(layer.attention.self.query)
    kept_rows = [int(torch.nonzero(torch.isclose(q[:, stream], r).all(1))[0]) for r in side.blocks[0].query.weight]
    assert all(r // 32 == i // 4 for i, r in enumerate(kept_rows))  # head h keeps 4 of its own 32 dims
    assert _top(torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0]), 2).tolist() == [2, 4]


def test_export_and_reload_give_the_same_logits(task, tmp_path):
    adapters.export_adapter(task.model, tmp_path / "adapter", task.cfg.peft, task.cfg.model)
    assert (tmp_path / "adapter" / "lst_side.safetensors").is_file()
    reloaded = adapters.load_exported_model(tmp_path / "adapter", num_labels=2)
    batch = next(iter(task.test_loader()))
    with torch.no_grad():
        assert torch.equal(forward_logits(task.model, batch), forward_logits(reloaded, batch))


def test_every_kth_layer_ends_at_the_last_and_bad_layers_or_reductions_are_refused():
    assert chosen_layers(PeftConfig(method="lst", lst_every=2), 6) == (1, 3, 5)
    assert chosen_layers(PeftConfig(method="lst", lst_layers="5,0"), 6) == (0, 5)
    with pytest.raises(ConfigError, match=r"peft.lst-layers \[6\].*0..5"):
        chosen_layers(PeftConfig(method="lst", lst_layers="2,6"), 6)
    with pytest.raises(ConfigError, match=r"lst-reduction=5 must divide.*valid: \[1, 2, 4, 8, 16, 32\]"):
        plan_lst(PeftConfig(method="lst", lst_reduction=5), **MINILM)
    assert isinstance(plan_lst(PeftConfig(method="lst", lst_reduction=32), **MINILM), LSTPlan)


def test_bad_lst_settings_are_refused_before_anything_starts():
    with pytest.raises(ConfigError, match=r"train.lst-store-mb.*> 0 with peft.method='lst'"):
        tiny_config(**{"peft.method": "lst", "train.lst-store-mb": 0})
    with pytest.raises(ConfigError, match="strategy.name"):
        tiny_config(**{"peft.method": "lst", "strategy.name": "spsa"})
    cfg = tiny_config(**{"peft.method": "lst", "peft.target-modules": "query"})
    sources = Sources({"peft.method": "lst", "peft.target-modules": "query"}, known=True)
    with pytest.raises(ConfigError, match="peft.target-modules='query' has no effect because peft.method='lst'"):
        check_settings(cfg, sources)
    lora = tiny_config(**{"peft.lst-reduction": 4})
    with pytest.raises(ConfigError, match="peft.lst-reduction=4 has no effect"):
        check_settings(lora, Sources({"peft.lst-reduction": 4}, known=True))


def test_fedpeft_check_counts_the_side_network_and_estimates_client_memory():
    from fedpeft.check import check_model
    from fedpeft.lst import memory_summary

    cfg = tiny_config(**{"peft.method": "lst"})
    assert check_model(cfg, 2).trainable == 299_096  # from the meta-device model, no weights read
    plan = plan_lst(cfg.peft, **MINILM)
    text = memory_summary(plan, 2, batch_size=16, max_seq_len=32, optimizer="adamw")
    # 299,096 x 4 B x (param, grad, 2 AdamW moments) = 4.56 MiB; 16 x 32 x 7 x 384 x 4 B = 5.25 MiB
    assert "training state 4.6 MB" in text and "ladder inputs <= 5.2 MB" in text and "336 KB per example" in text


def test_a_federated_lst_run_with_fedau_and_dp_sgd_on_the_side_network(task, tmp_path):
    # `task` only warms this process' model cache: the run's apps load the same model
    from fedpeft.results import load_results
    from simulations.inprocess import run_in_process

    cfg = tiny_config(
        **{"peft.method": "lst", "strategy.name": "fedau", "dp.mode": "sample", "dp.grad-sample-mode": "functorch"}
    )
    results = load_results(run_in_process(cfg, tmp_path / "run"))
    assert results["status"] == "completed" and results["trainable_params"] == 299_096
    for row in results["rounds"][1:]:
        assert row["uplink_payload_bytes"] == row["downlink_payload_bytes"] == 3 * 299_096 * 4
        assert all(c["epsilon"] > 0 for c in row["clients"])
    stores = sorted(p.name for p in (tmp_path / "run" / "lst-store").rglob("*.safetensors"))
    assert stores == ["client-0.safetensors", "client-1.safetensors", "client-2.safetensors"]
    assert (tmp_path / "run" / "adapter" / "lst_side.safetensors").is_file()


def test_ladder_inputs_are_the_embeddings_and_each_chosen_layers_output(task):
    from fedpeft.lst import batch_ladder_states

    batch = {k: v[:4] for k, v in next(iter(task.test_loader())).items()}
    states = batch_ladder_states(task.model, batch)
    with torch.no_grad():  # the backbone's own batched, padded forward: equal to fp tolerance
        hidden = task.model.backbone.base_model(
            **{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True
        ).hidden_states
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for j, h in enumerate(hidden):  # hidden_states[0] = embeddings, [l + 1] = layer l's output
            torch.testing.assert_close(states[i, j, :n], h[i, :n].float(), atol=1e-4, rtol=1e-4)
        assert not states[i, :, n:].any()  # zeros at padding
    with pytest.raises(ValueError, match="right-padded"):
        batch_ladder_states(task.model, {**batch, "attention_mask": batch["attention_mask"].flip(1)})


def test_fedpeft_check_refuses_layers_out_of_range_and_reductions_that_do_not_divide():
    from fedpeft.check import check_model

    with pytest.raises(ConfigError, match=r"peft.lst-layers \[9\]"):
        check_model(tiny_config(**{"peft.method": "lst", "peft.lst-layers": "2,9"}), 2)
    with pytest.raises(ConfigError, match="peft.lst-reduction=3 must divide"):
        check_model(tiny_config(**{"peft.method": "lst", "peft.lst-reduction": 3}), 2)
