"""The instruction data's value types, in a leaf module the loaders share.

:mod:`fedpeft.instruct` (the contract's home of these names) re-exports them; the loaders of
fedpeft/dialog.py and fedpeft/instruct_files.py import them from here, so no import cycle
runs through instruct.py.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")  # the roles of HF's chat format


@dataclass(frozen=True)
class Example:
    """One training or test item: chat turns before the response, and the response."""

    messages: tuple[dict[str, str], ...]  # HF chat format {"role", "content"}, the turns before the response
    response: str  # the assistant reply that is trained on / scored
    group: str = ""  # natural id (e.g. dialog category) for partitioning; "" if none
    label: int = -1  # index into label_words for label-word tasks; -1 otherwise


@dataclass(frozen=True)
class InstructionSplits:
    """A training pool, a held-out test set and validation rows (``data.num-val-examples``, else None).

    ``label_words`` is ``()`` for free-form tasks.
    """

    train: list[Example]
    test: list[Example]
    label_words: tuple[str, ...]
    validation: list[Example] | None = None
