"""Batches and the loss of causal-LM instruction tuning: targets are the response tokens only.

Each example is encoded by :func:`fedpeft.instruct.encode` (the tokenizer's chat template;
``labels`` are -100 on every prompt token). Batches are padded on the **right**: with right
padding every row's positions are 0..n-1 without explicit position ids (left padding would
shift them unless the model derives positions from the mask), and the padded positions get
target -100 so they contribute nothing. Generation, which appends after the last real token,
pads on the left instead (fedpeft/lm_eval.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the target of prompt and padding positions (PyTorch's cross_entropy ignore_index)


def encode_rows(tokenizer, examples: list, max_seq_len: int) -> list[dict[str, list[int]]]:
    """``{"input_ids", "labels"}`` of every example (prompt truncated, responses whole; see instruct.encode)."""
    from fedpeft.instruct import encode

    return [encode(tokenizer, ex, max_seq_len) for ex in examples]


def pad_right(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack rows of unequal length: inputs padded with ``pad_id`` (mask 0), labels with -100."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_lm_loader(
    examples: list,
    tokenizer,
    *,
    max_seq_len: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """Right-padded batches of encoded examples; shuffling draws from ``generator`` only."""
    if not examples:
        raise ValueError("cannot build a loader over an empty data set (empty partition?)")
    rows = encode_rows(tokenizer, examples, max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        return pad_right(batch, pad_id)

    return torch.utils.data.DataLoader(
        rows, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed next-token loss over target positions, and each example's number of targets.

    Position t predicts token t+1, so logits drop the last position and targets the first.
    Prompt tuning prepends virtual tokens to the logits (not to the labels): only the last
    ``labels.shape[1]`` positions are the sequence's own.
    """
    logits = logits[:, -labels.shape[1] :, :]
    shift_labels = labels[:, 1:].to(logits.device)
    targets = shift_labels != IGNORE
    # Only target positions are scored: a softmax over the whole vocabulary at every prompt and padding
    # position (SmolLM2: 49,152 logits each, most positions ignored) was most of a tiny model's step.
    rows, cols = targets.nonzero(as_tuple=True)
    per_target = F.cross_entropy(logits[rows, cols].float(), shift_labels[rows, cols], reduction="none")
    sums = per_target.new_zeros(labels.shape[0]).index_add(0, rows, per_target)
    return sums, targets.sum(dim=1)


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean response-token loss.

    Per-example means (not one mean over every token of the batch) make the batch loss a
    mean of per-example losses, which is what Opacus' ``loss_reduction="mean"`` assumes for
    DP-SGD, and weigh a long reply no more than a one-word one.
    """
    sums, counts = token_losses(logits, labels)
    if bool((counts == 0).any()):
        raise ValueError("an example has no response token to train on; check instruct.encode's labels")
    return (sums / counts).mean()
