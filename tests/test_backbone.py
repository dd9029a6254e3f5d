"""The frozen quantized backbone and its per-process cache."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedpeft import backbone
from fedpeft.config import ModelConfig
from fedpeft.tasks import load_task
from tests.helpers import tiny_config


def test_nf4_and_int8_shrink_the_linear_layers_below_the_targets():
    sizes = {
        q: backbone.measure_weight_bytes(backbone.load_backbone(ModelConfig(quantization=q), 2), q)
        for q in ("none", "int8", "nf4")
    }
    fp32 = sizes["none"].fp32_weight_bytes
    assert sizes["none"].weight_bytes == fp32
    assert sizes["int8"].weight_bytes <= 0.30 * fp32
    assert sizes["nf4"].weight_bytes <= 0.20 * fp32
    assert sizes["nf4"].fp32_weight_bytes == fp32


def test_backbone_parameters_are_frozen():
    model = backbone.load_backbone(ModelConfig(quantization="nf4"), 2)
    assert not any(p.requires_grad for p in model.parameters())


def test_the_cache_builds_once_per_process():
    cfg = tiny_config()
    load_task(cfg)
    before = backbone.BUILD_COUNT["n"]
    assert load_task(cfg).model is load_task(cfg).model
    assert backbone.BUILD_COUNT["n"] == before


_CHILD = """
import json, sys, torch, numpy as np
torch.set_num_threads(1)
from tests.helpers import tiny_config
from fedpeft.tasks import load_task
task = load_task(tiny_config())
delta, _ = task.local_update(task.initial_state, int(sys.argv[1]), 1)
print(json.dumps({k: v.ravel()[:64].tolist() + [float(np.abs(v).sum())] for k, v in delta.items()}))
"""


def _fingerprint(delta):
    return {k: v.ravel()[:64].tolist() + [float(np.abs(v).sum())] for k, v in delta.items()}


def test_two_clients_in_one_process_match_two_fresh_processes():
    # the fresh processes start first and run while this one trains (CI has two cores)
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": root}
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(pid)], **pipes) for pid in (0, 1)]
    try:
        task = load_task(tiny_config())
        in_process = [_fingerprint(task.local_update(task.initial_state, pid, 1)[0]) for pid in (0, 1)]
        fresh = []
        for child in children:
            out, err = child.communicate(timeout=600)
            assert child.returncode == 0, err[-2000:]
            fresh.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert in_process[0] != in_process[1]
    assert in_process == fresh


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_backbone_trains_lora_on_cuda():
    import bitsandbytes as bnb

    cfg = tiny_config(**{"model.device": "cuda"})
    task = load_task(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cuda" for m in task.model.modules())
    delta, result = task.local_update(task.initial_state, 0, 1)
    assert result.num_steps == 2 and all(np.isfinite(v).all() for v in delta.values())
