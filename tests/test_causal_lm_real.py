"""The real embedded SmolLM2-135M-Instruct (NF4), in two tests: its loss falls, its export reloads and generates alike."""

from __future__ import annotations

import pytest

from fedpeft.config import ExperimentConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task():
    from fedpeft.tasks import load_task

    cfg = ExperimentConfig.from_flat(
        {
            "name": "real-lm",
            "task.kind": "causal-lm",
            "model.quantization": "nf4",
            "peft.layers": "28,29",  # the top two of 30 layers: a short backward pass keeps the test fast
            "data.num-train-examples": 16,
            "data.num-test-examples": 8,
            "data.max-seq-len": 80,
            "partition.num-partitions": 2,
            "partition.scheme": "iid",
            "train.local-steps": 4,
            "train.batch-size": 4,
            "train.lr": 0.003,
        }
    )
    return load_task(cfg)


def test_the_embedded_llm_response_loss_goes_down_over_a_few_local_steps(task):
    rows = task.partition(0)
    before = task.evaluate(task.initial_state, task.train_loader(rows, 1, 0))["loss"]
    delta, result = task.local_update(task.initial_state, 0, 1)
    from fedpeft.adapters import apply_delta

    after = task.evaluate(apply_delta(task.initial_state, delta, 1.0), task.train_loader(rows, 1, 0))["loss"]
    assert result.num_steps == 4
    assert after < before, (before, after)


def test_the_embedded_llm_export_reloads_and_generates_the_same_text(task, tmp_path):
    import json

    from fedpeft import adapters
    from fedpeft.lm_export import export_lm_adapter, generate_text, load_lm_export

    delta, _ = task.local_update(task.initial_state, 1, 1)
    adapters.set_adapter_state(task.model, adapters.apply_delta(task.initial_state, delta, 1.0))
    prompt = "Is this movie review positive or negative? Answer with one word.\nReview: A warm, funny film."
    before = generate_text(task.model, task.tokenizer, prompt, max_new_tokens=6)
    out = export_lm_adapter(task.model, task.tokenizer, tmp_path / "adapter", task.cfg)
    assert json.loads((out / "fedpeft_model.json").read_text())["base"]["source"] == "embedded-gguf"
    model, tok = load_lm_export(out)
    assert generate_text(model, tok, prompt, max_new_tokens=6) == before
