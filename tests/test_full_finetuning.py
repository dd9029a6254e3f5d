"""``peft.method = "full"``: the baseline where every weight of the unquantized model trains and travels."""

import numpy as np
import pytest

from fedpeft import adapters, backbone
from fedpeft.config import ConfigError, ModelConfig, PeftConfig
from fedpeft.tasks import load_task
from tests.helpers import tiny_config

# all-MiniLM-L6-v2 with its [CLS] pooler: 22,713,216; the 2-class head: 384 x 2 + 2.
MINILM_PARAMS = 22_713_216
HEAD_PARAMS = 384 * 2 + 2


@pytest.fixture(scope="module")
def built_full_task():
    return load_task(tiny_config(**{"peft.method": "full", "model.quantization": "none"}))


@pytest.fixture
def full_task(built_full_task):
    """The full-finetuning task, put back at its initial state after each test, even a failed one."""
    yield built_full_task
    adapters.set_adapter_state(built_full_task.model, built_full_task.initial_state)


def test_full_sends_every_parameter_of_the_model_and_nothing_else(full_task):
    state = adapters.get_adapter_state(full_task.model)
    assert list(state) == [name for name, _ in full_task.model.named_parameters()]
    assert sum(v.size for v in state.values()) == adapters.num_trainable(full_task.model)
    assert adapters.num_trainable(full_task.model) == MINILM_PARAMS + HEAD_PARAMS == 22_713_986
    assert all(v.dtype == np.float32 for v in state.values())


def test_a_full_local_update_changes_the_loss_and_the_backbone(full_task):
    rows = full_task.partition(0)
    before = full_task.evaluate(full_task.initial_state, full_task.train_loader(rows, 0, 0))["loss"]
    delta, result = full_task.local_update(full_task.initial_state, 0, 1)
    new_state = adapters.apply_delta(full_task.initial_state, delta)
    after = full_task.evaluate(new_state, full_task.train_loader(rows, 0, 0))["loss"]
    assert result.num_steps == 2 and after != before
    word_embeddings = "bert.embeddings.word_embeddings.weight"
    assert np.abs(delta[word_embeddings]).max() > 0  # the backbone itself moved
    assert np.abs(delta["bert.encoder.layer.0.attention.self.query.weight"]).max() > 0


def test_full_exports_and_reloads_its_whole_state(full_task, tmp_path):
    cfg = full_task.cfg
    out = adapters.export_adapter(full_task.model, tmp_path / "full", cfg.peft, cfg.model)
    reloaded = adapters.load_exported_state(out)
    assert reloaded.keys() == full_task.initial_state.keys()
    assert all(np.array_equal(reloaded[k], full_task.initial_state[k]) for k in reloaded)
    model = adapters.load_exported_model(out, num_labels=2)
    assert sum(p.numel() for p in model.parameters()) == MINILM_PARAMS + HEAD_PARAMS


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_full_on_a_quantized_backbone_is_a_config_error_naming_the_fix(quantization):
    with pytest.raises(ConfigError, match="model.quantization.*'none' when peft.method='full'"):
        tiny_config(**{"peft.method": "full", "model.quantization": quantization})


def test_full_refuses_a_quantized_model_passed_directly():
    model = backbone.load_backbone(ModelConfig(quantization="nf4"), 2)
    with pytest.raises(ValueError, match="model.quantization = 'none'"):
        adapters.inject_adapters(model, PeftConfig(method="full"))


def test_the_check_counts_every_parameter_for_full_without_loading_weights():
    from fedpeft.check import check_model

    cfg = tiny_config(**{"peft.method": "full", "model.quantization": "none"})
    assert check_model(cfg, num_labels=2).trainable == MINILM_PARAMS + HEAD_PARAMS
    mean_no_head = tiny_config(
        **{"peft.method": "full", "model.quantization": "none", "model.pooling": "mean", "peft.train-head": False}
    )
    assert check_model(mean_no_head, num_labels=2).trainable == MINILM_PARAMS - (384 * 384 + 384)
