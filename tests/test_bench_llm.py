"""The causal-LM step benchmark runs end to end on a tiny random Llama (one subprocess: NF4)."""

from __future__ import annotations

import pytest

from simulations.bench.llm import main

pytestmark = pytest.mark.slow


def test_the_llm_bench_prints_seconds_per_step_and_memory_per_quantization(capsys):
    args = ["--model", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "8", "--quantizations", "nf4"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split("|")[0].strip(): line.split("|") for line in lines[2:]}
    assert set(table) == {"nf4"}
    assert float(table["nf4"][1]) > 0 and table["nf4"][2].strip() == "-"  # no fp32 row to compare with
    assert float(table["nf4"][3]) > 100  # MB: a Python process with torch
