"""Scoring a causal LM on held-out instructions, in numbers a person can read.

- **Label-word accuracy** (MeZO / "Just One Byte"'s prompt + verbalizer scoring): the
  predicted label is the word with the highest log-likelihood after the prompt, a
  multi-token word scored as the sum of its tokens' log-probabilities (the whole word).
  When every label word is one token, its score is read off the same teacher-forced forward
  that gives the response loss (the logits at the last prompt position), so scoring costs
  no extra forward; otherwise each word gets a forward of prompt + word.
- **Exact match**: greedy generation (``task.max-new-tokens``), parsed to the first label
  word found in the reply (the model answers "The review is positive.", not "positive"),
  on the first ``task.num-generate-eval`` prompts (-1: all): every generated token is one
  more forward of the model, so on a CPU a subset keeps the evaluation short.
- **Response loss / perplexity**: mean next-token loss over every response token of the
  test set (the trained targets: response and end-of-turn), and its exponential.
- **Balanced accuracy** and per-label accuracy of the label-word predictions.
- A few **sample generations** (``task.num-sample-generations``) for the run folder.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.backbone import compute_context
from fedpeft.config import ConfigError
from fedpeft.lm_batches import IGNORE, encode_rows, pad_right, token_losses


def label_word_ids(tokenizer, words: tuple[str, ...]) -> list[list[int]]:
    """Each label word's tokens as the chat template writes them in a reply (end-of-turn excluded).

    Raises :class:`ConfigError` when a word has no token or two words tokenize alike.
    """
    from fedpeft.instruct import Example, encode

    ids = []
    for word in words:
        row = encode(tokenizer, Example(messages=({"role": "user", "content": "?"},), response=word), 4096)
        targets = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE]
        if targets and targets[-1] == tokenizer.eos_token_id:
            targets = targets[:-1]
        if not targets:
            raise ConfigError(f"task.label-words entry {word!r} has no token in this tokenizer; use a real word")
        ids.append(targets)
    if len({tuple(t) for t in ids}) != len(ids):
        raise ConfigError(f"task.label-words {list(words)} tokenize to the same ids; choose distinct words")
    return ids


def _first_target(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != IGNORE)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, prompts: list[list[int]], continuation: list[int], *, pad_id: int, batch_size: int
) -> torch.Tensor:
    """``sum_t log p(continuation_t | prompt, continuation_<t)`` for every prompt (shape ``(N,)``)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = [{"input_ids": p + continuation, "labels": [IGNORE] * len(p) + continuation} for p in chunk]
        batch = pad_right(rows, pad_id)
        with compute_context(model):
            logits = model(
                input_ids=batch["input_ids"].to(_device(model)),
                attention_mask=batch["attention_mask"].to(_device(model)),
            ).logits
        sums, _ = token_losses(logits, batch["labels"])
        out.append(-sums.cpu())
    return torch.cat(out)


def label_word_scores(
    model: nn.Module, prompts: list[list[int]], words: list[list[int]], *, pad_id: int, batch_size: int
) -> torch.Tensor:
    """``(N, W)`` log-likelihood of each label word (all its tokens) after each prompt."""
    return torch.stack(
        [continuation_logprobs(model, prompts, w, pad_id=pad_id, batch_size=batch_size) for w in words], dim=1
    )


def parse_label(reply: str, words: tuple[str, ...]) -> int:
    """Index of the first label word found in ``reply`` (whole word, any case); -1 if none is."""
    if not words:
        return -1
    pattern = r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b"
    match = re.search(pattern, reply, flags=re.IGNORECASE)
    if match is None:
        return -1
    lowered = [w.lower() for w in words]
    return lowered.index(match.group(1).lower())


@torch.no_grad()
def greedy_replies(
    model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations of ``prompts``, decoded without special tokens.

    Batches are padded on the left here (new tokens follow each prompt's last token);
    transformers derives the positions from the attention mask.
    """
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id
    )
    replies: list[str] = []
    device = _device(model)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with compute_context(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies


@dataclass
class PrefillScores:
    """What one shared prefill per batch gives (:func:`prefill_scores`), per example."""

    loss_sums: torch.Tensor  # (N,) summed response-token loss
    token_counts: torch.Tensor  # (N,) response tokens
    word_scores: torch.Tensor | None  # (N, W) label-word log-likelihoods, None without words
    replies: list[str]  # greedy continuations of the prompts


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least its last token of its own.

    The chat template's system turn and the task's instruction open every prompt of a
    label-word set (about 40 of SmolLM2's ~70 prompt tokens), so they are encoded once.
    """
    if not prompts:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


@torch.no_grad()
def prefill_scores(
    model: nn.Module,
    tokenizer,
    rows: list[dict[str, list[int]]],
    words: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    num_generate: int | None = None,
) -> PrefillScores:
    """Response loss, label-word scores and greedy replies from one forward of each batch.

    The prompts' shared beginning (:func:`shared_prefix_length`: system turn and instruction)
    is encoded once, and its KV cache is repeated for every batch. After it, each row is laid
    out as ``[left padding][rest of prompt][response][right padding]`` so every prompt ends at
    the same column P: one forward with the KV cache gives the response loss (teacher forcing)
    and, at column P-1, the first reply token's distribution; the cache is then cropped back
    to the prompts (``DynamicCache.crop``) and reused for every further token of each label
    word and for greedy decoding. Positions come from the attention mask (the padding in the
    middle would otherwise shift them). Greedy replies are decoded for the first
    ``num_generate`` rows only (None: all): each decoding step is a forward of the whole
    model, and exact match on a subset is what a reader needs. Equal, up to float rounding,
    to the plain forwards of :func:`label_word_scores` and :func:`greedy_replies` (tested);
    not for prompt tuning, whose virtual tokens peft prepends on every call, nor for LST (no KV cache).
    """
    device, pad_id = _device(model), tokenizer.pad_token_id
    cuts = [_first_target(r["labels"]) for r in rows]
    shared = shared_prefix_length([r["input_ids"][:c] for r, c in zip(rows, cuts, strict=True)])
    prefix_cache = None
    if shared:
        prefix = torch.tensor([rows[0]["input_ids"][:shared]], device=device)
        with compute_context(model):
            prefix_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
    n_generate = len(rows) if num_generate is None else min(num_generate, len(rows))
    loss_sums, counts, word_scores, replies = [], [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        cut = [c - shared for c in cuts[start : start + batch_size]]
        width_p = max(cut)
        width_r = max(len(r["input_ids"]) - shared - c for r, c in zip(chunk, cut, strict=True))
        n = len(chunk)
        ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.full((n, width_r), IGNORE, dtype=torch.long)
        for i, (r, c) in enumerate(zip(chunk, cut, strict=True)):
            own = r["input_ids"][shared:]
            ids[i, width_p - c : width_p - c + len(own)] = torch.tensor(own)
            mask[i, width_p - c : width_p - c + len(own)] = 1
            targets[i, : len(own) - c] = torch.tensor(r["labels"][shared + c :])
        mask = torch.cat([torch.ones((n, shared), dtype=mask.dtype), mask], dim=1)  # the cached prefix
        ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(n)
        with compute_context(model):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos[:, shared:],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=width_r + 1,
            )
        logits = out.logits[:, -(width_r + 1) :].float()  # columns P-1 .. P+R-1
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        loss_sums.append(per_token.sum(1).cpu())
        counts.append((targets != IGNORE).sum(1).cpu())
        first = logits[:, 0].log_softmax(-1)
        cache = out.past_key_values
        end = shared + width_p  # the prompts' last column + 1, prefix included
        _crop_to(cache, end)
        prompt_mask, last_pos = mask[:, :end], pos[:, end - 1]

        if words:
            cols = []
            for w in words:
                score = first[:, w[0]].clone()
                if len(w) > 1:
                    more = _cached_step(
                        model, cache, torch.tensor([w[:-1]] * n, device=device), prompt_mask, last_pos, 0
                    ).log_softmax(-1)
                    score += more.gather(2, torch.tensor([w[1:]] * n, device=device)[..., None])[..., 0].sum(1)
                    _crop_to(cache, end)
                cols.append(score.cpu())
            word_scores.append(torch.stack(cols, dim=1))
        g = min(n, n_generate - start)
        if g > 0:
            if g < n:  # decode only the rows that are generated
                cache.batch_select_indices(torch.arange(g, device=device))
            replies += _greedy_from_cache(
                model, tokenizer, cache, first[:g], prompt_mask[:g], last_pos[:g], max_new_tokens
            )
    return PrefillScores(
        loss_sums=torch.cat(loss_sums),
        token_counts=torch.cat(counts),
        word_scores=torch.cat(word_scores) if words else None,
        replies=replies,
    )


def _greedy_from_cache(
    model: nn.Module,
    tokenizer,
    cache,
    first: torch.Tensor,
    prompt_mask: torch.Tensor,
    last_pos: torch.Tensor,
    max_new_tokens: int,
) -> list[str]:
    """Greedy replies after cached prompts, given the first reply token's log-probabilities."""
    pad_id, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    n = first.shape[0]
    token = first.argmax(-1)
    done = token == eos
    generated, past_mask = [token], prompt_mask
    for t in range(1, max_new_tokens):
        if bool(done.all()):
            break
        logits_t = _cached_step(model, cache, token[:, None], past_mask, last_pos, t - 1)
        past_mask = torch.cat([past_mask, torch.ones((n, 1), dtype=past_mask.dtype, device=past_mask.device)], dim=1)
        token = torch.where(done, torch.full_like(token, pad_id), logits_t[:, -1].argmax(-1))
        done |= token == eos
        generated.append(token)
    return tokenizer.batch_decode(torch.stack(generated, 1).cpu(), skip_special_tokens=True)


def _crop_to(cache, length: int) -> None:
    # A negative count removes that many tokens from the end, in transformers 4 and 5 alike.
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _cached_step(
    model: nn.Module, cache, tokens: torch.Tensor, past_mask: torch.Tensor, last_pos: torch.Tensor, offset: int
) -> torch.Tensor:
    """Logits of ``tokens`` (k per row) appended after the cached prompts, ``offset`` tokens past their end."""
    n, k = tokens.shape
    step_mask = torch.cat([past_mask, torch.ones((n, k), dtype=past_mask.dtype, device=past_mask.device)], dim=1)
    step_pos = last_pos[:, None] + offset + torch.arange(1, k + 1, device=tokens.device)[None]
    with compute_context(model):
        return model(
            input_ids=tokens, attention_mask=step_mask, position_ids=step_pos, past_key_values=cache, use_cache=True
        ).logits.float()


def reference_scores(
    model: nn.Module,
    tokenizer,
    rows: list[dict[str, list[int]]],
    words: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    num_generate: int | None = None,
) -> PrefillScores:
    """:func:`prefill_scores`' results from plain forwards (right-padded) and ``generate`` (prompt tuning)."""
    pad_id = tokenizer.pad_token_id
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = pad_right(rows[start : start + batch_size], pad_id)
            device = _device(model)
            with compute_context(model):
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
            s, c = token_losses(logits, batch["labels"])
            sums.append(s.cpu())
            counts.append(c.cpu())
    prompts = [r["input_ids"][: _first_target(r["labels"])] for r in rows]
    return PrefillScores(
        loss_sums=torch.cat(sums),
        token_counts=torch.cat(counts),
        word_scores=label_word_scores(model, prompts, words, pad_id=pad_id, batch_size=batch_size) if words else None,
        replies=greedy_replies(
            model, tokenizer, prompts[:num_generate], max_new_tokens=max_new_tokens, batch_size=batch_size
        ),
    )


def _is_prompt_learning(model: nn.Module) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def _is_lst(model: nn.Module) -> bool:
    from fedpeft.lst import LSTModel

    return isinstance(model, LSTModel)


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokenizer,
    examples: list,
    *,
    label_words: tuple[str, ...],
    max_seq_len: int,
    batch_size: int,
    max_new_tokens: int,
    num_samples: int,
    num_generate: int = -1,
) -> dict:
    """Every score of the module docstring over ``examples`` (the held-out set).

    Returns ``loss`` (mean response-token loss over all response tokens), ``perplexity``,
    ``accuracy`` (label-word ranking, every example), ``exact_match`` (parsed greedy reply, the
    first ``num_generate`` examples only; -1: every example), ``balanced_accuracy``, ``per_class_accuracy``, ``num_examples`` and ``generations``
    (the first ``num_samples`` examples: prompt, reply, target). The label scores are None
    for a free-form task (no label words) or when no example has a label.
    """
    model.eval()
    rows = encode_rows(tokenizer, examples, max_seq_len)
    words = label_word_ids(tokenizer, label_words) if label_words else []
    # LST's side network keeps no KV cache (fedpeft/lst_lm.py): plain forwards and its own greedy loop.
    score = reference_scores if _is_prompt_learning(model) or _is_lst(model) else prefill_scores
    n_match = len(rows) if num_generate < 0 else min(num_generate, len(rows))
    result = score(
        model,
        tokenizer,
        rows,
        words,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        num_generate=max(n_match, min(num_samples, len(rows))),
    )
    loss = float(result.loss_sums.sum()) / max(int(result.token_counts.sum()), 1)
    scores: dict = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "num_examples": float(len(rows)),
        "accuracy": None,
        "exact_match": None,
        "balanced_accuracy": None,
        "per_class_accuracy": None,
    }
    labelled = [i for i, ex in enumerate(examples) if ex.label >= 0]
    if words and labelled:
        predicted = result.word_scores[labelled].argmax(dim=1).tolist()
        truth = [examples[i].label for i in labelled]
        generated = [i for i in labelled if i < n_match]
        parsed = [parse_label(result.replies[i], label_words) for i in generated]
        per_class = []
        for c in range(len(label_words)):
            idx = [k for k, t in enumerate(truth) if t == c]
            per_class.append(sum(predicted[k] == c for k in idx) / len(idx) if idx else None)
        present = [a for a in per_class if a is not None]
        scores.update(
            accuracy=sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth),
            exact_match=(
                sum(p == examples[i].label for p, i in zip(parsed, generated, strict=True)) / len(generated)
                if generated
                else None
            ),
            balanced_accuracy=sum(present) / len(present),
            per_class_accuracy=per_class,
        )
    scores["generations"] = [
        {"prompt": examples[i].messages[-1]["content"], "reply": result.replies[i], "target": examples[i].response}
        for i in range(min(num_samples, len(examples)))
    ]
    return scores
