"""Frozen-prefix cache: train and evaluate only the encoder layers that a PEFT method touches.

When every trainable parameter sits in encoder layers ``>= k``, the pooler or the head
(LoRA with ``peft.layers = "4,5"``: ``k = 4``; ``peft.method = "head"``: ``k =`` the number
of layers), the embeddings and layers ``< k`` are a fixed function of the input tokens.
:class:`PrefixCache` computes their output once per distinct example, with those modules in
eval mode (dropout off) and without autograd, and :meth:`PrefixCache.logits` runs layers
``k..``, the pooler and the head on the cached hidden states. With dropout off its logits
and gradients equal the full forward's to fp tolerance (tested). In training mode the
difference from the full forward is that the frozen layers below ``k`` see no dropout.

The key of a cached example is its token ids (and token type ids) over the attention mask:
the prefix is a function of exactly these, so the key is stable across partitions, the
test set, node data files and Opacus' Poisson re-sampling, with no index to thread through
the loaders. Hidden states are stored unpadded (fp32, on the model's device); batches must
be right-padded (BERT-family tokenizers are), because BERT's absolute positions would
shift under left padding. Storage stops growing at ``max_bytes``; later misses are
computed and not kept, so results never depend on the bound.

The store is shared by every model in the process whose frozen prefix is the same: its key
is ``k`` and a SHA-256 over the prefix's parameters and buffers (embeddings, layers ``< k``),
so the seeds of a sweep that run in one worker process (Ray reuses task workers) compute
each example's prefix once, and a model whose prefix differs by one bit gets its own store. A miss is computed alone and
unpadded, so its stored state does not depend on the batch it arrived in.

Only the BERT-family layout is supported (``embeddings``, ``encoder.layer``, ``pooler``,
a sequence classifier with ``dropout`` + ``classifier``); :func:`build_prefix_cache` returns
None for anything else, and for ``k = 0`` (LoRA on every layer, IA3, prompt tuning,
BitFit, full fine-tuning), whose path does not change at all.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

#: default bound on one process' cached hidden states (about 20k MiniLM snippets at 64 tokens)
DEFAULT_MAX_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class EncoderStack:
    """The modules of a BERT-family sequence classifier that a split forward calls."""

    classifier_model: nn.Module  # e.g. BertForSequenceClassification (inside peft's wrapper)
    encoder: nn.Module  # e.g. BertModel: embeddings, encoder.layer, pooler
    layers: nn.ModuleList


def find_stack(model: nn.Module) -> EncoderStack | None:
    """The BERT-family modules of ``model`` (a peft model or a plain HF classifier), or None."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = getattr(hf, "base_model", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    config = getattr(encoder, "config", None)
    usable = (
        isinstance(layers, nn.ModuleList)
        and isinstance(getattr(encoder, "embeddings", None), nn.Module)
        and isinstance(getattr(hf, "dropout", None), nn.Module)
        and isinstance(getattr(hf, "classifier", None), nn.Module)
        and config is not None
        and not getattr(config, "is_decoder", False)
    )
    return EncoderStack(hf, encoder, layers) if usable else None


def first_trainable_layer(model: nn.Module) -> int | None:
    """``k``: the lowest encoder layer holding a trainable parameter (number of layers if none).

    A trainable parameter outside the encoder layers, the pooler and the head (embeddings,
    a prompt encoder) gives 0; a model without the BERT-family layout gives None.
    """
    stack = find_stack(model)
    if stack is None:
        return None
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    top = {id(p) for p in stack.classifier_model.classifier.parameters()}
    pooler = getattr(stack.encoder, "pooler", None)
    if isinstance(pooler, nn.Module):
        top |= {id(p) for p in pooler.parameters()}
    in_layers = set()
    k = len(stack.layers)
    for i in reversed(range(len(stack.layers))):
        ids = {id(p) for p in stack.layers[i].parameters()}
        in_layers |= ids
        if ids & trainable:
            k = i
    return 0 if trainable - top - in_layers else k


@contextmanager
def _eval_mode(modules: list[nn.Module]):
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


class PrefixCache:
    """Cached outputs of the frozen embeddings + layers ``< k``, and the forward over the rest.

    Parameters
    ----------
    model : nn.Module
        The PEFT model; its frozen prefix must never change while this cache lives.
    k : int
        The first trainable layer, ``1 <= k <=`` number of layers (:func:`first_trainable_layer`).
    max_bytes : int
        Bound on the stored hidden states; beyond it misses are recomputed every time.
    """

    def __init__(self, model: nn.Module, k: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        stack = find_stack(model)
        if stack is None or not 1 <= k <= len(stack.layers):
            raise ValueError(f"no frozen prefix to cache (k={k}) in {type(model).__name__}")
        self.model, self.stack, self.k, self.max_bytes = model, stack, k, max_bytes
        self._store = _shared_store(prefix_fingerprint(stack, k))
        self._states: dict[bytes, torch.Tensor] = self._store["states"]
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes of hidden states in the (shared) store."""
        return self._store["nbytes"]

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        """Drop every stored hidden state (of every model sharing this prefix)."""
        self._states.clear()
        self._store["nbytes"] = 0

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of a tokenized, right-padded batch: cached prefix, then layers ``k..``, pooler, head."""
        device = next(p for p in self.model.parameters()).device
        mask = batch["attention_mask"].to(device)
        hidden = self.hidden_states(batch)
        extended = self._extended_mask(hidden, mask)
        for layer in self.stack.layers[self.k :]:
            hidden = _first(layer(hidden, extended))
        pooler = getattr(self.stack.encoder, "pooler", None)
        if pooler is not None and hasattr(pooler, "mask"):  # MaskedMeanPooler reads the mask it is given
            pooler.mask = mask
        pooled = pooler(hidden) if pooler is not None else hidden[:, 0]
        hf = self.stack.classifier_model
        return hf.classifier(hf.dropout(pooled))

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, seq, hidden) output of layer ``k - 1`` (zeros at padding), filling the cache on misses."""
        mask = batch["attention_mask"].bool()
        if not torch.equal(mask, mask.int().cummin(dim=1).values.bool()):
            raise ValueError("the prefix cache needs right-padded batches; set train.prefix-cache = 'off'")
        lengths = mask.sum(1).tolist()
        keys = [_key(batch, i, n) for i, n in enumerate(lengths)]
        missing = [i for i, key in enumerate(keys) if key not in self._states]
        fresh = self._compute(batch, missing, lengths)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = []
        for i, key in enumerate(keys):
            state = fresh.get(i)
            if state is None:
                state = self._states[key]
            elif self.nbytes + state.numel() * state.element_size() <= self.max_bytes:
                self._states[key] = state
                self._store["nbytes"] += state.numel() * state.element_size()
            rows.append(state)
        out = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        width = mask.shape[1] - out.shape[1]
        return nn.functional.pad(out, (0, 0, 0, width)) if width > 0 else out

    @torch.no_grad()
    def _compute(self, batch: dict[str, torch.Tensor], rows: list[int], lengths: list[int]) -> dict[int, torch.Tensor]:
        # One example at a time, unpadded: the stored state is a pure function of the tokens,
        # not of the batch an example first arrived in, so a run's numbers do not depend on
        # which clients this process served before (determinism across Ray schedules).
        device = next(p for p in self.model.parameters()).device
        frozen = [self.stack.encoder.embeddings, *self.stack.layers[: self.k]]
        out = {}
        with _eval_mode(frozen):
            for i in rows:
                n = lengths[i]
                inputs = {k: batch[k][i : i + 1, :n].to(device) for k in ("input_ids", "token_type_ids") if k in batch}
                hidden = self.stack.encoder.embeddings(**inputs)
                extended = self._extended_mask(hidden, torch.ones(1, n, dtype=torch.long, device=device))
                for layer in self.stack.layers[: self.k]:
                    hidden = _first(layer(hidden, extended))
                out[i] = hidden[0]
        return out

    def _extended_mask(self, hidden: torch.Tensor, mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        # What BertModel.forward builds for an encoder (sdpa: None when nothing is padded).
        return create_bidirectional_mask(config=self.stack.encoder.config, inputs_embeds=hidden, attention_mask=mask)


#: stores of cached hidden states, one per distinct frozen prefix in this process
_STORES: dict[tuple[int, str], dict] = {}


def prefix_fingerprint(stack: EncoderStack, k: int) -> tuple[int, str]:
    """``(k, sha256)`` of the embeddings' and layers ``< k``' tensors: what the cached states are a function of."""
    digest = hashlib.sha256()
    for module in (stack.encoder.embeddings, *stack.layers[:k]):
        for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
            if not isinstance(tensor, torch.Tensor):
                continue
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return k, digest.hexdigest()


def _shared_store(key: tuple[int, str]) -> dict:
    if key not in _STORES:
        _STORES[key] = {"states": {}, "nbytes": 0}
    return _STORES[key]


def clear_stores() -> None:
    """Empty every process-wide store (tests, or to free memory); caches keep their (empty) store."""
    for store in _STORES.values():
        store["states"].clear()
        store["nbytes"] = 0


def build_prefix_cache(model: nn.Module, max_bytes: int = DEFAULT_MAX_BYTES) -> PrefixCache | None:
    """A :class:`PrefixCache` for ``model``, or None when nothing below the trainable top is frozen."""
    k = first_trainable_layer(model)
    if not k:
        return None
    return PrefixCache(model, k, max_bytes=max_bytes)


def _first(out):
    # transformers 5 layers return a tensor, 4.x a tuple.
    return out[0] if isinstance(out, tuple) else out


def _key(batch: dict[str, torch.Tensor], i: int, length: int) -> bytes:
    ids = batch["input_ids"][i, :length]
    types = batch.get("token_type_ids")
    parts = [ids] if types is None else [ids, types[i, :length]]
    return b"".join(t.to("cpu", torch.int64).numpy().tobytes() for t in parts)
