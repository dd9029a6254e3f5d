"""The causal-LM task on a tiny random Llama with SmolLM2's tokenizer: loss, scoring, training, export, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedpeft.config import ConfigError
from tests.lm_helpers import tiny_lm_config


@pytest.fixture(scope="module")
def task():
    from fedpeft.tasks import load_task

    return load_task(tiny_lm_config())


def test_response_loss_is_the_mean_of_per_example_means_over_response_tokens_only():
    from fedpeft.lm_batches import IGNORE, response_loss

    # Prepare: vocab 3, two rows; row 0 has one target (position 2), row 1 two (positions 1, 2).
    logits = torch.log(
        torch.tensor(
            [
                [[0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
                [[0.5, 0.25, 0.25], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4]],
            ]
        )
    )
    labels = torch.tensor([[IGNORE, IGNORE, 1], [IGNORE, 2, 0]])
    # Execute
    loss = response_loss(logits, labels)
    # Assert: position t predicts token t+1 -> row 0: -log 0.8; row 1: (-log 0.25 - log 0.6) / 2
    expected = (-math.log(0.8) + (-math.log(0.25) - math.log(0.6)) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_prompt_positions_get_no_gradient_and_batches_mask_prompt_and_padding(task):
    from fedpeft.lm_batches import IGNORE, response_loss

    loader = task.train_loader(task.partition(0), 1, 0)
    batch = next(iter(loader))
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    # targets are the input ids wherever they are not -100; padding (mask 0) is always -100
    assert bool(((labels == IGNORE) | (labels == ids)).all())
    assert bool((labels[mask == 0] == IGNORE).all())
    logits = torch.randn(*ids.shape, 11, requires_grad=True)
    small = torch.where(labels == IGNORE, labels, labels % 11)
    response_loss(logits, small).backward()
    grad_rows = logits.grad.abs().sum(-1)  # (batch, positions)
    for row in range(ids.shape[0]):
        first = int((labels[row] != IGNORE).nonzero()[0])
        last = int((labels[row] != IGNORE).nonzero()[-1])
        assert float(grad_rows[row, : first - 1].sum()) == 0.0  # prompt positions predict prompt tokens: no loss
        assert float(grad_rows[row, first - 1]) > 0  # the last prompt position predicts the first response token
        assert float(grad_rows[row, last:].sum()) == 0.0  # the last target and padding predict nothing trained


def test_a_multi_token_label_word_scores_the_sum_of_its_token_log_probs(task):
    from fedpeft.lm_eval import continuation_logprobs, label_word_ids

    model, tok = task.model, task.tokenizer
    words = label_word_ids(tok, ("positive", "rotten"))
    assert len(words[0]) == 1 and len(words[1]) == 2  # SmolLM2: "rotten" = 2 tokens
    prompt = tok.apply_chat_template([{"role": "user", "content": "Good?"}], tokenize=False, add_generation_prompt=True)
    p = list(tok(prompt, add_special_tokens=False)["input_ids"])
    score = continuation_logprobs(model, [p], words[1], pad_id=tok.pad_token_id, batch_size=4)
    with torch.no_grad():
        lp1 = model(input_ids=torch.tensor([p])).logits[0, -1].log_softmax(-1)[words[1][0]]
        lp2 = model(input_ids=torch.tensor([p + words[1][:1]])).logits[0, -1].log_softmax(-1)[words[1][1]]
    assert score.item() == pytest.approx((lp1 + lp2).item(), abs=1e-4)


def test_one_shared_prefill_equals_plain_forwards_and_generate(task):
    from fedpeft import adapters
    from fedpeft.lm_batches import encode_rows
    from fedpeft.lm_eval import label_word_ids, prefill_scores, reference_scores, shared_prefix_length

    adapters.set_adapter_state(task.model, task.initial_state)
    rows = encode_rows(task.tokenizer, task.splits.test[:10], 96)
    words = label_word_ids(task.tokenizer, ("positive", "rotten"))
    prompts = [r["input_ids"][: r["labels"].index(next(t for t in r["labels"] if t != -100))] for r in rows]
    assert shared_prefix_length(prompts) > 30  # system turn + instruction: encoded once, its cache reused
    fast = prefill_scores(task.model, task.tokenizer, rows, words, max_new_tokens=5, batch_size=4)
    ref = reference_scores(task.model, task.tokenizer, rows, words, max_new_tokens=5, batch_size=4)
    assert torch.allclose(fast.loss_sums, ref.loss_sums, atol=1e-3)
    assert torch.equal(fast.token_counts, ref.token_counts)
    assert torch.allclose(fast.word_scores, ref.word_scores, atol=1e-3)
    assert torch.equal(fast.word_scores.argmax(1), ref.word_scores.argmax(1))  # the same label-word predictions
    assert fast.replies == ref.replies
    some = prefill_scores(task.model, task.tokenizer, rows, words, max_new_tokens=5, batch_size=4, num_generate=6)
    assert some.replies == ref.replies[:6]  # a batch cut in the middle decodes its first rows only
    assert torch.equal(some.word_scores, fast.word_scores)


def test_the_shared_prefix_stops_at_the_first_difference_and_leaves_each_prompt_a_token():
    from fedpeft.lm_eval import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 9], [1, 2, 4]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # the shorter prompt keeps its last token
    assert shared_prefix_length([[5, 6, 7]]) == 2
    assert shared_prefix_length([[1], [2]]) == 0
    assert shared_prefix_length([]) == 0


def test_parse_label_takes_the_first_label_word_in_the_reply():
    from fedpeft.lm_eval import parse_label

    words = ("positive", "negative")
    assert parse_label("The review is Negative, not positive.", words) == 1
    assert parse_label("positively great", words) == -1  # whole words only
    assert parse_label("", words) == -1


def test_a_local_update_lowers_the_response_loss_of_its_own_batches(task):
    from fedpeft import adapters

    cfg = task.cfg
    rows = task.partition(0)
    before = task.evaluate(task.initial_state, task.train_loader(rows, 1, 0))["loss"]
    state = dict(task.initial_state)
    for round_ in (1, 2, 3):
        delta, result = task.local_update(state, 0, round_)
        state = adapters.apply_delta(state, delta, 1.0)
    after = task.evaluate(state, task.train_loader(rows, 1, 0))["loss"]
    assert result.num_steps == cfg.train.local_steps
    assert after < before - 0.5, (before, after)


def test_export_reloads_with_peft_and_generates_the_same_text(task, tmp_path):
    from peft import PeftModel

    from fedpeft import adapters
    from fedpeft.causal_lm import load_causal_lm
    from fedpeft.lm_export import export_lm_adapter, generate_text, load_lm_export

    delta, _ = task.local_update(task.initial_state, 1, 1)
    trained = adapters.apply_delta(task.initial_state, delta, 1.0)
    adapters.set_adapter_state(task.model, trained)
    before = generate_text(task.model, task.tokenizer, "Review: a fine film.", max_new_tokens=6)
    out = export_lm_adapter(task.model, task.tokenizer, tmp_path / "adapter", task.cfg)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert json.loads((out / "fedpeft_model.json").read_text())["base"] == {
        "source": "huggingface",
        "model": task.cfg.model.name,
    }
    model, tok = load_lm_export(out)
    assert generate_text(model, tok, "Review: a fine film.", max_new_tokens=6) == before
    plain = PeftModel.from_pretrained(load_causal_lm(task.cfg.model), str(out)).eval()  # peft's own loader
    assert generate_text(plain, tok, "Review: a fine film.", max_new_tokens=6) == before


def test_evaluation_reports_label_accuracy_exact_match_perplexity_and_samples(task):
    scores = task.evaluate(task.initial_state)
    assert scores["num_examples"] == 24.0
    assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["exact_match"] <= 1.0
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    assert len(scores["per_class_accuracy"]) == 2
    assert [g["target"] for g in scores["generations"]] == [ex.response for ex in task.splits.test[:2]]


def test_exact_match_on_the_first_prompts_only_leaves_label_word_accuracy_on_all(task):
    from fedpeft import adapters
    from fedpeft.lm_eval import evaluate_lm, parse_label

    adapters.set_adapter_state(task.model, task.initial_state)
    kw = {"label_words": ("positive", "negative"), "max_seq_len": 96, "batch_size": 4, "max_new_tokens": 4}
    every = evaluate_lm(task.model, task.tokenizer, task.splits.test, num_samples=5, **kw)
    first5 = evaluate_lm(task.model, task.tokenizer, task.splits.test, num_samples=5, num_generate=5, **kw)
    assert first5["accuracy"] == every["accuracy"] and first5["loss"] == pytest.approx(every["loss"])
    assert first5["generations"] == every["generations"]
    hits = [
        parse_label(g["reply"], kw["label_words"]) == ex.label
        for g, ex in zip(first5["generations"], task.splits.test[:5], strict=True)
    ]
    assert first5["exact_match"] == pytest.approx(sum(hits) / 5)
    none = evaluate_lm(task.model, task.tokenizer, task.splits.test, num_samples=0, num_generate=0, **kw)
    assert none["exact_match"] is None and none["accuracy"] == every["accuracy"] and none["generations"] == []


def test_validation_rows_of_the_snippets_are_scored_like_test_without_generating(task):
    from fedpeft.lm_task import HeldOutExamples
    from fedpeft.tasks import load_task

    carved = load_task(tiny_lm_config(**{"data.num-val-examples": 12, "data.balanced-train": True}))
    loader = carved.validation_loader()
    assert isinstance(loader, HeldOutExamples) and len(loader.examples) == 12
    assert task.validation_loader() is None
    assert [ex.label for ex in carved.splits.train].count(0) == 24  # 48 balanced rows
    assert not {ex.messages[0]["content"] for ex in loader.examples} & {
        ex.messages[0]["content"] for ex in carved.splits.train
    }
    val = carved.evaluate(carved.initial_state, loader)
    assert val["num_examples"] == 12.0 and val["exact_match"] is None and val["generations"] == []
    assert abs(val["accuracy"] * 12 - round(val["accuracy"] * 12)) < 1e-9 and val["balanced_accuracy"] is not None
    with pytest.raises(ConfigError, match="data.num-val-examples"):
        tiny_lm_config(**{"data.num-val-examples": 12, "data.dataset": "embedded-dialog"})
    with pytest.raises(ConfigError, match="data.balanced-train"):
        tiny_lm_config(**{"data.balanced-train": True, "data.dataset": "embedded-dialog"})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"peft.method": "bitfit"}, "no biases"),
        ({"peft.method": "head"}, "tied to the embeddings"),
        ({"model.pooling": "mean"}, "model.pooling"),
        ({"model.head-init": "prompts"}, "model.head-init"),
        ({"simulation.cohort-size": 2}, "cohort-batched"),  # the batched cohort step computes a classifier's loss
        ({"task.label-words": "positive,positive"}, "distinct words"),
    ],
)
def test_settings_a_causal_lm_cannot_use_are_refused_with_the_fix(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_lm_config(**overrides)


def test_a_classifier_folder_is_refused_as_a_causal_lm():
    from fedpeft.backbone import resolve_model_path
    from fedpeft.causal_lm import check_causal_lm_config

    with pytest.raises(ConfigError, match="not a causal LM"):
        check_causal_lm_config(resolve_model_path("embedded"), "the MiniLM folder")


def test_check_refuses_label_words_that_do_not_match_the_data_and_a_response_that_cannot_fit():
    from fedpeft.check import check_experiment

    with pytest.raises(ConfigError, match="label words"):
        check_experiment(tiny_lm_config(**{"task.label-words": "positive,negative,neutral"}))
    with pytest.raises(ConfigError, match="data.max-seq-len"):
        check_experiment(tiny_lm_config(**{"data.max-seq-len": 16}))


def test_check_reports_the_causal_lm_and_its_trainable_count():
    from fedpeft.check import check_experiment

    report = check_experiment(tiny_lm_config())
    text = report.text()
    assert "causal LM, llama, 2 layers" in text
    # LoRA r 8 on q,k,v,o (64->64, 64->32, 64->32, 64->64), gate/up (64->128), down (128->64), 2 layers
    per_layer = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert f"{2 * per_layer:,}" in text or str(2 * per_layer) in text


def test_dp_sgd_without_noise_or_clipping_equals_a_plain_step_on_the_response_loss(task):
    """Opacus' per-sample gradients of the response loss average back to the batch gradient (loss = mean of
    per-example means), so DP-SGD with sigma 0 and a clip no gradient reaches is plain SGD."""
    from fedpeft import adapters
    from fedpeft.config import TrainConfig
    from fedpeft.privacy import dp_sgd
    from fedpeft.train import batch_loss, build_optimizer

    rows = task.partition(0)[:8]
    loader = task.train_loader(rows, 1, 0)  # batch size 8: one full batch
    batch = next(iter(loader))
    sgd = TrainConfig(optimizer="sgd", lr=0.5)

    adapters.set_adapter_state(task.model, task.initial_state)
    task.model.zero_grad(set_to_none=True)  # earlier tests' last local step leaves its gradients behind
    opt = build_optimizer(task.model, sgd)
    task.model.train()
    batch_loss(task.model, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    plain = adapters.get_adapter_state(task.model)

    adapters.set_adapter_state(task.model, task.initial_state)
    with dp_sgd(
        task.model,
        build_optimizer(task.model, sgd),
        loader,
        noise_multiplier=0.0,
        clip_norm=1e6,
        noise_seed=1,
        sampling_seed=2,
        poisson=False,
    ) as session:
        for b in session.loader:
            session.optimizer.zero_grad(set_to_none=True)
            batch_loss(task.model, b).backward()
            session.optimizer.step()
    private = adapters.get_adapter_state(task.model)
    task.model.eval()
    moved = max(float(abs(plain[k] - task.initial_state[k]).max()) for k in plain)
    assert moved > 1e-4
    for key in plain:
        assert abs(private[key] - plain[key]).max() < 1e-5 * max(1.0, moved * 100), key


@pytest.mark.parametrize(
    ("overrides", "trains"),
    [
        ({"peft.method": "ia3"}, "ia3_l"),
        ({"peft.method": "prompt", "peft.num-virtual-tokens": 4}, "prompt_encoder"),
        ({"peft.lora-variant": "ffa"}, "lora_B"),
    ],
)
def test_ia3_prompt_tuning_and_ffa_lora_train_and_score_a_causal_lm(overrides, trains):
    from fedpeft.tasks import load_task

    cfg = tiny_lm_config(**{"data.num-test-examples": 8, "train.local-steps": 1, **overrides})
    task = load_task(cfg)
    delta, result = task.local_update(task.initial_state, 0, 1)
    assert math.isfinite(result.mean_loss)
    assert all(trains in k for k in delta) and any(float(abs(v).max()) > 0 for v in delta.values())
    scores = task.evaluate(task.initial_state)  # prompt tuning goes through plain forwards + generate
    assert 0 <= scores["accuracy"] <= 1 and math.isfinite(scores["loss"])
