"""PEFT methods on a frozen backbone, and the adapter state that travels.

``lora``, ``ia3`` and ``prompt`` go through peft (the head rides along as a peft
``modules_to_save``, so ``save_pretrained`` exports it too). peft has no BitFit and
no "head only" tuner, so those two set ``requires_grad`` by hand and export a
safetensors file of the trainable tensors.

The adapter state is an ordered ``{name: fp32 ndarray}`` of the trainable parameters
only; the backbone never travels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft.backbone import head_module
from fedpeft.config import ConfigError, ModelConfig, PeftConfig
from fedpeft.rng import derive_seed

log = logging.getLogger(__name__)

State = dict[str, np.ndarray]
PEFT_LIBRARY_METHODS = ("lora", "ia3", "prompt")


class DeltaError(ValueError):
    """A client's update does not fit the global adapter state."""


def inject_adapters(model: nn.Module, cfg: PeftConfig, seed: int = 0) -> nn.Module:
    """Wrap ``model`` with the PEFT method in ``cfg``; only its parameters train."""
    head_name, _ = head_module(model)
    head_root = head_name.split(".")[0]
    if cfg.method == "lora":
        modules = dict(model.named_modules())
        check_lora_targets(cfg, list(modules), [n for n, m in modules.items() if isinstance(m, nn.Linear)])
    if cfg.method in PEFT_LIBRARY_METHODS:
        from peft import get_peft_model

        # peft draws LoRA-A / prompt initialisations from the global generator; fork it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "adapter-init"))
            model = get_peft_model(model, _peft_config(cfg, head_root))
        if not cfg.train_head:
            for name, p in model.named_parameters():
                if f"{head_root}.modules_to_save" in name:
                    p.requires_grad_(False)
        return model
    for name, p in model.named_parameters():
        is_head = name.startswith(f"{head_root}.")
        is_bias = name.endswith(".bias") and p.dtype.is_floating_point
        wanted = is_head if cfg.method == "head" else (is_bias or (is_head and cfg.train_head))
        p.requires_grad_(wanted)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"peft.method={cfg.method!r} left no trainable parameter in this model")
    return model


def check_lora_targets(cfg: PeftConfig, module_names: list[str], linear_names: list[str]) -> None:
    """Raise :class:`ConfigError` for a ``peft.target-modules`` entry or ``peft.layers`` index that matches nothing.

    peft drops an entry that matches no module as long as another one matches, so a typo
    (``querry,value``) would silently train fewer parameters. Matching follows peft's rule
    for a list: a module matches an entry equal to its name or to a dotted suffix of it.
    """
    targets = [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    if not targets:
        raise ConfigError('peft.target-modules is empty; name the linear modules to adapt, e.g. "query,value"')
    candidates = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if unmatched:
        raise ConfigError(
            f"peft.target-modules entries {unmatched} match no module of this model; "
            f"its linear modules are named {', '.join(candidates)}; fix the spelling in peft.target-modules"
        )
    layers = parse_layers(cfg.layers) or []
    indices = {int(m.group(1)) for n in module_names if (m := _LAYER_INDEX.search(n))}
    missing = [i for i in layers if i not in indices]
    if missing:
        raise ConfigError(
            f"peft.layers {missing} are not layers of this model; it has layers "
            f"{min(indices, default=0)}..{max(indices, default=-1)}"
        )


_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)(\.|$)")


def parse_layers(text: str) -> list[int] | None:
    """``peft.layers``: ``"4, 5"`` -> [4, 5]; ``""`` -> None (LoRA in every layer)."""
    layers = [int(v) for v in text.split(",") if v.strip()]
    return layers or None


def _peft_config(cfg: PeftConfig, head_root: str):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType

    save = [head_root]  # SEQ_CLS adds it anyway; peft.train-head=false freezes it later
    if cfg.method == "lora":
        targets = [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            layers_to_transform=parse_layers(cfg.layers),
            modules_to_save=save,
        )
    if cfg.method == "ia3":
        # peft's per-architecture defaults pick the key/value/feed-forward modules.
        return IA3Config(task_type=TaskType.SEQ_CLS, modules_to_save=save)
    return PromptTuningConfig(
        task_type=TaskType.SEQ_CLS, num_virtual_tokens=cfg.num_virtual_tokens, modules_to_save=save
    )


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the model's fixed registration order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_adapter_state(model: nn.Module) -> State:
    """The trainable parameters as fp32 numpy arrays (what travels)."""
    return {
        n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in model.named_parameters() if p.requires_grad
    }


def set_adapter_state(model: nn.Module, state: State) -> None:
    """Overwrite every trainable parameter from ``state``; keys and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_state(state, {n: tuple(p.shape) for n, p in params.items()}, what="adapter state")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(state[name]).to(p.device, p.dtype))


def num_trainable(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_state(state: State, shapes: dict[str, tuple[int, ...]], what: str = "delta") -> None:
    """Raise :class:`DeltaError` unless ``state`` has exactly these keys/shapes and finite values."""
    missing = [k for k in shapes if k not in state]
    extra = [k for k in state if k not in shapes]
    if missing or extra:
        raise DeltaError(f"{what} keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in shapes.items():
        arr = np.asarray(state[name])
        if tuple(arr.shape) != tuple(shape):
            raise DeltaError(f"{what} {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise DeltaError(f"{what} {name!r} contains NaN or Inf")


def compute_delta(new: State, old: State) -> State:
    """``new - old`` per tensor (what a first-order client sends)."""
    return {k: (new[k].astype(np.float32) - old[k].astype(np.float32)) for k in old}


def apply_delta(state: State, delta: State, scale: float = 1.0) -> State:
    """``state + scale * delta`` per tensor, as a new dict."""
    return {k: (state[k] + np.float32(scale) * delta[k]).astype(np.float32) for k in state}


MODEL_FILE = "fedpeft_model.json"


def export_adapter(
    model: nn.Module, out_dir: str | Path, cfg: PeftConfig, model_cfg: ModelConfig | None = None
) -> Path:
    """Write the adapter in peft's own format (``PeftModel.from_pretrained`` loads it).

    BitFit and head-only have no peft format; they write ``trainable_state.safetensors``
    plus ``fedpeft_adapter.json``, read back by :func:`load_exported_state`. With
    ``model_cfg``, ``fedpeft_model.json`` records the backbone settings the adapter was
    trained on (pooling included, which peft's own config cannot hold), for
    :func:`load_exported_model`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model_cfg is not None:
        (out / MODEL_FILE).write_text(
            json.dumps({"model": dataclasses.asdict(model_cfg), "method": cfg.method}, indent=2)
        )
    if cfg.method in PEFT_LIBRARY_METHODS:
        model.save_pretrained(str(out))
    else:
        from safetensors.numpy import save_file

        save_file(get_adapter_state(model), str(out / "trainable_state.safetensors"))
        (out / "fedpeft_adapter.json").write_text(json.dumps({"method": cfg.method}, indent=2))
    return out


def load_exported_model(out_dir: str | Path, num_labels: int, device: str | None = None) -> nn.Module:
    """Rebuild backbone + trained adapter from an export written with ``model_cfg`` (inference).

    The backbone is loaded with the recorded settings (quantization, pooling); the head's
    initialisation does not matter because the export holds the trained head.
    """
    from fedpeft.backbone import load_backbone

    path = Path(out_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; export with export_adapter(..., model_cfg=cfg.model) "
            "(fedpeft simulate does) or load the backbone yourself and use PeftModel.from_pretrained"
        )
    meta = json.loads(path.read_text())
    fields = {**meta["model"], "head_init": "random"}
    if device is not None:
        fields["device"] = device
    base = load_backbone(ModelConfig(**fields), num_labels)
    if meta["method"] in PEFT_LIBRARY_METHODS:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(out_dir)).eval()
    state = load_exported_state(out_dir)
    for name, p in base.named_parameters():
        if name in state:
            with torch.no_grad():
                p.copy_(torch.from_numpy(state[name]).to(p.device, p.dtype))
    return base.eval()


def load_exported_state(out_dir: str | Path) -> State:
    """Read a BitFit / head-only export written by :func:`export_adapter`."""
    from safetensors.numpy import load_file

    path = Path(out_dir) / "trainable_state.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; was this adapter exported by fedpeft?")
    return load_file(str(path))
