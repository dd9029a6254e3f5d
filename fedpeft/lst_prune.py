"""Build an LST model: side blocks initialised from the backbone's layers pruned to the side width.

The ranking rule (L1 norm, not the paper's Fisher information) and why are in fedpeft/lst.py's
module docstring. Quantized backbones are dequantized to fp32 for the ranking and the copy
(bitsandbytes NF4 / int8); the backbone itself stays as loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.config import PeftConfig
from fedpeft.lst import LSTModel, LSTPlan, SideBlock, SideNetwork, plan_for_backbone
from fedpeft.rng import derive_seed


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The fp32 ``(out, in)`` weight of an ``nn.Linear`` or a bitsandbytes NF4 / int8 linear."""
    weight = linear.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:  # Linear4bit: packed NF4 codes + absmax
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state).float().reshape(linear.out_features, linear.in_features)
    if weight.dtype == torch.int8:  # Linear8bitLt: row-wise absmax scaling, w = CB * SCB / 127
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = linear.state.SCB
        return weight.data.float() * (scb.float()[:, None] / 127.0)
    return weight.detach().float()


def _bias(linear: nn.Module) -> torch.Tensor:
    return linear.bias.detach().float()


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order (ties: the lower index)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


class _Layer:
    """Dense fp32 copies of one BERT layer's weights (q, k, v, o, ffn in, ffn out, both LayerNorms)."""

    def __init__(self, layer: nn.Module) -> None:
        att = layer.attention
        self.q, self.k, self.v = (dense_weight(m) for m in (att.self.query, att.self.key, att.self.value))
        self.bq, self.bk, self.bv = (_bias(m) for m in (att.self.query, att.self.key, att.self.value))
        self.o, self.bo = dense_weight(att.output.dense), _bias(att.output.dense)
        self.ln1 = (att.output.LayerNorm.weight.detach().float(), att.output.LayerNorm.bias.detach().float())
        self.fi, self.bfi = dense_weight(layer.intermediate.dense), _bias(layer.intermediate.dense)
        self.fo, self.bfo = dense_weight(layer.output.dense), _bias(layer.output.dense)
        self.ln2 = (layer.output.LayerNorm.weight.detach().float(), layer.output.LayerNorm.bias.detach().float())

    def stream_scores(self) -> torch.Tensor:
        # How much the layer reads (input columns) and writes (output rows) each residual dimension.
        reads = (self.q.abs() + self.k.abs() + self.v.abs()).sum(0) + self.fi.abs().sum(0)
        writes = self.o.abs().sum(1) + self.fo.abs().sum(1)
        return reads + writes


def keep_indices(layers: list[_Layer], plan: LSTPlan) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(residual dims shared by all blocks, per-block attention dims, per-block feed-forward units)."""
    stream = _top(sum(layer.stream_scores() for layer in layers), plan.side_hidden)
    head_dim = plan.hidden // plan.heads
    attn, ffn = [], []
    for layer in layers:
        scores = (layer.q.abs() + layer.k.abs() + layer.v.abs()).sum(1) + layer.o.abs().sum(0)
        per_head = [
            h * head_dim + _top(scores[h * head_dim : (h + 1) * head_dim], plan.side_head_dim)
            for h in range(plan.heads)
        ]
        attn.append(torch.cat(per_head))
        ffn.append(_top(layer.fi.abs().sum(1) + layer.fo.abs().sum(0), plan.side_intermediate))
    return stream, attn, ffn


@torch.no_grad()
def _copy_block(block: SideBlock, src: _Layer, stream: torch.Tensor, attn: torch.Tensor, ffn: torch.Tensor) -> None:
    for side, w, b in ((block.query, src.q, src.bq), (block.key, src.k, src.bk), (block.value, src.v, src.bv)):
        side.weight.copy_(w[attn][:, stream])
        side.bias.copy_(b[attn])
    block.attn_out.weight.copy_(src.o[stream][:, attn])
    block.attn_out.bias.copy_(src.bo[stream])
    block.ffn_in.weight.copy_(src.fi[ffn][:, stream])
    block.ffn_in.bias.copy_(src.bfi[ffn])
    block.ffn_out.weight.copy_(src.fo[stream][:, ffn])
    block.ffn_out.bias.copy_(src.bfo[stream])
    for norm, (w, b) in ((block.attn_norm, src.ln1), (block.ffn_norm, src.ln2)):
        norm.weight.copy_(w[stream])
        norm.bias.copy_(b[stream])


def build_lst_model(backbone: nn.Module, cfg: PeftConfig, *, num_labels: int, pooling: str, seed: int = 0) -> LSTModel:
    """Freeze ``backbone`` and put a pruned-initialised side network beside it (on its device).

    Parameters
    ----------
    backbone : nn.Module
        An HF BERT-family sequence classifier (``base_model.encoder.layer``); its own head is unused.
    cfg : PeftConfig
        ``lst_reduction``, ``lst_layers``, ``lst_every``.
    num_labels : int
        Outputs of the side network's head.
    pooling : str
        ``model.pooling``: ``head`` (the [CLS] position) or ``mean``.
    seed : int
        The head's initialisation (``derive_seed(seed, "lst-head")``); the rest is data-free.
    """
    encoder_layers = getattr(getattr(getattr(backbone, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(encoder_layers, nn.ModuleList):
        raise ValueError(
            f"peft.method='lst' supports BERT-family encoders (base_model.encoder.layer); {type(backbone).__name__} "
            "is not one (LST on the causal LM is not implemented yet)"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)
    plan = plan_for_backbone(backbone, cfg)
    eps = float(getattr(backbone.config, "layer_norm_eps", 1e-12))
    side = SideNetwork(plan=plan, num_labels=num_labels, pooling=pooling, eps=eps)
    sources = [_Layer(encoder_layers[i]) for i in plan.layers]
    stream, attn, ffn = keep_indices(sources, plan)
    with torch.no_grad():
        for block, src, a, f in zip(side.blocks, sources, attn, ffn, strict=True):
            _copy_block(block, src, stream, a, f)
        for ladder in side.ladders:  # start as the selection of the kept residual dimensions
            ladder.weight.zero_()
            ladder.weight[torch.arange(plan.side_hidden), stream] = 1.0
            ladder.bias.zero_()
        gen = torch.Generator().manual_seed(derive_seed(seed, "lst-head"))
        side.head.weight.copy_(torch.randn(side.head.weight.shape, generator=gen) * 0.02)
        side.head.bias.zero_()
    device = next(backbone.parameters()).device
    model = LSTModel(backbone=backbone, side=side.to(device))
    return model.eval()
