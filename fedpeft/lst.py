"""Ladder Side-Tuning (Sung, Cho, Bansal, NeurIPS 2022) on a frozen BERT-family backbone.

A small *side network* of width ``hidden / r`` reads the frozen backbone's hidden states
through *ladders* (learned down-projections ``H -> H/r``) and mixes each into its own stream
with a learned gate ``mu_j = sigmoid(alpha_j / T)`` (the paper's eq. 1, ``T = 0.1``):
``s_j = mu_j * ladder_j(h_{l_j}) + (1 - mu_j) * block_j(s_{j-1})``, ``s_0 = ladder_0(embeddings)``.
The classification head sits on the side network's output. Nothing back-propagates into the
backbone: it runs under ``torch.no_grad`` in eval mode, so training memory is the side
network's alone and, because the backbone never changes, a client's ladder inputs can be
computed once (fedpeft/lst_store.py).

Why not a peft tuner: peft's tuners inject into or wrap modules of the base model and keep
its forward (LoRA, IA3) or its input (prompts); LST adds a second network with its own
forward beside a backbone whose forward it only reads, and its head replaces the base's.
peft has no such tuner type, so the side network, its export format and its loader live here.

Initialisation (the paper's structural pruning, simplified): side block ``j`` starts as
backbone layer ``l_j`` pruned to the side width. The paper ranks weights by Fisher
information, which needs labelled data and gradients through the backbone; we rank by the
L1 norm of the weights instead (data-free, the same on every client and the server, so the
initial state needs no broadcast beyond the seed):

- residual-stream dimensions: the ``H/r`` with the largest L1 norm summed over every chosen
  layer's weights that read or write the stream (one set for all blocks, since the stream
  flows through them; the ladders start as the selection of exactly these dimensions, so the
  pruned blocks first see the coordinates the backbone layer saw);
- per attention head: the ``d_head/r`` dimensions with the largest L1 norm of their q/k/v rows
  and output columns (heads stay heads, as in the paper);
- feed-forward units: the ``I/r`` with the largest L1 norm of their input row and output column.

Gates start at ``alpha = 0`` (``mu = 0.5``); the head at N(0, 0.02) from ``derive_seed``. The
side network has no dropout: it keeps its forward deterministic (what makes stored and
recomputed activations give equal gradients) and Opacus' functorch per-sample gradients
simple. Whether it costs accuracy is not measured yet (docs/lst.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.config import ConfigError, PeftConfig

log = logging.getLogger(__name__)

GATE_TEMPERATURE = 0.1  # the paper's T


@dataclass(frozen=True)
class LSTPlan:
    """The side network's shape, from the backbone's config and ``peft.lst-*``."""

    hidden: int
    heads: int
    intermediate: int
    num_layers: int
    reduction: int
    layers: tuple[int, ...]

    @property
    def side_hidden(self) -> int:
        return self.hidden // self.reduction

    @property
    def side_head_dim(self) -> int:
        return self.hidden // self.heads // self.reduction

    @property
    def side_intermediate(self) -> int:
        return self.intermediate // self.reduction

    @property
    def num_ladders(self) -> int:
        """Ladder inputs per example: the embeddings and every chosen layer's output."""
        return len(self.layers) + 1

    def num_params(self, num_labels: int) -> int:
        """Trainable (and travelling) scalars: ladders, gates, side blocks and head."""
        d, i = self.side_hidden, self.side_intermediate
        block = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d  # q k v o, ffn in/out, 2 LayerNorms
        ladders = self.num_ladders * (self.hidden * d + d)
        return ladders + len(self.layers) * (block + 1) + d * num_labels + num_labels

    def bytes_per_token(self) -> int:
        """fp32 bytes a stored example takes per token (:mod:`fedpeft.lst_store`)."""
        return self.num_ladders * self.hidden * 4


def memory_summary(plan: LSTPlan, num_labels: int, *, batch_size: int, max_seq_len: int, optimizer: str) -> str:
    """``fedpeft check``'s line for LST: what a client holds besides the frozen backbone, and the store.

    Training state: each side parameter with its gradient (and AdamW's two moments), fp32. A
    batch's ladder inputs: ``batch x seq x ladders x hidden`` fp32 (the side network's own
    activations are ``1/r`` of that width). No backbone activation is kept for a backward.
    """
    params = plan.num_params(num_labels)
    state = params * 4 * (2 + (2 if optimizer == "adamw" else 0))
    ladders = batch_size * max_seq_len * plan.bytes_per_token()
    per_example = max_seq_len * plan.bytes_per_token()
    return (
        f"LST: side width {plan.side_hidden} (r={plan.reduction}) on layers {list(plan.layers)}; client memory "
        f"besides the frozen backbone ~{(state + ladders) / 2**20:.1f} MB (training state {state / 2**20:.1f} MB, "
        f"a batch's ladder inputs <= {ladders / 2**20:.1f} MB); store <= {per_example / 1024:.0f} KB per example "
        f"at data.max-seq-len={max_seq_len}"
    )


def chosen_layers(cfg: PeftConfig, num_layers: int) -> tuple[int, ...]:
    """``peft.lst-layers`` (``"" `` = all) or every ``peft.lst-every``-th layer, ending at the last one.

    Raises :class:`ConfigError` for an index outside ``0..num_layers-1``.
    """
    if cfg.lst_layers.strip():
        layers = tuple(sorted({int(v) for v in cfg.lst_layers.split(",") if v.strip()}))
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(
                f"peft.lst-layers {bad} are not layers of this backbone; it has layers 0..{num_layers - 1}"
            )
        return layers
    # Counting down from the top keeps the last layer, whose output carries the most task signal.
    return tuple(sorted(range(num_layers - 1, -1, -cfg.lst_every)))


def plan_lst(cfg: PeftConfig, *, hidden: int, heads: int, intermediate: int, num_layers: int) -> LSTPlan:
    """Check ``peft.lst-reduction`` against the backbone and return the side network's shape."""
    r = cfg.lst_reduction
    head_dim = hidden // heads
    if hidden % r or head_dim % r or intermediate % r:
        valid = [d for d in range(1, head_dim + 1) if head_dim % d == 0 and hidden % d == 0 and intermediate % d == 0]
        raise ConfigError(
            f"peft.lst-reduction={r} must divide the hidden size {hidden}, the head size {head_dim} and the "
            f"feed-forward size {intermediate} of this backbone (heads are pruned one by one); valid: {valid}"
        )
    return LSTPlan(hidden, heads, intermediate, num_layers, r, chosen_layers(cfg, num_layers))


def plan_for_backbone(backbone: nn.Module, cfg: PeftConfig) -> LSTPlan:
    """:func:`plan_lst` for an HF BERT-family model (its ``config``)."""
    c = backbone.config
    return plan_lst(
        cfg,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        intermediate=c.intermediate_size,
        num_layers=c.num_hidden_layers,
    )


class LadderGate(nn.Module):
    """``mu * ladder + (1 - mu) * side`` with ``mu = sigmoid(alpha / T)``, on ``pair = stack([ladder, side], 1)``.

    One stacked input, because Opacus computes per-sample gradients of a module it has no rule
    for (a raw parameter such as ``alpha``) with functorch from the module's first input only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        mu = torch.sigmoid(self.alpha / GATE_TEMPERATURE)
        return mu * pair[:, 0] + (1 - mu) * pair[:, 1]


class SideBlock(nn.Module):
    """A post-LayerNorm BERT layer at the side width (attention, then GELU feed-forward)."""

    def __init__(self, *, hidden: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
        )
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + mask_bias
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class SideNetwork(nn.Module):
    """Ladders, gates, side blocks and head: everything LST trains and sends."""

    def __init__(self, *, plan: LSTPlan, num_labels: int, pooling: str, eps: float = 1e-12) -> None:
        super().__init__()
        self.plan, self.pooling = plan, pooling
        self.ladders = nn.ModuleList(nn.Linear(plan.hidden, plan.side_hidden) for _ in range(plan.num_ladders))
        self.gates = nn.ModuleList(LadderGate() for _ in plan.layers)
        self.blocks = nn.ModuleList(
            SideBlock(hidden=plan.side_hidden, heads=plan.heads, intermediate=plan.side_intermediate, eps=eps)
            for _ in plan.layers
        )
        self.head = nn.Linear(plan.side_hidden, num_labels)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from ladder inputs ``(batch, num_ladders, seq, hidden)`` and the ``(batch, seq)`` mask."""
        mask = attention_mask.to(states.dtype)
        mask_bias = ((1.0 - mask) * torch.finfo(states.dtype).min)[:, None, None, :]
        s = self.ladders[0](states[:, 0])
        for j, (block, gate) in enumerate(zip(self.blocks, self.gates, strict=True)):
            s = gate(torch.stack([self.ladders[j + 1](states[:, j + 1]), block(s, mask_bias)], dim=1))
        if self.pooling == "mean":  # as backbone.MaskedMeanPooler: masked mean, L2-normalised
            m = mask.unsqueeze(-1)
            pooled = F.normalize((s * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)
        else:
            pooled = s[:, 0]  # the [CLS] position, which BERT's own pooler reads
        return self.head(pooled)


@dataclass
class LSTOutput:
    """What HF sequence classifiers return, as far as fedpeft reads it."""

    logits: torch.Tensor


class LSTModel(nn.Module):
    """A frozen HF encoder classifier (``backbone``) read by a trainable :class:`SideNetwork` (``side``).

    The backbone stays in eval mode whatever ``train()`` is called with (no dropout: its
    activations are then a fixed function of the tokens) and runs without autograd.
    """

    def __init__(self, *, backbone: nn.Module, side: SideNetwork) -> None:
        super().__init__()
        self.backbone, self.side = backbone, side

    def train(self, mode: bool = True) -> LSTModel:
        super().train(mode)
        self.backbone.eval()
        return self

    def side_logits(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The side network's logits on ladder inputs (stored or computed); the causal LM adds its tied head."""
        return self.side(states, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        **_: object,
    ) -> LSTOutput:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return LSTOutput(self.side(batch_ladder_states(self, batch), attention_mask))


@torch.no_grad()
def example_ladder_states(
    model: LSTModel, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
) -> torch.Tensor:
    """``(num_ladders, len, hidden)`` fp32 ladder inputs of ONE unpadded example.

    The fixed padding rule: every example runs alone and unpadded, so its states are a pure
    function of its tokens, whatever batch it arrives in (stored and recomputed states are
    bitwise equal; batched padding would change the last bits with the batch's length).
    """
    encoder = model.backbone.base_model
    kwargs = {"input_ids": input_ids[None], "attention_mask": torch.ones_like(input_ids)[None]}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids[None]
    hidden = encoder(**kwargs, output_hidden_states=True).hidden_states
    picks = [0, *(layer + 1 for layer in model.side.plan.layers)]  # hidden_states[i + 1] = layer i's output
    return torch.stack([hidden[i][0].float() for i in picks])


def batch_ladder_states(model: LSTModel, batch: dict[str, torch.Tensor], fetch=None) -> torch.Tensor:
    """``(batch, num_ladders, seq, hidden)``: each right-padded row's states, zeros at padding.

    ``fetch(ids, token_type_ids)`` returns one unpadded example's states (an activation store's
    lookup, fedpeft/lst_store.py); the default computes them (:func:`example_ladder_states`).
    """
    device = next(model.side.parameters()).device
    mask = batch["attention_mask"].bool()
    if not torch.equal(mask, mask.int().cummin(dim=1).values.bool()):
        raise ValueError("peft.method='lst' needs right-padded batches (BERT-family tokenizers pad right)")
    types = batch.get("token_type_ids")
    plan = model.side.plan
    out = torch.zeros(mask.shape[0], plan.num_ladders, mask.shape[1], plan.hidden, device=device)
    for i, n in enumerate(mask.sum(1).tolist()):
        ids = batch["input_ids"][i, :n].to(device)
        tt = types[i, :n].to(device) if types is not None else None
        state = example_ladder_states(model, ids, tt) if fetch is None else fetch(ids, tt)
        out[i, :, :n] = state.to(device)
    return out
