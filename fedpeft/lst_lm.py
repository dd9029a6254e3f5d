"""Ladder Side-Tuning on a frozen Llama-style causal LM (SmolLM2): side network, output, generation.

The classifier's LST (fedpeft/lst.py, whose docstring says why LST is not a peft tuner) carries
over: ladders down-project the embeddings and every chosen decoder layer's hidden states to the
side width ``H / r``, gates mix them into the side stream (the paper's eq. 1), and the ladder
inputs come from the frozen backbone run alone per example (fedpeft/lst_store.py stores them).
What is new for a decoder:

- **Side blocks are Llama blocks** at the side width: pre-RMSNorm, causal grouped-query
  attention with rotary positions, SwiGLU feed-forward, no biases (as the backbone's). Each
  keeps every query and key/value head at ``head_dim / r`` dimensions, chosen as whole rotary
  pairs (HF's ``rotate_half`` pairs dimension i with i + head_dim / 2), and rotates them with
  the backbone's own frequencies of the kept pairs, so a pruned block starts as the backbone
  layer restricted to those coordinates (fedpeft/lst_lm_build.py).
- **The output goes through the frozen tied embedding matrix**, not a head of its own: a
  49,152-row head at side width 72 alone would be 3.5 M trainable parameters (LoRA r = 8 on every
  linear of SmolLM2 is 2.44 M), and a new head starts knowing no tokens. The side stream is
  RMS-normalised, up-projected to the hidden size and added to the backbone's final (normed)
  hidden state, which the frozen LM head (= the embeddings) turns into logits:
  ``logits = E (h_final + W_up norm(s))``. ``W_up`` starts at zero, so round 0 predicts exactly
  what the backbone does (as LoRA's ``B = 0`` does) and the side network learns a correction in
  the space the embeddings already read. The last decoder layer must therefore be a ladder layer
  (its output after the final norm is ``h_final``; ``peft.lst-every`` always keeps it).
- **Generation** has no KV cache through the side network: :meth:`LSTCausalLM.generate` runs the
  whole sequence again for each new token (fine for short label replies; quadratic in length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.lst import LadderGate, LSTModel, batch_ladder_states


@dataclass(frozen=True)
class LMPlan:
    """The causal-LM side network's shape, from the backbone's config and ``peft.lst-*``."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    num_layers: int
    reduction: int
    layers: tuple[int, ...]

    @property
    def side_hidden(self) -> int:
        return self.hidden // self.reduction

    @property
    def side_head_dim(self) -> int:
        return self.head_dim // self.reduction

    @property
    def side_intermediate(self) -> int:
        return self.intermediate // self.reduction

    @property
    def num_ladders(self) -> int:
        """Ladder inputs per token: the embeddings and every chosen layer's output."""
        return len(self.layers) + 1

    def block_params(self) -> int:
        """One side block: q, k, v, o, SwiGLU gate / up / down, two RMSNorm weights (no biases)."""
        d, dh, i = self.side_hidden, self.side_head_dim, self.side_intermediate
        attn = d * self.heads * dh + 2 * d * self.kv_heads * dh + self.heads * dh * d
        return attn + 3 * d * i + 2 * d

    def num_params(self) -> int:
        """Trainable (and travelling) scalars: ladders, gates, side blocks, output norm and up-projection."""
        d = self.side_hidden
        ladders = self.num_ladders * (self.hidden * d + d)
        return ladders + len(self.layers) * (self.block_params() + 1) + d + d * self.hidden

    def bytes_per_token(self) -> int:
        """fp32 bytes a stored example takes per token (:mod:`fedpeft.lst_store`)."""
        return self.num_ladders * self.hidden * 4


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LlamaSideBlock(nn.Module):
    """A Llama decoder layer at the side width; ``inv_freq`` (kv heads, pairs) holds the kept pairs' frequencies."""

    def __init__(self, *, plan: LMPlan, eps: float) -> None:
        super().__init__()
        d, dh, i = plan.side_hidden, plan.side_head_dim, plan.side_intermediate
        self.heads, self.kv_heads, self.head_dim = plan.heads, plan.kv_heads, dh
        self.attn_norm = nn.RMSNorm(d, eps=eps)
        self.q_proj = nn.Linear(d, plan.heads * dh, bias=False)
        self.k_proj = nn.Linear(d, plan.kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, plan.kv_heads * dh, bias=False)
        self.o_proj = nn.Linear(plan.heads * dh, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=eps)
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        # Not trained, not sent: a function of the backbone (every client builds the same). Persistent, so an
        # export keeps the frequencies its blocks were pruned with even if the loader quantizes differently.
        self.register_buffer("inv_freq", torch.ones(plan.kv_heads, dh // 2))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        angles = torch.arange(t, device=x.device, dtype=torch.float32)[None, :, None] * self.inv_freq[:, None, :]
        angles = torch.cat((angles, angles), dim=-1)  # (kv heads, t, head dim), as HF's rotary embedding
        cos, sin = angles.cos()[None].to(x.dtype), angles.sin()[None].to(x.dtype)
        k = k * cos + _rotate_half(k) * sin
        group = self.heads // self.kv_heads
        q = q * cos.repeat_interleave(group, 1) + _rotate_half(q) * sin.repeat_interleave(group, 1)
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        x = x + self.o_proj(ctx)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LMSideNetwork(nn.Module):
    """Ladders, gates, Llama side blocks, output norm and up-projection: what LST trains and sends."""

    def __init__(self, *, plan: LMPlan, eps: float) -> None:
        super().__init__()
        self.plan = plan
        self.ladders = nn.ModuleList(nn.Linear(plan.hidden, plan.side_hidden) for _ in range(plan.num_ladders))
        self.gates = nn.ModuleList(LadderGate() for _ in plan.layers)
        self.blocks = nn.ModuleList(LlamaSideBlock(plan=plan, eps=eps) for _ in plan.layers)
        self.out_norm = nn.RMSNorm(plan.side_hidden, eps=eps)
        self.up = nn.Linear(plan.side_hidden, plan.hidden, bias=False)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, seq, hidden)`` final hidden states from ladder inputs ``(batch, ladders, seq, hidden)``."""
        t = states.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=states.device).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        # Every real query sees key 0 (right padding), so no row is fully masked.
        mask_bias = torch.zeros(allowed.shape, dtype=states.dtype, device=states.device)
        mask_bias = mask_bias.masked_fill(~allowed, torch.finfo(states.dtype).min)
        s = self.ladders[0](states[:, 0])
        for j, (block, gate) in enumerate(zip(self.blocks, self.gates, strict=True)):
            s = gate(torch.stack([self.ladders[j + 1](states[:, j + 1]), block(s, mask_bias)], dim=1))
        # The last ladder input is the backbone's final, normed hidden state (the last layer is always a ladder).
        return states[:, -1] + self.up(self.out_norm(s))


@dataclass
class LMOutput:
    """What HF causal LMs return, as far as fedpeft reads it."""

    logits: torch.Tensor


class LSTCausalLM(LSTModel):
    """A frozen HF causal LM (``backbone``) read by a trainable :class:`LMSideNetwork`; logits via its tied head."""

    def side_logits(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token logits of the side network on ladder inputs (the frozen LM head, no autograd into it)."""
        return self.backbone.get_output_embeddings()(self.side(states, attention_mask))

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, seq, hidden)``: what the tied head reads, from right-padded ids (ladder inputs computed)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.side(batch_ladder_states(self, batch), attention_mask.to(input_ids.device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> LMOutput:
        return LMOutput(self.backbone.get_output_embeddings()(self.final_hidden(input_ids, attention_mask)))

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, generation_config=None, **_: object
    ) -> torch.Tensor:
        """Greedy decoding without a KV cache (the side network has none): one full forward per new token.

        Accepts what fedpeft/lm_eval.py's ``greedy_replies`` passes (left-padded prompts, a
        ``GenerationConfig`` with ``max_new_tokens``, ``pad_token_id``, ``eos_token_id``) and
        returns ``(batch, width + new)`` ids like ``generate``: prompt columns as given, then the
        new tokens, ``pad_token_id`` after a row's end of sequence.
        """
        if generation_config is None or getattr(generation_config, "do_sample", False):
            raise ValueError("LST generation is greedy only: pass a GenerationConfig with do_sample=False")
        n_new, pad, eos = (
            generation_config.max_new_tokens,
            generation_config.pad_token_id,
            generation_config.eos_token_id,
        )
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = []
        for ids, m in zip(input_ids, mask, strict=True):
            seq = ids[m.bool()].tolist()  # the prompt without its (left) padding
            new: list[int] = []
            for _step in range(n_new):
                last = self.final_hidden(torch.tensor([seq + new], device=ids.device))[:, -1]
                token = int(self.backbone.get_output_embeddings()(last)[0].argmax())  # the last position only
                new.append(token)
                if token == eos:
                    break
            rows.append(new + [pad] * (n_new - len(new)))
        return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)], dim=1)
