"""Endless batches: the one loop first-order training, cohorts and SPSA all step through.

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
