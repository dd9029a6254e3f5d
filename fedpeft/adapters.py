"""PEFT methods on a frozen backbone, and the adapter state that travels.

``lora``, ``ia3`` and ``prompt`` go through peft (the head rides along as a peft
``modules_to_save``, so ``save_pretrained`` exports it too). peft has no BitFit, no
"head only" and no full fine-tuning tuner, so those three set ``requires_grad`` by hand
and export a safetensors file of the trainable tensors (``full``: every parameter of the
unquantized model, the baseline that PEFT methods are measured against).

The adapter state is an ordered ``{name: fp32 ndarray}`` of the trainable parameters
only; the backbone never travels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from fedpeft.backbone import head_module
from fedpeft.config import ConfigError, ModelConfig, PeftConfig
from fedpeft.rng import derive_seed
from fedpeft.state import DeltaError, State, apply_delta, check_state, compute_delta  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

PEFT_LIBRARY_METHODS = ("lora", "ia3", "prompt")


def inject_adapters(model: nn.Module, cfg: PeftConfig, seed: int = 0, *, causal_lm: bool = False) -> nn.Module:
    """Wrap ``model`` with the PEFT method in ``cfg``; only its parameters train.

    ``causal_lm``: ``model`` is an ``AutoModelForCausalLM`` (fedpeft/causal_lm.py): peft's
    ``TaskType.CAUSAL_LM``, no head to save (the LM head is tied to the embeddings and stays frozen).
    """
    head_root: str | None = None
    if causal_lm:
        if cfg.method == "lst":  # side network + frozen tied embeddings as its output (fedpeft/lst_lm.py)
            from fedpeft.lst_lm_build import build_lst_lm

            return build_lst_lm(model, cfg)
        if cfg.method not in PEFT_LIBRARY_METHODS:
            raise ConfigError(f"peft.method={cfg.method!r} cannot train a causal LM; use lora, ia3, prompt or lst")
    else:
        head_name, head = head_module(model)
        head_root = head_name.split(".")[0]
        if cfg.method == "lst":  # a side network beside the frozen backbone, not a peft tuner (fedpeft/lst.py)
            from fedpeft.backbone import MaskedMeanPooler
            from fedpeft.lst_prune import build_lst_model

            pooling = "mean" if isinstance(getattr(model.base_model, "pooler", None), MaskedMeanPooler) else "head"
            return build_lst_model(model, cfg, num_labels=head.out_features, pooling=pooling, seed=seed)
    if cfg.method == "lora":
        modules = dict(model.named_modules())
        check_lora_targets(cfg, list(modules), [n for n, m in modules.items() if isinstance(m, nn.Linear)])
    if cfg.method in PEFT_LIBRARY_METHODS:
        from peft import get_peft_model

        # peft draws LoRA-A / prompt initialisations from the global generator; fork it.
        # FFA-LoRA relies on this: the same seed gives every client the same A.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "adapter-init"))
            model = get_peft_model(model, _peft_config(cfg, head_root))
        model.fedpeft_peft = (cfg, seed, head_root)
        _freeze(model, cfg, head_root)
        return model
    if cfg.method == "full" and any(not p.dtype.is_floating_point for p in model.parameters()):
        raise ValueError("peft.method='full' trains every weight and needs model.quantization = 'none'")
    for name, p in model.named_parameters():
        is_head = name.startswith(f"{head_root}.")
        is_bias = name.endswith(".bias") and p.dtype.is_floating_point
        if cfg.method == "head":
            wanted = is_head
        elif cfg.method == "full":
            wanted = cfg.train_head or not is_head
        else:
            wanted = is_bias or (is_head and cfg.train_head)
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


def _freeze(model: nn.Module, cfg: PeftConfig, head_root: str) -> None:
    # peft's set_adapter makes the whole active adapter trainable; undo what the config freezes.
    for name, p in model.named_parameters():
        if head_root and not cfg.train_head and f"{head_root}.modules_to_save" in name:
            p.requires_grad_(False)
        if cfg.lora_variant == "ffa" and ".lora_A." in name:
            p.requires_grad_(False)  # FFA-LoRA: A stays at its seeded initialisation


def use_rank(model: nn.Module, rank: int) -> None:
    """Make the LoRA adapter of ``rank`` the active, trainable one; build it on first use.

    Adapters of every rank share the one frozen backbone inside ``model`` (peft keeps
    several adapters side by side); only the small A/B factors and a head copy are new.
    Each has ``lora_alpha * rank / peft.lora-rank``, so the scaling ``alpha / r`` is
    ``lora_alpha / peft.lora-rank`` for every rank and ``B A`` means the same on every
    client: a rank-r adapter equals the rank-``peft.lora-rank`` one cut to its first r slices.
    """
    cfg, seed, head_root = model.fedpeft_peft
    if cfg.method != "lora" or rank <= 0:
        raise ValueError(f"use_rank needs peft.method='lora' and rank > 0, got {cfg.method!r} and {rank}")
    name = "default" if rank == cfg.lora_rank else f"rank{rank}"
    if name not in model.peft_config:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "adapter-init", rank))
            model.add_adapter(name, _peft_config(cfg, head_root, rank))
    if model.active_adapter != name:
        model.set_adapter(name)
    _freeze(model, cfg, head_root)


def _peft_config(cfg: PeftConfig, head_root: str | None, rank: int | None = None):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType

    # SEQ_CLS adds the head anyway; peft.train-head=false freezes it later. A causal LM (head_root None) saves none.
    save = [head_root] if head_root else None
    task_type = TaskType.SEQ_CLS if head_root else TaskType.CAUSAL_LM
    if cfg.method == "lora":
        targets = [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
        rank = rank or cfg.lora_rank
        return LoraConfig(
            task_type=task_type,
            r=rank,
            lora_alpha=cfg.lora_alpha * rank / cfg.lora_rank,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            layers_to_transform=parse_layers(cfg.layers),
            modules_to_save=save,
        )
    if cfg.method == "ia3":
        # peft's per-architecture defaults pick the key/value/feed-forward modules.
        return IA3Config(task_type=task_type, modules_to_save=save)
    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens, modules_to_save=save)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the model's fixed registration order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_adapter_state(model: nn.Module) -> State:
    """The trainable parameters as fp32 numpy arrays (what travels).

    Names are peft's, with the active adapter called ``default`` whatever its rank.
    """
    return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in _trainable(model).items()}


def set_adapter_state(model: nn.Module, state: State) -> None:
    """Overwrite every trainable parameter from ``state``; keys and shapes must match exactly.

    For LoRA, the state's rank picks the adapter (:func:`use_rank`), so a client serves
    whatever rank the server sent it.
    """
    rank, peft_info = lora_rank_of(state), getattr(model, "fedpeft_peft", None)
    if rank and peft_info is not None and peft_info[0].method == "lora":
        use_rank(model, rank)
    params = _trainable(model)
    check_state(state, {n: tuple(p.shape) for n, p in params.items()}, what="adapter state")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(state[name]).to(p.device, p.dtype))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters under their adapter-state names (the keys of :func:`get_adapter_state`)."""
    return _trainable(model)


_ADAPTER_PART = r"\.(lora_A|lora_B|modules_to_save)\.{}\."


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    active = getattr(model, "active_adapter", "default") if hasattr(model, "fedpeft_peft") else "default"
    if active == "default":
        return params
    pattern = re.compile(_ADAPTER_PART.format(re.escape(active)))
    return {pattern.sub(r".\1.default.", n): p for n, p in params.items()}


def lora_rank_of(state: State) -> int:
    """The LoRA rank of a state (from its A or B factors); 0 if it has none."""
    for name, arr in state.items():
        if ".lora_A." in name:
            return int(arr.shape[0])
        if ".lora_B." in name:
            return int(arr.shape[1])
    return 0


def num_trainable(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


MODEL_FILE = "fedpeft_model.json"


def export_adapter(
    model: nn.Module, out_dir: str | Path, cfg: PeftConfig, model_cfg: ModelConfig | None = None
) -> Path:
    """Write the adapter in peft's own format (``PeftModel.from_pretrained`` loads it).

    BitFit, head-only and full fine-tuning have no peft format; they write ``trainable_state.safetensors``
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
    if cfg.method == "lst":  # its own format: fedpeft/lst_export.py
        from fedpeft.lst_export import export_lst

        if model_cfg is None:
            raise ValueError("exporting an LST model needs model_cfg= (the loader rebuilds its backbone from it)")
        return export_lst(model, out, model_cfg=model_cfg)
    if cfg.method in PEFT_LIBRARY_METHODS:
        # The server's adapter is "default"; adapters of other ranks (clients served in this
        # process) are not part of the export. FFA's frozen A is exported too (peft saves every
        # LoRA factor): it is the seeded initialisation every client used.
        model.save_pretrained(str(out), selected_adapters=["default"])
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
    if meta["method"] == "lst":
        from fedpeft.lst_export import load_lst_model

        return load_lst_model(out_dir, device)
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
    """Read a BitFit / head-only / full export written by :func:`export_adapter`."""
    from safetensors.numpy import load_file

    path = Path(out_dir) / "trainable_state.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; was this adapter exported by fedpeft?")
    return load_file(str(path))
