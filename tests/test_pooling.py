"""Mean pooling and the zero-shot prompt head (model.pooling / model.head-init)."""

import numpy as np
import pytest
import torch
from torch import nn

from fedpeft import backbone, data
from fedpeft.adapters import inject_adapters
from fedpeft.config import ConfigError, DataConfig, ModelConfig, PeftConfig

PROMPTS = "fresh=a good movie; rotten=a bad movie"


@pytest.fixture(scope="module")
def mean_model():
    model = backbone.load_backbone(ModelConfig(quantization="none", pooling="mean"), 2)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(backbone.resolve_model_path("embedded"))


def test_mean_pooling_is_the_masked_mean_and_ignores_padding(mean_model, tokenizer):
    short, long = "a gem", "a long, slow and thoroughly forgettable evening at the movies"
    alone = tokenizer([short], return_tensors="pt")
    padded = tokenizer([short, long], padding=True, return_tensors="pt")
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # really padded
    with torch.no_grad():
        out_alone = mean_model.base_model(**alone)
        out_padded = mean_model.base_model(**padded)
    hidden = out_alone.last_hidden_state[0]
    by_hand = hidden.mean(0) / hidden.mean(0).norm()
    torch.testing.assert_close(out_alone.pooler_output[0], by_hand, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_padded.pooler_output[0], out_alone.pooler_output[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(out_padded.pooler_output.norm(dim=-1), torch.ones(2))


def test_mean_pooling_survives_peft_wrapping(tokenizer):
    model = backbone.load_backbone(ModelConfig(quantization="none", pooling="mean"), 2)
    model = inject_adapters(model, PeftConfig(lora_rank=2, target_modules="value"), seed=0).eval()
    short = tokenizer(["a gem"], return_tensors="pt")
    padded = tokenizer(["a gem", "a long, slow and thoroughly forgettable evening"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits[0], model(**short).logits[0], atol=1e-5, rtol=1e-4)


def test_prompt_head_is_a_zero_shot_classifier_above_the_majority_class():
    cfg = ModelConfig(quantization="none", pooling="mean", head_init="prompts", label_prompts=PROMPTS)
    splits = data.load_splits(DataConfig(num_train_examples=16, num_test_examples=500, max_seq_len=24))
    names = splits.test.label_names
    model = backbone.load_backbone(cfg, 2, label_names=names).eval()
    _, head = backbone.head_module(model)
    np.testing.assert_allclose(head.weight.norm(dim=1).numpy(), [10.0, 10.0], rtol=1e-5)
    assert torch.count_nonzero(head.bias) == 0
    tok = data.load_tokenizer(backbone.resolve_model_path("embedded"))
    loader = data.build_loader(splits.test, tok, max_seq_len=24, batch_size=128, shuffle=False)
    correct = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    accuracy = correct / len(splits.test)
    majority = np.bincount(splits.test.labels).max() / len(splits.test)
    # measured: 0.696 vs majority 0.620 (random head: at or below the majority)
    assert accuracy > majority + 0.04


def test_prompt_head_needs_mean_pooling_and_one_prompt_per_label():
    with pytest.raises(ConfigError, match="model.pooling"):
        ModelConfig_checked(head_init="prompts", label_prompts=PROMPTS)
    with pytest.raises(ConfigError, match="label=text"):
        ModelConfig_checked(pooling="mean", head_init="prompts", label_prompts="fresh: a good movie")
    with pytest.raises(ConfigError, match="model.label-prompts"):
        ModelConfig_checked(pooling="mean", head_init="prompts", label_prompts="")
    cfg = ModelConfig(quantization="none", pooling="mean", head_init="prompts", label_prompts="fresh=a good movie")
    with pytest.raises(ConfigError, match=r"missing \['rotten'\]"):
        backbone.load_backbone(cfg, 2, label_names=("fresh", "rotten"))


def ModelConfig_checked(**model_fields):  # noqa: N802 - reads like the dataclass it builds
    """Validation runs on the whole experiment config (cross-field rules)."""
    from fedpeft.config import ExperimentConfig

    flat = {f"model.{k.replace('_', '-')}": v for k, v in model_fields.items()}
    return ExperimentConfig().replace(flat)


def test_mean_pooling_refuses_a_model_without_a_pooler():
    class NoPooler(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)

        @property
        def base_model(self):
            return self.encoder

    with pytest.raises(ValueError, match="model.pooling='head'"):
        backbone.use_mean_pooling(NoPooler())
