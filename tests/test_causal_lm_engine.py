"""The causal-LM task end to end on Flower's real simulation engine (Ray): tiny Llama, 3 clients, 2 rounds."""

from __future__ import annotations

import json

import pytest

from fedpeft.results import load_results
from simulations.run import main, simulate
from tests.lm_helpers import tiny_lm_config

pytestmark = pytest.mark.slow


def test_a_causal_lm_run_writes_scores_samples_adapter_and_generates(tmp_path, capsys):
    # Prepare / Execute
    cfg = tiny_lm_config()
    out = tmp_path / "run"
    results = load_results(simulate(cfg, out, plot=True))
    # Assert: every round scored in the classifier's row shape plus perplexity and exact match
    assert results["status"] == "completed"
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["exact_match"] <= 1 and row["perplexity"] > 1
    assert rows[-1]["loss"] < rows[0]["loss"]  # the response loss falls (lr 0.01 on a random tiny model)
    numel = results["trainable_params"]
    for row in rows[1:]:
        assert row["aggregated"] == [0, 1, 2]
        assert row["uplink_payload_bytes"] == 3 * numel * 4  # only the LoRA factors travel
    samples = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [s["round"] for s in samples] == [0, 0, 1, 1, 2, 2]
    assert {"prompt", "reply", "target"} <= set(samples[0])
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "CAUSAL_LM"
    # fedpeft generate rebuilds base + adapter and prints the reply
    capsys.readouterr()
    assert (
        main(["generate", str(out), "--prompt", "Review: great fun. Positive or negative?", "--max-new-tokens", "3"])
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")  # the reply (a random tiny model may end its turn at once)
