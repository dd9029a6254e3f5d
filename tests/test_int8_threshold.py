"""model.int8-threshold (LLM.int8()'s outlier threshold) and the int8-on-CUDA warning."""

from __future__ import annotations

import pytest
import torch

from fedpeft.backbone import load_backbone, quantization_config
from fedpeft.check import int8_cuda_warning
from fedpeft.config import ConfigError
from fedpeft.dead_settings import dead_settings
from tests.helpers import tiny_config


def test_the_int8_threshold_defaults_to_bitsandbytes_six_and_reaches_the_bnb_config():
    assert tiny_config().model.int8_threshold == 6.0
    assert quantization_config("int8").llm_int8_threshold == 6.0
    assert quantization_config("int8", int8_threshold=0.0).llm_int8_threshold == 0.0


def test_an_int8_backbone_on_the_cpu_gets_the_configured_threshold_in_every_int8_layer():
    import bitsandbytes as bnb

    cfg = tiny_config(**{"model.quantization": "int8", "model.device": "cpu", "model.int8-threshold": 0})

    model = load_backbone(cfg.model, num_labels=2)

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 6 * 6 + 1  # q, k, v, attention out, intermediate, output per layer; the pooler
    assert {m.state.threshold for m in layers} == {0.0}


def test_a_negative_int8_threshold_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="model.int8-threshold.*>= 0"):
        tiny_config(**{"model.int8-threshold": -1.0})


def test_an_int8_threshold_without_int8_quantization_is_reported_as_having_no_effect():
    flat = {"model.quantization": "nf4", "model.int8-threshold": 0.0}
    assert ("model.int8-threshold", "model.quantization", "only int8 has an outlier threshold") in dead_settings(flat)
    assert not dead_settings({"model.quantization": "int8", "model.int8-threshold": 0.0})


def test_int8_on_cuda_warns_with_the_measured_slowdown_and_suggests_nf4():
    auto = tiny_config(**{"model.quantization": "int8", "model.device": "auto"})
    cuda = tiny_config(**{"model.quantization": "int8", "model.device": "cuda"})

    text = int8_cuda_warning(auto, cuda_available=True)

    assert "5.9x slower" in text and "4.9x slower than nf4" in text and "H200" in text
    assert "llm_int8_threshold" in text and "model.quantization='nf4'" in text
    assert int8_cuda_warning(cuda, cuda_available=False) == int8_cuda_warning(cuda, cuda_available=True) == text


def test_int8_on_the_cpu_and_nf4_on_cuda_give_no_warning():
    assert int8_cuda_warning(tiny_config(**{"model.quantization": "int8"}), cuda_available=False) is None
    cpu = tiny_config(**{"model.quantization": "int8", "model.device": "cpu"})
    assert int8_cuda_warning(cpu, cuda_available=True) is None
    assert int8_cuda_warning(tiny_config(**{"model.quantization": "nf4"}), cuda_available=True) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_an_int8_model_without_the_outlier_path_builds_and_trains():
    import bitsandbytes as bnb

    from fedpeft.tasks import load_task

    task = load_task(tiny_config(**{"model.quantization": "int8", "model.device": "cuda", "model.int8-threshold": 0}))
    _, result = task.local_update(dict(task.initial_state), 0, 1)

    layers = [m for m in task.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and {m.state.threshold for m in layers} == {0.0}
    assert result.num_steps == 2 and torch.isfinite(torch.tensor(result.mean_loss))
