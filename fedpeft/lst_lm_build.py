"""Build LST on a Llama-style causal LM: plan from the config, side blocks pruned from the backbone's layers.

The ranking is the classifier's (fedpeft/lst_prune.py: L1 norm, data-free, the same on every
client and the server), adapted to a decoder:

- residual dimensions: the ``H/r`` with the largest L1 norm summed over every chosen layer's
  weights that read (q, k, v, gate, up columns) or write (o, down rows) the stream; one set for
  all blocks, and the ladders start as the selection of exactly these dimensions;
- attention: per key/value head, the ``head_dim / (2r)`` rotary pairs (i, i + head_dim/2) with
  the largest L1 norm of the q rows of its query group, its k and v rows and the o columns; the
  group's query heads keep the same dimensions (q and k must meet in the same coordinates), and
  the block rotates them with the backbone's frequencies of those pairs;
- SwiGLU units: the ``I/r`` with the largest L1 norm of their gate and up rows and down column.

The output norm starts at ones and the up-projection at zero (fedpeft/lst_lm.py: round 0 is the
backbone's own prediction); gates at ``mu = 0.5``.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.config import ConfigError, PeftConfig
from fedpeft.lst import chosen_layers
from fedpeft.lst_lm import LlamaSideBlock, LMPlan, LMSideNetwork, LSTCausalLM
from fedpeft.lst_prune import _top, dense_weight


def plan_lm(cfg: PeftConfig, config) -> LMPlan:
    """The side network's shape for an HF Llama-style ``config``; :class:`ConfigError` names the fix."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("peft.method='lst' on a causal LM supports Llama-style layers without biases")
    hidden, heads, r = config.hidden_size, config.num_attention_heads, cfg.lst_reduction
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter, num_layers = config.intermediate_size, config.num_hidden_layers
    if hidden % r or head_dim % (2 * r) or inter % r:
        valid = [
            d for d in range(1, head_dim // 2 + 1) if head_dim % (2 * d) == 0 and hidden % d == 0 and inter % d == 0
        ]
        raise ConfigError(
            f"peft.lst-reduction={r} must divide the hidden size {hidden} and the feed-forward size {inter}, and "
            f"head_dim / r must be even (whole rotary pairs; head_dim {head_dim}) on this causal LM; valid: {valid}"
        )
    layers = chosen_layers(cfg, num_layers)
    if layers[-1] != num_layers - 1:
        raise ConfigError(
            f"peft.lst-layers {list(layers)} must include the last layer {num_layers - 1} with task.kind='causal-lm': "
            "the side network's output is added to that layer's (final, normed) hidden state"
        )
    return LMPlan(hidden, heads, kv_heads, head_dim, inter, num_layers, r, layers)


def lm_memory_summary(plan: LMPlan, *, batch_size: int, max_seq_len: int, optimizer: str, vocab: int) -> str:
    """``fedpeft check``'s LST line for a causal LM: trainable state, a batch's ladder inputs and logits, store."""
    params = plan.num_params()
    state = params * 4 * (2 + (2 if optimizer == "adamw" else 0))
    ladders = batch_size * max_seq_len * plan.bytes_per_token()
    logits = batch_size * max_seq_len * vocab * 4 * 2  # logits and their gradient, fp32
    per_example = max_seq_len * plan.bytes_per_token()
    return (
        f"LST: side width {plan.side_hidden} (r={plan.reduction}) on {len(plan.layers)} of {plan.num_layers} layers "
        f"{list(plan.layers)}, output through the frozen tied embeddings; client memory besides the frozen backbone "
        f"~{(state + ladders + logits) / 2**20:.1f} MB (training state {state / 2**20:.1f} MB, a batch's ladder "
        f"inputs <= {ladders / 2**20:.1f} MB, its logits <= {logits / 2**20:.1f} MB); store <= "
        f"{per_example / 1024:.0f} KB per example at data.max-seq-len={max_seq_len} "
        f"({plan.bytes_per_token()} bytes per token)"
    )


class _LlamaLayer:
    """Dense fp32 copies of one Llama decoder layer's weights."""

    def __init__(self, layer: nn.Module) -> None:
        att, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (dense_weight(m) for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj))
        self.gate, self.up, self.down = (dense_weight(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.ln1 = layer.input_layernorm.weight.detach().float()
        self.ln2 = layer.post_attention_layernorm.weight.detach().float()

    def stream_scores(self) -> torch.Tensor:
        reads = sum(w.abs().sum(0) for w in (self.q, self.k, self.v, self.gate, self.up))
        return reads + self.o.abs().sum(1) + self.down.abs().sum(1)


def _kept_pairs(src: _LlamaLayer, plan: LMPlan, g: int) -> torch.Tensor:
    """Rotary pair indices (< head_dim / 2) kept for key/value head ``g`` and its query group."""
    hd, group = plan.head_dim, plan.heads // plan.kv_heads
    scores = src.k[g * hd : (g + 1) * hd].abs().sum(1) + src.v[g * hd : (g + 1) * hd].abs().sum(1)
    for h in range(g * group, (g + 1) * group):
        scores = scores + src.q[h * hd : (h + 1) * hd].abs().sum(1) + src.o[:, h * hd : (h + 1) * hd].abs().sum(0)
    half = hd // 2
    return _top(scores[:half] + scores[half:], plan.side_head_dim // 2)


@torch.no_grad()
def _copy_block(block: LlamaSideBlock, src: _LlamaLayer, plan: LMPlan, stream: torch.Tensor, inv_freq) -> None:
    hd, half, group = plan.head_dim, plan.head_dim // 2, plan.heads // plan.kv_heads
    pairs = [_kept_pairs(src, plan, g) for g in range(plan.kv_heads)]
    dims = [torch.cat([p, p + half]) for p in pairs]  # rotate_half's layout: first halves, then second halves
    q_rows = torch.cat([h * hd + dims[h // group] for h in range(plan.heads)])
    kv_rows = torch.cat([g * hd + dims[g] for g in range(plan.kv_heads)])
    block.q_proj.weight.copy_(src.q[q_rows][:, stream])
    block.k_proj.weight.copy_(src.k[kv_rows][:, stream])
    block.v_proj.weight.copy_(src.v[kv_rows][:, stream])
    block.o_proj.weight.copy_(src.o[stream][:, q_rows])
    block.inv_freq.copy_(torch.stack([inv_freq[p] for p in pairs]))
    units = _top(src.gate.abs().sum(1) + src.up.abs().sum(1) + src.down.abs().sum(0), plan.side_intermediate)
    block.gate_proj.weight.copy_(src.gate[units][:, stream])
    block.up_proj.weight.copy_(src.up[units][:, stream])
    block.down_proj.weight.copy_(src.down[stream][:, units])
    block.attn_norm.weight.copy_(src.ln1[stream])
    block.mlp_norm.weight.copy_(src.ln2[stream])


def build_lst_lm(backbone: nn.Module, cfg: PeftConfig) -> LSTCausalLM:
    """Freeze an HF Llama-style causal LM and put a pruned-initialised side network beside it (its device)."""
    inner = getattr(backbone, "model", None)
    layers = getattr(inner, "layers", None)
    rotary = getattr(inner, "rotary_emb", None)
    if not isinstance(layers, nn.ModuleList) or rotary is None or not hasattr(layers[0], "self_attn"):
        raise ValueError(
            f"peft.method='lst' on a causal LM supports Llama-style decoders (model.layers, model.rotary_emb); "
            f"{type(backbone).__name__} is not one"
        )
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ValueError("peft.method='lst' supports the default rotary embedding only (attention_scaling 1)")
    for p in backbone.parameters():
        p.requires_grad_(False)
    plan = plan_lm(cfg, backbone.config)
    side = LMSideNetwork(plan=plan, eps=float(getattr(backbone.config, "rms_norm_eps", 1e-6)))
    sources = [_LlamaLayer(layers[i]) for i in plan.layers]
    stream = _top(sum(s.stream_scores() for s in sources), plan.side_hidden)
    inv_freq = rotary.inv_freq.detach().float().cpu()
    with torch.no_grad():
        for block, src in zip(side.blocks, sources, strict=True):
            _copy_block(block, src, plan, stream, inv_freq)
        for ladder in side.ladders:  # start as the selection of the kept residual dimensions
            ladder.weight.zero_()
            ladder.weight[torch.arange(plan.side_hidden), stream] = 1.0
            ladder.bias.zero_()
        side.up.weight.zero_()  # round 0 = the backbone's own logits
    device = next(backbone.parameters()).device
    return LSTCausalLM(backbone=backbone, side=side.to(device)).eval()
