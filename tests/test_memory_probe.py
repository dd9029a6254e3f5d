"""``fedpeft deploy memory``: each (quantization, compute dtype) measured in a fresh process."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fedpeft.memory import OPTIMIZER_STATE_TENSORS
from simulations.deploy.loopback import main as deploy_main
from simulations.deploy.loopback import toml_value
from simulations.deploy.memory_probe import Combination, format_table, plan_combinations
from tests.helpers import tiny_config


def plan(quantizations, dtypes, *, cuda=False, bnb=True, **overrides):
    cfg = tiny_config(**overrides)
    return plan_combinations(cfg, quantizations, dtypes, cuda_available=cuda, bitsandbytes_available=bnb)


def test_without_options_the_plan_is_the_configs_own_combination():
    assert plan([], [], **{"model.quantization": "int8", "model.compute-dtype": "float32"}) == [
        Combination("int8", "float32")
    ]


def test_the_plan_is_the_cross_product_and_skips_quantized_rows_without_bitsandbytes():
    rows = plan(["nf4", "none"], ["float32"], bnb=False)

    assert [(r.quantization, r.compute_dtype) for r in rows] == [("nf4", "float32"), ("none", "float32")]
    assert "needs bitsandbytes" in rows[0].skip and rows[1].skip is None


def test_on_the_cpu_bf16_is_skipped_beside_a_float32_row_and_marked_when_alone():
    beside = plan(["none"], ["float32", "bfloat16"])
    alone = plan(["none"], ["bfloat16"])

    assert beside[0].skip is None and "falls back to float32" in beside[1].skip
    assert alone[0].skip is None and "falls back to float32" in alone[0].note


def test_on_cuda_bf16_runs_and_device_cuda_without_cuda_is_skipped():
    assert plan(["nf4"], ["bfloat16"], cuda=True) == [Combination("nf4", "bfloat16")]
    assert "CUDA is not available" in plan(["nf4"], ["float32"], **{"model.device": "cuda"})[0].skip


def test_the_table_gives_sizes_in_mb_and_the_reason_for_a_skipped_row():
    measured = {
        "quantization": "none", "compute_dtype": "auto", "effective_compute_dtype": "float32", "device": "cpu",
        "backbone_bytes": 90_900_000, "adapter_bytes": 1_400_000, "training_state_bytes": 4_200_000,
        "peak_rss_bytes": 1_155_700_000, "peak_cuda_bytes": 0, "s_per_step": 1.2274,
    }  # fmt: skip
    skipped = {"quantization": "nf4", "compute_dtype": "auto", "skipped": "needs bitsandbytes"}

    lines = format_table([measured, skipped]).splitlines()

    assert lines[2] == "none | auto (float32) | cpu | 90.9 MB | 1.4 MB | 4.2 MB | 1155.7 MB | - | 1.227"
    assert lines[3] == "nf4 | auto | skipped: needs bitsandbytes"


@pytest.mark.slow
def test_deploy_memory_measures_each_quantization_in_its_own_fresh_process(tmp_path):
    cfg = tiny_config(**{"model.device": "cpu"})
    config = tmp_path / "tiny.toml"
    config.write_text("".join(f'"{k}" = {toml_value(v)}\n' for k, v in cfg.to_flat().items()))
    out = tmp_path / "memory.json"

    assert deploy_main(["memory", str(config), "--quantization", "nf4,none", "--out", str(out)]) == 0

    rows = json.loads(out.read_text())["rows"]
    assert [(r["quantization"], r["compute_dtype"]) for r in rows] == [("nf4", "auto"), ("none", "auto")]
    pids = {r["pid"] for r in rows}
    assert len(pids) == 2 and os.getpid() not in pids
    for r in rows:
        assert r["device"] == "cpu" and r["effective_compute_dtype"] == "float32" and r["num_steps"] == 2
        assert r["peak_rss_bytes"] > r["backbone_bytes"] + r["adapter_bytes"]
        assert r["training_state_bytes"] == r["adapter_bytes"] * (1 + OPTIMIZER_STATE_TENSORS["adamw"])
    nf4, fp32 = rows
    assert nf4["backbone_bytes"] < fp32["backbone_bytes"]  # the quantized linear layers are smaller
    assert nf4["adapter_bytes"] == fp32["adapter_bytes"]


def test_on_the_cpu_a_client_reply_carries_no_peak_cuda_bytes():
    from fedpeft.tasks import load_task
    from simulations.reply import delta_reply

    task = load_task(tiny_config(**{"model.device": "cpu"}))
    delta, result = task.local_update(dict(task.initial_state), 0, 1)

    assert result.peak_cuda_bytes == 0
    assert "peak-cuda-bytes" not in delta_reply(task, 0, delta, result)["metrics"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_local_round_reports_its_peak_cuda_bytes():
    from fedpeft.tasks import load_task
    from simulations.reply import delta_reply

    task = load_task(tiny_config(**{"model.device": "cuda"}))
    delta, result = task.local_update(dict(task.initial_state), 0, 1)

    assert result.peak_cuda_bytes >= task.weight_bytes.total_bytes
    assert delta_reply(task, 0, delta, result)["metrics"]["peak-cuda-bytes"] == result.peak_cuda_bytes
