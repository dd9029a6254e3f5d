"""Activations once: a client's stored LST ladder inputs, so later rounds run only the side network.

LST never changes the frozen backbone, and the backbone runs in eval mode (no dropout) with
the fixed padding rule of :func:`fedpeft.lst.example_ladder_states` (each example alone,
unpadded). A client's ladder inputs (the embeddings and every chosen layer's hidden states)
are therefore the same in every round: the first round computes and stores them, later
rounds read them and run the side network only. Stored and recomputed states are bitwise
equal, so a run's numbers do not depend on whether the store hit (tested).

- Key of an example: its token ids (and token type ids), as in fedpeft/prefix_cache.py: stable
  across shuffles, Opacus' Poisson batches and the loader's per-batch padding.
- One store per client, on disk at ``<run folder>/lst-store/<fingerprint>/client-<id>.safetensors``:
  Flower's Ray backend serves different clients from an actor each round, so a client's next
  round finds its states wherever it runs (and after a resume). The fingerprint hashes what the
  states are a function of: the backbone settings and the chosen layers (``store_fingerprint``).
- fp32, bounded by ``train.lst-store-mb`` per client: beyond it, examples are recomputed each
  round (same numbers, backbone cost) and a warning says so once per store.
- The server's evaluation uses an in-memory store of its own (the test set, never on disk).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from fedpeft.config import ModelConfig
from fedpeft.lst import LSTModel, batch_ladder_states, example_ladder_states

log = logging.getLogger(__name__)

FORMAT = "fedpeft-lst-store/1"
STORE_FOLDER = "lst-store"


def store_fingerprint(model_cfg: ModelConfig, layers: tuple[int, ...]) -> str:
    """16 hex digits of SHA-256 over the backbone settings and the ladder layers (what states depend on)."""
    text = json.dumps({"model": dataclasses.asdict(model_cfg), "layers": list(layers)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key(ids: torch.Tensor, types: torch.Tensor | None) -> bytes:
    parts = [ids] if types is None else [ids, types]
    return b"".join(t.to("cpu", torch.int64).numpy().tobytes() for t in parts)


class ActivationStore:
    """Ladder inputs ``(num_ladders, len, hidden)`` per example, fp32 on the CPU, within ``max_bytes``.

    Parameters
    ----------
    max_bytes : int
        Bound on stored bytes (``train.lst-store-mb`` x 2**20); beyond it misses are recomputed.
    path : Path, optional
        The client's file: read on creation when present (same fingerprint), written by :meth:`save`.
    fingerprint : str
        :func:`store_fingerprint`; a file with another fingerprint is ignored (and replaced).
    """

    def __init__(self, *, max_bytes: int, path: Path | None = None, fingerprint: str = "") -> None:
        self.max_bytes, self.path, self.fingerprint = max_bytes, path, fingerprint
        self.states: dict[bytes, torch.Tensor] = {}
        self.tokens: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.nbytes = self.hits = self.misses = self.skipped = 0
        self._dirty = self._warned = False
        if path is not None and path.is_file():
            self._load(path)

    def __len__(self) -> int:
        return len(self.states)

    @property
    def bytes_per_example(self) -> float:
        """Mean stored bytes per example (0 when empty)."""
        return self.nbytes / len(self.states) if self.states else 0.0

    def fetch(self, model: LSTModel, ids: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        """One example's ladder inputs: stored, or computed (and kept while the budget allows)."""
        key = _key(ids, types)
        state = self.states.get(key)
        if state is not None:
            self.hits += 1
            return state
        self.misses += 1
        state = example_ladder_states(model, ids, types).cpu()
        size = state.numel() * state.element_size()
        if self.nbytes + size <= self.max_bytes:
            self.states[key] = state
            self.tokens[key] = (ids.cpu(), None if types is None else types.cpu())
            self.nbytes += size
            self._dirty = True
        else:
            self.skipped += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "LST activation store %s is full (%.1f MB of train.lst-store-mb=%.1f): further examples are "
                    "recomputed through the backbone every round; raise train.lst-store-mb or use fewer ladder "
                    "layers (peft.lst-every)",
                    self.path or "(in memory)",
                    self.nbytes / 2**20,
                    self.max_bytes / 2**20,
                )
        return state

    def fill(self, model: LSTModel, loader) -> None:
        """Store every example of ``loader`` that is not stored yet (a client's first round: all its rows).

        Filling the whole partition at once, not only the batches the first round happens to
        draw, is what makes every later round a pure side-network round (no backbone, no save).
        """
        for batch in loader:
            mask = batch["attention_mask"].bool()
            types = batch.get("token_type_ids")
            for i, n in enumerate(mask.sum(1).tolist()):
                self.fetch(model, batch["input_ids"][i, :n], None if types is None else types[i, :n])

    def logits_fn(self, model: LSTModel):
        """``batch -> logits`` of ``model``'s side network on this store's ladder inputs."""

        def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            states = batch_ladder_states(model, batch, lambda ids, tt: self.fetch(model, ids, tt))
            return model.side_logits(states, batch["attention_mask"].to(states.device))

        return logits

    def save(self) -> None:
        """Write the store to its file (atomically) if it has a path and changed since the last read/write."""
        if self.path is None or not self._dirty or not self.states:
            return
        from safetensors.torch import save_file

        keys = list(self.states)
        ids = [self.tokens[k][0] for k in keys]
        types = [self.tokens[k][1] for k in keys]
        tensors = {
            # (total tokens, num_ladders, hidden): examples concatenated along their tokens
            "states": torch.cat([self.states[k].transpose(0, 1) for k in keys]).contiguous(),
            "input_ids": torch.cat(ids).to(torch.int64),
            "lengths": torch.tensor([len(t) for t in ids], dtype=torch.int64),
        }
        if all(t is not None for t in types):
            tensors["token_type_ids"] = torch.cat(types).to(torch.int64)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata={"format": FORMAT, "fingerprint": self.fingerprint})
        os.replace(tmp, self.path)
        self._dirty = False
        log.info(
            "LST store %s: %d examples, %.1f MB, %.0f bytes per example",
            self.path,
            len(self),
            self.nbytes / 2**20,
            self.bytes_per_example,
        )

    def _load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
                log.warning("ignoring %s: written for another backbone or ladder layers", path)
                return
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        states, ids, types = tensors["states"], tensors["input_ids"], tensors.get("token_type_ids")
        start = 0
        for n in tensors["lengths"].tolist():
            tt = None if types is None else types[start : start + n]
            key = _key(ids[start : start + n], tt)
            state = states[start : start + n].transpose(0, 1).contiguous()
            self.states[key] = state
            self.tokens[key] = (ids[start : start + n], tt)
            self.nbytes += state.numel() * state.element_size()
            start += n


# Client stores kept in this process: the last few clients served (a Ray actor serves a different
# client most rounds; the file is the durable copy) and the server's evaluation store.
_STORES: OrderedDict[tuple, ActivationStore] = OrderedDict()
MAX_CLIENT_STORES = 2


def client_store(*, store_dir: Path, fingerprint: str, partition_id: int | str, max_bytes: int) -> ActivationStore:
    """The store of client ``partition_id`` under ``store_dir`` (read from its file the first time)."""
    path = Path(store_dir) / fingerprint / f"client-{partition_id}.safetensors"
    key = ("client", str(path.resolve()), max_bytes)
    if key in _STORES:
        _STORES.move_to_end(key)
        return _STORES[key]
    store = ActivationStore(max_bytes=max_bytes, path=path, fingerprint=fingerprint)
    _STORES[key] = store
    clients = [k for k in _STORES if k[0] == "client"]
    for old in clients[:-MAX_CLIENT_STORES]:
        del _STORES[old]
    return store


def eval_store(*, fingerprint: str, max_bytes: int) -> ActivationStore:
    """The in-memory store for evaluation sets (the server's test set), one per fingerprint."""
    key = ("eval", fingerprint, max_bytes)
    if key not in _STORES:
        _STORES[key] = ActivationStore(max_bytes=max_bytes, fingerprint=fingerprint)
    return _STORES[key]


def clear_stores() -> None:
    """Forget every in-memory store (tests); files stay."""
    _STORES.clear()
