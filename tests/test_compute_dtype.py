"""model.compute-dtype: bitsandbytes' compute dtype and CUDA autocast; the CPU stays float32."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch

from fedpeft.backbone import compute_context, quantization_config, resolve_compute_dtype
from fedpeft.config import ConfigError
from fedpeft.tasks import load_task
from fedpeft.train import forward_logits
from tests.helpers import tiny_config

CPU = torch.device("cpu")


def test_auto_and_float32_compute_in_float32_on_the_cpu():
    assert resolve_compute_dtype("auto", CPU) is torch.float32
    assert resolve_compute_dtype("float32", CPU) is torch.float32


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_half_precision_on_the_cpu_falls_back_to_float32_with_a_warning(name, caplog):
    with caplog.at_level(logging.WARNING, logger="fedpeft.backbone"):
        dtype = resolve_compute_dtype(name, CPU)

    assert dtype is torch.float32
    assert f"model.compute-dtype='{name}' applies on CUDA only" in caplog.text


def test_an_unknown_compute_dtype_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="model.compute-dtype.*auto, float32, bfloat16, float16"):
        tiny_config(**{"model.compute-dtype": "fp8"})


def test_nf4_quantization_takes_the_compute_dtype():
    assert quantization_config("nf4").bnb_4bit_compute_dtype is torch.float32
    assert quantization_config("nf4", torch.bfloat16).bnb_4bit_compute_dtype is torch.bfloat16


def test_cpu_logits_are_the_same_for_auto_and_float32_and_nothing_autocasts(fresh_task):
    import bitsandbytes as bnb

    tasks = [fresh_task(tiny_config(**{"model.compute-dtype": name})) for name in ("auto", "float32")]
    batch = next(iter(tasks[0].test_loader()))
    for task in tasks:
        task.model.eval()

    with torch.no_grad():
        logits = [forward_logits(t.model, batch) for t in tasks]

    for task in tasks:
        assert isinstance(compute_context(task.model), contextlib.nullcontext)
        layers = [m for m in task.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and all(m.compute_dtype == torch.float32 for m in layers)
    assert logits[0].dtype == torch.float32
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_auto_is_bfloat16_on_a_cuda_gpu_with_native_bf16():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32

    assert resolve_compute_dtype("auto", torch.device("cuda")) is want


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_nf4_lora_trains_on_cuda_in_each_compute_dtype_with_fp32_adapters(name):
    import bitsandbytes as bnb

    if name == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        with pytest.raises(ConfigError, match="no native bf16"):
            resolve_compute_dtype(name, torch.device("cuda"))
        return
    task = load_task(tiny_config(**{"model.device": "cuda", "model.compute-dtype": name}))
    want = getattr(torch, name)

    delta, result = task.local_update(task.initial_state, 0, 1)

    layers = [m for m in task.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == want for m in layers)
    assert all(p.dtype == torch.float32 for p in task.model.parameters() if p.requires_grad)
    assert result.num_steps == 2 and np.isfinite(result.mean_loss)
    assert all(np.isfinite(v).all() for v in delta.values())
