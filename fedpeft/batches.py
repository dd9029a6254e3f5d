"""Endless batches: the one loop first-order training, cohorts and SPSA all step through, and how many steps.

A leaf (no imports) so ``zo.py``, which the SPSA strategy uses on the server, does not pull in the
training stack to get it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def cycle_batches(batches: Iterable) -> Iterator:
    """Yield from ``batches`` again and again (a DataLoader reshuffles from its own seeded generator
    each pass); raise ``ValueError`` when a pass yields nothing, where a bare loop would never end."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("no batches to take local steps on (empty partition or data-path file?)")


def planned_steps(num_batches: int, local_steps: int, local_epochs: int) -> int:
    """Local steps a client takes per round: ``train.local-steps`` when set, else ``local-epochs`` passes
    over ``num_batches`` batches (training and the privacy plan both count with this)."""
    return local_steps if local_steps > 0 else local_epochs * num_batches
