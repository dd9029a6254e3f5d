"""LST's own export format and the loader that rebuilds backbone + side network for inference.

peft's ``save_pretrained`` / ``PeftModel.from_pretrained`` cannot hold a side network (fedpeft/lst.py
says why LST is not a peft tuner), so an LST export is a folder with two files:

- ``lst_side.safetensors``: the side network's state (ladders, gates, side blocks, head), fp32,
  the same tensors and names (without the ``side.`` prefix) that travelled in the federation;
- ``lst_config.json``: the format tag, the backbone settings (``model.*``: name, quantization,
  pooling, ...), the LST settings (reduction, the resolved ladder layers) and the label count.

:func:`load_lst_model` loads the backbone as recorded, builds the side network's shape from the
JSON (its pruned initialisation is then overwritten in full) and loads the state strictly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.lst import LSTModel

FORMAT = "fedpeft-lst/1"
CONFIG_FILE = "lst_config.json"
WEIGHTS_FILE = "lst_side.safetensors"


def export_lst(model: LSTModel, out_dir: str | Path, *, model_cfg: ModelConfig) -> Path:
    """Write ``model``'s side network and what rebuilds it to ``out_dir``; return the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    side = model.side
    plan = side.plan
    meta = {
        "format": FORMAT,
        "model": dataclasses.asdict(model_cfg),
        "lst": {"reduction": plan.reduction, "layers": list(plan.layers)},
    }
    if hasattr(side, "head"):  # a classifier's side network; a causal LM's writes through the tied embeddings
        meta.update(num_labels=side.head.out_features, pooling=side.pooling)
    else:
        meta["task"] = "causal-lm"
    state = {k: v.detach().to("cpu").float().contiguous() for k, v in side.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_lst_model(out_dir: str | Path, device: str | None = None) -> LSTModel:
    """Rebuild the backbone (as recorded) and the trained side network from an :func:`export_lst` folder."""
    from safetensors.torch import load_file

    from fedpeft.backbone import load_backbone
    from fedpeft.lst_prune import build_lst_model

    path = Path(out_dir) / CONFIG_FILE
    meta = read_lst_meta(out_dir)
    if meta.get("task") == "causal-lm":
        raise ValueError(f"{path} holds a causal-LM side network; load it with fedpeft.lm_export.load_lm_export")
    fields = {**meta["model"], "head_init": "random"}  # the export holds the trained head
    if device is not None:
        fields["device"] = device
    backbone = load_backbone(ModelConfig(**fields), meta["num_labels"])
    peft = PeftConfig(
        method="lst", lst_reduction=meta["lst"]["reduction"], lst_layers=",".join(map(str, meta["lst"]["layers"]))
    )
    model = build_lst_model(backbone, peft, num_labels=meta["num_labels"], pooling=meta["pooling"])
    state = load_file(str(Path(out_dir) / WEIGHTS_FILE))
    model.side.load_state_dict(state, strict=True)
    return model.eval()


def read_lst_meta(out_dir: str | Path) -> dict:
    """``lst_config.json`` of an export, checked for its format tag."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; was this folder written by fedpeft.lst_export.export_lst?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this loader reads {FORMAT!r}")
    return meta


def load_lst_causal_lm(out_dir: str | Path, backbone):
    """The trained causal-LM side network of an export beside ``backbone`` (loaded as the export records).

    The side network's shape comes from the JSON; its pruned initialisation (and the rotary
    frequencies of the kept pairs, a buffer of the state) is then overwritten in full, strictly.
    """
    from safetensors.torch import load_file

    from fedpeft.lst_lm_build import build_lst_lm

    meta = read_lst_meta(out_dir)
    peft = PeftConfig(
        method="lst", lst_reduction=meta["lst"]["reduction"], lst_layers=",".join(map(str, meta["lst"]["layers"]))
    )
    model = build_lst_lm(backbone, peft)
    state = load_file(str(Path(out_dir) / WEIGHTS_FILE))
    model.side.load_state_dict({k: v.to(next(model.side.parameters()).device) for k, v in state.items()}, strict=True)
    return model.eval()
