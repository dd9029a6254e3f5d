"""Instruction data for the causal-LM task: loading, the embedded sets, the chat-template encoding.

An :class:`Example` is the chat turns before a response plus the response itself. Sources:

- ``embedded``: the Rotten Tomatoes snippets of :mod:`fedpeft.data`, with exactly the train and
  test rows the classifier uses (so the two tasks' numbers compare); the user turn is the
  instruction followed by ``Review: <snippet>``, the response the label word.
- ``embedded-dialog``: the English part of ``chatterbot-corpus`` 1.3.3 (BSD-3; fedpeft/dialog.py).
- a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` / ``.parquet`` file or an HF dataset name:
  Alpaca-style instruction / input / response columns, or a ``messages`` column in HF chat format
  (fedpeft/instruct_files.py).

:func:`encode` and :func:`encode_prompt` apply the tokenizer's own chat template; prompts are
truncated, responses never.
"""

from __future__ import annotations

import dataclasses
import logging

from fedpeft.chat_example import ROLES, Example, InstructionSplits  # noqa: F401 (the contract's names)
from fedpeft.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

EMBEDDED_DIALOG = "embedded-dialog"
IGNORE_INDEX = -100  # torch's CrossEntropyLoss ignore_index: prompt tokens are not scored


def load_instruction_splits(
    data_cfg: DataConfig, *, label_words: tuple[str, ...], instruction: str, seed: int
) -> InstructionSplits:
    """The train pool and test set named by ``data.dataset``, sized by ``data.num-*-examples``.

    Parameters
    ----------
    data_cfg : DataConfig
        ``dataset`` = ``embedded``, ``embedded-dialog``, a local file or an HF dataset name.
    label_words : tuple of str
        Word of each label. ``embedded``: one per label in the classifier's label order
        (``fresh``, ``rotten``). Files: when every response is one of them the task is a
        label-word task (``label`` set); otherwise the data is free-form and they are not used.
    instruction : str
        The user turn's opening text for ``embedded`` (the snippet follows it); unused elsewhere.
    seed : int
        The run seed. The test split uses :data:`fedpeft.data.TEST_SPLIT_SEED` instead, as the
        classifier does, so every seed of an experiment is scored on the same held-out rows.

    Raises
    ------
    ConfigError
        A missing response column (the columns found are listed), an empty response (row
        number), a messages list without an assistant turn, an unknown file extension, fewer
        rows than asked, label words that do not match the labels.
    """
    del seed  # the split is fixed on purpose (see above); kept for the contract's signature
    label_words = tuple(label_words)
    if data_cfg.dataset == "embedded":
        return _embedded_snippets(data_cfg, label_words, instruction)
    if data_cfg.dataset == EMBEDDED_DIALOG:
        from fedpeft.dialog import load_dialog_blocks

        return _split(data_cfg, load_dialog_blocks(), ())
    from fedpeft.instruct_files import load_file_examples

    examples = load_file_examples(data_cfg)
    words = label_words if label_words and all(e.response.strip() in label_words for e in examples) else ()
    if label_words and not words:
        first = next(e.response for e in examples if e.response.strip() not in label_words)
        log.info("%s: response %r is not a label word; free-form task", data_cfg.dataset, first[:40])
    if words:
        examples = [
            dataclasses.replace(e, response=e.response.strip(), label=words.index(e.response.strip())) for e in examples
        ]
    return _split(data_cfg, [[e] for e in examples], words)


def _embedded_snippets(cfg: DataConfig, label_words: tuple[str, ...], instruction: str) -> InstructionSplits:
    """The classifier's splits (same rows, same order) with label words as responses."""
    from fedpeft.data import load_splits

    splits = load_splits(cfg)  # the classifier's cache entry: the same rows, read once
    names = splits.train.label_names
    if len(label_words) != len(names) or len(set(label_words)) != len(label_words):
        raise ConfigError(
            f"data.dataset='embedded' has labels {list(names)}: give {len(names)} distinct label words in that "
            f"order (e.g. positive,negative), got {list(label_words)}"
        )

    def convert(data) -> list[Example]:
        head = f"{instruction.strip()}\n" if instruction.strip() else ""
        return [
            Example(
                messages=({"role": "user", "content": f"{head}Review: {text}"},),
                response=label_words[int(label)],
                label=int(label),
            )
            for text, label in zip(data.texts, data.labels, strict=True)
        ]

    return InstructionSplits(
        train=convert(splits.train),
        test=convert(splits.test),
        label_words=label_words,
        validation=convert(splits.validation) if splits.validation is not None else None,
    )


def _split(cfg: DataConfig, units: list[list[Example]], label_words: tuple[str, ...]) -> InstructionSplits:
    """Shuffle the units with the fixed split seed, cut the test set, then the training pool.

    A unit is one file row, or all the examples of one dialog block, which stay on one side of
    the cut (a test prompt never holds a training response). With one example per unit this
    is :func:`fedpeft.data.load_splits`' rule: the same permutation, the same sizes and checks.
    """
    from fedpeft.data import TEST_SPLIT_SEED
    from fedpeft.rng import numpy_rng

    total = sum(len(u) for u in units)
    order = numpy_rng(TEST_SPLIT_SEED, "data-split").permutation(len(units))
    n_test = _fit_size_config(cfg, "num_test_examples", total // 5, f"a fifth of the {total} examples")
    test: list[Example] = []
    taken = 0
    while len(test) < n_test:
        test.extend(units[order[taken]][: n_test - len(test)])  # a block cut at the boundary loses its tail
        taken += 1
    pool = [e for u in order[taken:] for e in units[u]]
    if cfg.num_train_examples:
        left = f"the {len(pool)} examples left after the {n_test} test examples"
        pool = pool[: _fit_size_config(cfg, "num_train_examples", len(pool), left)]
    log.info("instruction data %s: %d train pool, %d test", cfg.dataset, len(pool), len(test))
    return InstructionSplits(train=pool, test=test, label_words=label_words)


def _fit_size_config(cfg: DataConfig, attr: str, maximum: int, what: str) -> int:
    """:func:`fedpeft.data._fit_size` with its error as a :class:`ConfigError`."""
    from fedpeft.data import _fit_size

    try:
        return _fit_size(cfg, attr, maximum, what)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# --- encoding with the tokenizer's chat template ---------------------------------------------------


def encode(tokenizer, example: Example, max_seq_len: int) -> dict[str, list[int]]:
    """Token ids of prompt + response and the labels that score only the response.

    The targets are the tokens the chat template puts after the generation prompt: the
    response and its end-of-turn token (the template's text after that token, SmolLM2's
    newline, is dropped: generation stops at end-of-turn); whitespace around the response is
    not trained on. Every prompt token's label is
    ``-100``. The prompt is truncated to ``max_seq_len`` minus the targets as
    :func:`encode_prompt` does; a response that cannot fit raises :class:`ConfigError`.
    """
    return _encode(tokenizer, example, max_seq_len)[0]


def _encode(tokenizer, example: Example, max_seq_len: int) -> tuple[dict[str, list[int]], int]:
    """:func:`encode`'s row and the untruncated prompt's length."""
    full, targets = _prompt_and_targets(tokenizer, example)
    what = f"the response {_short(example.response)}"
    prompt = _fit_prompt(tokenizer, example, max_seq_len - len(targets), reserved=len(targets), what=what, ids=full)
    return {"input_ids": prompt + targets, "labels": [IGNORE_INDEX] * len(prompt) + targets}, len(full) + len(targets)


def encode_examples(tokenizer, examples: list[Example], max_seq_len: int) -> list[dict[str, list[int]]]:
    """:func:`encode` of every example; responses that cannot fit are counted in one error.

    The error says how many do not fit and the ``data.max-seq-len`` that holds them all, so a
    data set is fixed in one try rather than one example at a time; cut prompts are counted in
    one warning.
    """
    encoded, too_long, cut = [], [], []
    for example in examples:
        try:
            row, whole = _encode(tokenizer, example, max_seq_len)
        except _ResponseTooLong as err:
            too_long.append(err)
            continue
        encoded.append(row)
        if whole > max_seq_len:
            cut.append(whole)
    if too_long:
        worst = max(too_long, key=lambda err: err.needed)
        raise ConfigError(
            f"{len(too_long)} of {len(examples)} responses cannot fit data.max-seq-len={max_seq_len} with their chat "
            f"template (the longest, {worst.what}, needs {worst.needed}); raise data.max-seq-len to {worst.needed} "
            "or remove the long responses from the data"
        )
    if cut:
        log.warning(
            "%d of %d prompts were cut to fit data.max-seq-len=%d (the longest example takes %d tokens); "
            "raise data.max-seq-len to keep them whole",
            len(cut),
            len(examples),
            max_seq_len,
            max(cut),
        )
    return encoded


def encode_prompt(tokenizer, example: Example, max_seq_len: int, reserve: int = 0) -> list[int]:
    """The prompt with the generation prompt, at most ``max_seq_len - reserve`` tokens.

    Truncation keeps the template intact and works on the text of the turns: first whole
    (user, assistant) pairs of the oldest turns are dropped (system turns stay), then the
    last user turn keeps its beginning (the instruction comes first, the review or input
    after it) and loses its end, token by token.
    """
    ids = _template_ids(tokenizer, list(example.messages), generation_prompt=True)
    return _fit_prompt(tokenizer, example, max_seq_len - reserve, reserved=reserve, what="the reserve", ids=ids)


def _template_ids(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    # The text path is used because apply_chat_template(tokenize=True) returns a list in transformers 4
    # and a BatchEncoding in 5; the template already holds every special token.
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; use an instruct / "
            "chat model (the embedded SmolLM2-135M-Instruct has one)"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _ResponseTooLong(ConfigError):
    """The template and the reserved tokens alone exceed data.max-seq-len (``needed``: the least that fits)."""

    def __init__(self, message: str, *, needed: int, what: str) -> None:
        super().__init__(message)
        self.needed, self.what = needed, what


def _short(text: str, width: int = 30) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _prompt_and_targets(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """The full generation prompt, and the template's tokens after it up to and including end-of-turn."""
    prompt = _template_ids(tokenizer, list(example.messages), generation_prompt=True)
    full = _template_ids(
        tokenizer,
        # stripped: whitespace at the start would merge with the template's newline (SmolLM2's "\n\n" token)
        # and hide where the response begins; many templates (Llama 3's) trim it themselves
        [*example.messages, {"role": "assistant", "content": example.response.strip()}],
        generation_prompt=False,
    )
    if full[: len(prompt)] != prompt:
        raise ConfigError(
            "the tokenizer's chat template does not extend the generation prompt with the reply, so the response "
            "tokens cannot be told apart; use a model whose template does (or give the tokenizer a chat_template)"
        )
    targets = full[len(prompt) :]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in targets:
        targets = targets[: len(targets) - targets[::-1].index(eos)]
    return prompt, targets


def _fit_prompt(tokenizer, example: Example, budget: int, *, reserved: int, what: str, ids: list[int]) -> list[int]:
    """The generation prompt (``ids`` untruncated) in at most ``budget`` tokens (see :func:`encode_prompt`)."""
    if len(ids) <= budget:
        return ids
    messages = [dict(m) for m in example.messages]
    # 1. drop the two oldest non-system turns while a turn would remain to answer
    while len(ids) > budget:
        turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
        if len(turns) < 3:
            break
        del messages[turns[1]], messages[turns[0]]
        ids = _template_ids(tokenizer, messages, generation_prompt=True)
    if len(ids) <= budget:
        return ids
    # 2. cut the end of the last user turn
    last = max(i for i, m in enumerate(messages) if m["role"] != "system")
    content = messages[last]["content"]
    empty = _template_ids(tokenizer, _with_content(messages, last, ""), generation_prompt=True)
    if len(empty) > budget:
        needed = len(empty) + reserved + 1  # one token of the last user turn
        raise _ResponseTooLong(
            f"data.max-seq-len={budget + reserved} is too small: the chat template alone takes {len(empty)} tokens "
            f"and {what} takes {reserved}; raise data.max-seq-len to at least {needed} "
            "(or shorten the response / the system turn)",
            needed=needed,
            what=what,
        )
    pieces = list(tokenizer(content, add_special_tokens=False)["input_ids"])
    keep = min(len(pieces), budget - len(empty))
    while keep >= 0:
        # decoding a prefix and re-tokenizing it inside the template can merge tokens differently
        text = tokenizer.decode(pieces[:keep])
        ids = _template_ids(tokenizer, _with_content(messages, last, text), generation_prompt=True)
        if len(ids) <= budget:
            return ids
        keep -= 1
    return empty


def _with_content(messages: list[dict[str, str]], index: int, content: str) -> list[dict[str, str]]:
    out = [dict(m) for m in messages]
    out[index]["content"] = content
    return out
