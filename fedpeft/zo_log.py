"""The SPSA server log: its entries, its replay and its byte-exact wire format.

The log is append-only, one :class:`RoundLog` per server round: the codec scale and
learning rate of the round, the averaging weight, and every aggregated client's codes.
Replaying it in order from the initial adapter reproduces the server's global adapter
bit for bit on the same kind of CPU (:func:`replay_round`); a client that missed rounds
catches up by replaying the tail it is sent (:func:`pack_log` / :func:`unpack_log`).

Wire format (little endian), per round: ``round u32, scale f32, lr f32, weight f32,
entries u16`` (18 bytes), then per entry ``partition u16, n u16`` and ``n`` one-byte
codes. ``n = 0xFFFF`` means "your own codes, which you already hold": a client that was
in the round is never sent its own bytes back. The round header of the downlink is
``scale f32, lr f32, hash 8 bytes`` (:data:`HEADER`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedpeft import onebyte

if TYPE_CHECKING:
    import torch

ROUND = struct.Struct("<IfffH")
ENTRY = struct.Struct("<HH")
HEADER = struct.Struct("<ff8s")
YOURS = 0xFFFF


def f32(x: float) -> float:
    """``x`` rounded to float32 (every scale / lr / weight that travels is one)."""
    return float(np.float32(x))


@dataclass(frozen=True)
class RoundLog:
    """One round of the log. ``entries`` are ``(partition id, codes)``; codes ``None`` = yours."""

    round: int
    scale: float
    lr: float
    weight: float
    entries: tuple[tuple[int, bytes | None], ...] = ()

    def __post_init__(self) -> None:
        for name in ("scale", "lr", "weight"):
            value = getattr(self, name)
            if value != f32(value):
                raise ValueError(f"RoundLog.{name}={value!r} is not a float32 value; round it with f32()")


def replay_round(
    master: Mapping[str, torch.Tensor],
    entry: RoundLog,
    *,
    run_seed: int,
    codec: str,
    distribution: str = "gaussian",
    own_codes: bytes | None = None,
) -> int:
    """Apply one round's updates to ``master`` in (partition id, step) order; return the step count.

    ``theta <- theta - sum_i sum_k weight * lr * g_hat_ik * z(seed(round, i, k))``; an entry
    whose codes are ``None`` ("yours") uses ``own_codes``. The directions are torch's
    CPU generator stream (what the clients draw), so replaying needs torch: it is imported
    here, not at module level, so the wire format can be read without it.
    """
    from fedpeft.zo import apply_direction_, direction_seed, perturbation, step_coefficient

    shapes = {n: tuple(t.shape) for n, t in master.items()}
    steps = 0
    for pid, codes in sorted(entry.entries, key=lambda e: e[0]):
        if codes is None:
            if own_codes is None:
                raise ValueError(f"round {entry.round}: the log refers to partition {pid}'s own codes, which it lacks")
            codes = own_codes
        g_hat = onebyte.decode(onebyte.from_bytes(codes, codec), entry.scale, codec=codec)
        for step, value in enumerate(g_hat):
            z = perturbation(direction_seed(run_seed, entry.round, pid, step), shapes, distribution)
            apply_direction_(master, z, step_coefficient(entry.lr, float(value), entry.weight))
            steps += 1
    return steps


def pack_log(rounds: Iterable[RoundLog], *, yours: int | None = None) -> bytes:
    """Serialise rounds; partition ``yours`` gets a 4-byte marker instead of its own codes."""
    out = bytearray()
    for entry in rounds:
        out += ROUND.pack(entry.round, entry.scale, entry.lr, entry.weight, len(entry.entries))
        for pid, codes in sorted(entry.entries, key=lambda e: e[0]):
            if pid == yours:
                out += ENTRY.pack(pid, YOURS)
                continue
            if codes is None or len(codes) >= YOURS:
                raise ValueError(f"round {entry.round} partition {pid}: cannot pack codes {codes!r}")
            out += ENTRY.pack(pid, len(codes)) + codes
    return bytes(out)


def unpack_log(data: bytes) -> list[RoundLog]:
    """The inverse of :func:`pack_log` (own entries come back with codes ``None``)."""
    rounds, pos = [], 0
    view = memoryview(data)
    while pos < len(data):
        round_, scale, lr, weight, count = ROUND.unpack_from(view, pos)
        pos += ROUND.size
        entries: list[tuple[int, bytes | None]] = []
        for _ in range(count):
            pid, n = ENTRY.unpack_from(view, pos)
            pos += ENTRY.size
            if n == YOURS:
                entries.append((pid, None))
            else:
                if pos + n > len(data):
                    raise ValueError("truncated SPSA log")
                entries.append((pid, bytes(view[pos : pos + n])))
                pos += n
        rounds.append(RoundLog(round_, scale, lr, weight, tuple(entries)))
    return rounds


def pack_header(scale: float, lr: float, state_hash: bytes) -> bytes:
    """The per-round downlink header: this round's scale and lr, and the hash of theta_r."""
    return HEADER.pack(scale, lr, state_hash)


def unpack_header(data: bytes) -> tuple[float, float, bytes]:
    """``(scale, lr, hash)`` from :func:`pack_header`."""
    return HEADER.unpack(data)
