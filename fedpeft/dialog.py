"""The embedded dialog set: the English part of ``chatterbot-corpus`` 1.3.3 as multi-turn examples.

The package (BSD-3, no runtime dependencies) ships one YAML file per category under
``chatterbot_corpus/data/english``; each holds ``conversations``, a list of blocks, each block a
list of turns. It is read by path (the package has no loader of its own) with PyYAML's safe loader
(a dependency of ``datasets``).

Turns alternate user / assistant, starting with the user. A block gives **one example per
assistant turn** (turns 2, 4, ...): every reply in the corpus is trained on with all the turns
before it as context, as chat SFT data is laid out; a block of n turns gives n // 2 examples, and
a last user turn with no reply is not a target. The group of an example is its category (the file
name); categories with fewer than :data:`MIN_CATEGORY_BLOCKS` blocks are merged into ``other``,
which leaves ten groups (tech_support alone holds half the blocks: a natural non-IID split).
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

from fedpeft.config import ConfigError

log = logging.getLogger(__name__)

# 30 blocks: the 7 categories under 20 blocks (health has 1) cannot fill a client, and 30 merges
# the 5 more of 22-28 blocks too, leaving ten groups of 31-1050 blocks: the default
# partition.num-partitions=10 gives one client per group.
MIN_CATEGORY_BLOCKS = 30
OTHER_GROUP = "other"


def dialog_corpus_dir() -> Path:
    """The English YAML folder inside the installed ``chatterbot-corpus`` package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.dataset='embedded-dialog' needs the chatterbot-corpus package: pip install chatterbot-corpus==1.3.3"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    if not any(folder.glob("*.yml")):
        raise ConfigError(f"{folder} holds no .yml files; reinstall with pip install chatterbot-corpus==1.3.3")
    return folder


def read_dialog_blocks(folder: Path) -> dict[str, list[list[str]]]:
    """``{category: blocks}`` from every ``*.yml`` of ``folder``; each block a list of >= 2 turns.

    A block that is not a list (trivia.yml has one, a question whose indentation made YAML read
    the question and its answer as one string) or has fewer than two turns has no reply and is
    skipped, with a debug line.
    """
    import yaml

    corpus: dict[str, list[list[str]]] = {}
    for path in sorted(folder.glob("*.yml")):
        with path.open(encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        blocks = []
        for block in doc.get("conversations") or []:
            if isinstance(block, list) and len(block) >= 2:
                # YAML reads an unquoted 1984 or yes as int / bool; the corpus means text
                blocks.append([str(turn).strip() for turn in block])
            else:
                log.debug("%s: skipped a block that is not a list of turns: %.60r", path.name, block)
        corpus[path.stem] = blocks
    return corpus


def merge_small_groups(corpus: dict[str, list[list[str]]], min_blocks: int) -> dict[str, str]:
    """Category -> group: categories with fewer than ``min_blocks`` blocks become ``other``."""
    return {cat: cat if len(blocks) >= min_blocks else OTHER_GROUP for cat, blocks in corpus.items()}


def block_examples(turns: list[str], group: str) -> list:
    """One :class:`~fedpeft.instruct.Example` per assistant turn (odd positions), with all earlier turns.

    Empty turns are not replies: an empty assistant turn gives no example.
    """
    from fedpeft.instruct import Example

    messages = tuple({"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns))
    return [
        Example(messages=messages[:i], response=turns[i], group=group)
        for i in range(1, len(turns), 2)
        if turns[i] and all(m["content"] for m in messages[:i])
    ]


@lru_cache(maxsize=1)
def _cached_blocks() -> tuple[tuple, ...]:
    corpus = read_dialog_blocks(dialog_corpus_dir())
    groups = merge_small_groups(corpus, MIN_CATEGORY_BLOCKS)
    units = tuple(
        tuple(ex) for cat, blocks in corpus.items() for turns in blocks if (ex := block_examples(turns, groups[cat]))
    )
    log.info(
        "embedded-dialog: %d blocks, %d examples, %d groups",
        len(units),
        sum(map(len, units)),
        len(set(groups.values())),
    )
    return units


def load_dialog_blocks() -> list[list]:
    """The corpus' examples, one list per block, in file and block order (read once per process)."""
    return [list(unit) for unit in _cached_blocks()]
