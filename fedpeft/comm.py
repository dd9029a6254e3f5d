"""Byte accounting: an append-only ledger of what crossed the wire.

Two measures per message, in both directions:
- payload bytes: what the algorithm must send (raw array bytes; one-byte codes);
- message bytes: ``count_bytes()`` of every record in the message (headers, keys,
  metrics and config included), i.e. what Flower serialises.
Totals are derived by queries over the rows (as Opacus' accountant keeps its history).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

UP = "up"
DOWN = "down"


@dataclass(frozen=True)
class LedgerRow:
    """One message: round, partition id, direction, payload and message bytes."""

    round: int
    partition_id: int
    direction: str
    payload_bytes: int
    message_bytes: int
    kind: str = "train"


def payload_bytes(content) -> int:
    """Raw bytes the algorithm sends in a ``RecordDict``: array data plus ``bytes`` config values."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            # Array.data is serialised .npy (with a ~128-byte header): count the raw elements.
            total += int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
    return total


def message_bytes(content) -> int:
    """``count_bytes()`` summed over every record of a ``RecordDict``."""
    return sum(record.count_bytes() for record in content.values())


class Ledger:
    """Append-only rows; every total is a query."""

    def __init__(self) -> None:
        self._rows: list[LedgerRow] = []

    def record(self, row: LedgerRow) -> None:
        """Append one row."""
        self._rows.append(row)

    def record_message(self, round_: int, partition_id: int, direction: str, content, kind: str = "train") -> None:
        """Append a row measured from a message's ``RecordDict``."""
        self.record(LedgerRow(round_, partition_id, direction, payload_bytes(content), message_bytes(content), kind))

    @property
    def rows(self) -> tuple[LedgerRow, ...]:
        """All rows, oldest first."""
        return tuple(self._rows)

    def totals(self, round_: int | None = None, direction: str | None = None) -> dict[str, int]:
        """Payload and message byte totals, optionally for one round and/or direction."""
        out = {"payload_bytes": 0, "message_bytes": 0}
        for row in self._rows:
            if (round_ is None or row.round == round_) and (direction is None or row.direction == direction):
                out["payload_bytes"] += row.payload_bytes
                out["message_bytes"] += row.message_bytes
        return out

    def per_round(self) -> dict[int, dict[str, int]]:
        """``{round: {uplink_payload_bytes, uplink_message_bytes, downlink_...}}`` of the algorithm's messages.

        Per-client evaluation (rows of kind ``evaluate``) is a measurement, not the algorithm's
        communication: its rows stay in the ledger and out of the byte axis.
        """
        out: dict[int, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(
                ("uplink_payload_bytes", "uplink_message_bytes", "downlink_payload_bytes", "downlink_message_bytes"),
                0,
            )
        )
        for row in self._rows:
            if row.kind == "evaluate":
                continue
            prefix = "uplink" if row.direction == UP else "downlink"
            out[row.round][f"{prefix}_payload_bytes"] += row.payload_bytes
            out[row.round][f"{prefix}_message_bytes"] += row.message_bytes
        return dict(out)

    def to_json(self) -> list[dict]:
        """Rows as plain dicts for the results file."""
        return [asdict(r) for r in self._rows]

    @classmethod
    def from_json(cls, rows: list[dict]) -> Ledger:
        """The ledger whose :meth:`to_json` gave ``rows`` (a resumed run continues it)."""
        ledger = cls()
        for row in rows:
            ledger.record(LedgerRow(**row))
        return ledger
