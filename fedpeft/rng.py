"""Deterministic seeds for every random draw.

Every draw in fedpeft comes from an explicit generator seeded by
:func:`derive_seed`; library code never touches global RNG state. The hash is
stable across processes and Python versions (``hash()`` is salted per process,
so it cannot be used).
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(base: int, purpose: str, round_: int = 0, client: int = 0) -> int:
    """Return a 63-bit seed for ``purpose`` in ``round_`` for ``client``.

    Parameters
    ----------
    base : int
        The run seed.
    purpose : str
        What the draw is for (``"partition"``, ``"head-init"``, ``"batches"``...).
    round_, client : int
        Server round and partition id; 0 where they do not apply.
    """
    text = f"{base}|{purpose}|{round_}|{client}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def numpy_rng(base: int, purpose: str, round_: int = 0, client: int = 0) -> np.random.Generator:
    """A numpy generator seeded by :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(base, purpose, round_, client))


def torch_generator(base: int, purpose: str, round_: int = 0, client: int = 0):
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed` (torch imported here: servers need no torch)."""
    import torch

    return torch.Generator(device="cpu").manual_seed(derive_seed(base, purpose, round_, client))
