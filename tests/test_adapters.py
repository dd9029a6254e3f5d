"""Adapters on the real embedded backbone (NF4 MiniLM)."""

import numpy as np
import pytest
import torch

from fedpeft import adapters, backbone
from fedpeft.comm import payload_bytes
from fedpeft.records import state_to_record
from fedpeft.tasks import load_task
from fedpeft.train import forward_logits
from tests.helpers import tiny_config

BACKBONE_MARKERS = ("word_embeddings", "attention.self.query.weight", "base_layer.weight", "LayerNorm")


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "bitfit", "head"])
def test_only_trainable_peft_parameters_form_the_state(method):
    task = load_task(tiny_config(**{"peft.method": method}))
    state = adapters.get_adapter_state(task.model)
    assert state, "no trainable tensors"
    assert sum(v.size for v in state.values()) == adapters.num_trainable(task.model)
    total = sum(p.numel() for p in task.model.parameters())
    assert adapters.num_trainable(task.model) < 0.02 * total
    for name in state:
        if method != "bitfit":
            assert not any(marker in name for marker in BACKBONE_MARKERS), name
        else:
            assert name.endswith("bias") or name.startswith("classifier."), name


def test_uplink_payload_bytes_equal_trainable_numel_times_four():
    task = load_task(tiny_config())
    record = state_to_record(adapters.get_adapter_state(task.model))
    from flwr.app import RecordDict

    assert payload_bytes(RecordDict({"arrays": record})) == adapters.num_trainable(task.model) * 4 == 338_690 * 4


def test_set_then_get_round_trips_exactly_and_rejects_wrong_shapes(fresh_task):
    task = fresh_task(tiny_config())
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in task.initial_state.items()}
    adapters.set_adapter_state(task.model, state)
    back = adapters.get_adapter_state(task.model)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = bad[key][..., :1]
    with pytest.raises(adapters.DeltaError, match="shape"):
        adapters.set_adapter_state(task.model, bad)


def test_delta_then_apply_restores_the_new_state():
    old = {"a": np.array([1.0, 2.0], np.float32)}
    new = {"a": np.array([1.5, -1.0], np.float32)}
    np.testing.assert_array_equal(adapters.apply_delta(old, adapters.compute_delta(new, old))["a"], new["a"])


def _logits(model, task):
    batch = next(iter(task.test_loader()))
    with torch.no_grad():
        return forward_logits(model, batch)


def test_exported_lora_adapter_reloads_with_peft_and_gives_the_same_logits(tmp_path, fresh_task):
    from peft import PeftModel

    cfg = tiny_config()
    task = fresh_task(cfg)
    rng = np.random.default_rng(1)
    trained = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in task.initial_state.items()}
    adapters.set_adapter_state(task.model, trained)
    expected = _logits(task.model, task)
    out = adapters.export_adapter(task.model, tmp_path / "adapter", cfg.peft)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    fresh = backbone.load_backbone(cfg.model, num_labels=2, seed=123)  # another head init on purpose
    reloaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    torch.testing.assert_close(_logits(reloaded, task), expected, rtol=0, atol=1e-5)


def test_bitfit_export_reloads_its_trainable_state(tmp_path):
    cfg = tiny_config(**{"peft.method": "bitfit"})
    task = load_task(cfg)
    out = adapters.export_adapter(task.model, tmp_path / "bitfit", cfg.peft)
    state = adapters.load_exported_state(out)
    assert state.keys() == task.initial_state.keys()


def test_missing_local_model_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backbone.resolve_model_path("./no/such/model")


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_an_export_with_its_model_settings_reloads_mean_pooling_and_gives_the_same_logits(tmp_path, method, fresh_task):
    cfg = tiny_config(
        **{"peft.method": method, "model.pooling": "mean", "model.head-init": "prompts",
           "model.label-prompts": "fresh=a good movie; rotten=a bad movie"}
    )  # fmt: skip
    task = fresh_task(cfg)
    rng = np.random.default_rng(2)
    trained = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in task.initial_state.items()}
    adapters.set_adapter_state(task.model, trained)
    expected = _logits(task.model, task)
    out = adapters.export_adapter(task.model, tmp_path / method, cfg.peft, cfg.model)
    reloaded = adapters.load_exported_model(out, num_labels=2)
    assert any(isinstance(m, backbone.MaskedMeanPooler) for m in reloaded.modules())
    torch.testing.assert_close(_logits(reloaded, task), expected, rtol=0, atol=1e-5)


def test_loading_an_export_without_model_settings_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_cfg=cfg.model"):
        adapters.load_exported_model(tmp_path, num_labels=2)
