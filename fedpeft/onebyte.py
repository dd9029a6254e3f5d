"""One-byte codecs for SPSA projected gradients (Zelikman et al. 2023, "Just One Byte").

Two codecs, both with seeded stochastic rounding so that ``E[decode(encode(g))] = g``
for ``|g| <= scale`` (unbiased within range); values outside ``[-scale, scale]`` clip
to the end of the range, which bounds any one client's influence per step. ``scale``
is set by the server each round and travels downstream.

``int8`` (default)
    ``c = clip(floor(127 * g / scale + u), -127, 127)`` with ``u ~ U[0, 1)``, stored as
    ``np.int8``; decoded ``g_hat = c * scale / 127``. Error ``|g_hat - g| < scale / 127``
    inside the range. ``-128`` is never produced and is rejected when decoding.
``log8``
    Sign bit plus a 7-bit log level ``j`` (``np.uint8``: ``b = sign << 7 | j``). Level 0 is
    exactly zero; level ``j >= 1`` is the magnitude ``scale * exp((j - 127) / 8)``, so the
    range is ``[1.5e-7 * scale, scale]`` with a 13.3 % step. A magnitude between two levels
    rounds to one of them with probabilities that keep the mean exact. (JOB's own form,
    ``round(16 ln|g|)`` clamped to +-127 plus a sign, needs 9 bits.)

NaN never encodes: :func:`encode` raises :class:`NonFiniteGradient`; the caller decides
what to send instead (the SPSA client sends :func:`zero_code`, a step of exactly 0).
"""

from __future__ import annotations

import numpy as np

CODECS = ("int8", "log8")
INT8_LEVELS = 127
LOG8_LEVELS = 127
LOG8_PER_E_FOLD = 8.0


class NonFiniteGradient(ValueError):
    """A projected gradient to encode is NaN."""


def code_dtype(codec: str) -> np.dtype:
    """The numpy dtype of ``codec``'s codes (one byte each)."""
    _check_codec(codec)
    return np.dtype(np.int8) if codec == "int8" else np.dtype(np.uint8)


def zero_code(codec: str) -> np.ndarray:
    """One code that decodes to exactly 0 at any scale (a skipped step)."""
    return np.zeros(1, dtype=code_dtype(codec))


def log8_magnitudes(scale: float) -> np.ndarray:
    """``log8``'s 128 magnitudes, level 0 (= 0) to level 127 (= ``scale``), in float64."""
    levels = np.arange(LOG8_LEVELS + 1, dtype=np.float64)
    mags = float(scale) * np.exp((levels - LOG8_LEVELS) / LOG8_PER_E_FOLD)
    mags[0] = 0.0
    return mags


def encode(values, scale: float, *, codec: str = "int8", rng: np.random.Generator) -> np.ndarray:
    """Encode projected gradients into one byte each.

    Parameters
    ----------
    values : array_like of float
        The projected gradients ``g``.
    scale : float
        ``s > 0``: the codes cover ``[-s, s]``; larger magnitudes clip to ``+-s``.
    codec : {"int8", "log8"}
    rng : numpy.random.Generator
        Source of the stochastic-rounding draws (seeded by the caller, so auditable).

    Returns
    -------
    numpy.ndarray
        ``int8`` (``codec="int8"``) or ``uint8`` (``codec="log8"``) codes, one per value.
    """
    _check_codec(codec)
    _check_scale(scale)
    g = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if np.isnan(g).any():
        raise NonFiniteGradient(f"cannot encode NaN projected gradient(s) at positions {np.flatnonzero(np.isnan(g))}")
    u = rng.random(g.shape)
    if codec == "int8":
        x = np.clip(g * (INT8_LEVELS / scale), -INT8_LEVELS, INT8_LEVELS)
        return np.clip(np.floor(x + u), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    mags = log8_magnitudes(scale)
    a = np.minimum(np.abs(g), scale)
    lower = np.clip(np.searchsorted(mags, a, side="right") - 1, 0, LOG8_LEVELS)
    upper = np.minimum(lower + 1, LOG8_LEVELS)
    gap = mags[upper] - mags[lower]
    p_up = np.divide(a - mags[lower], gap, out=np.zeros_like(a), where=gap > 0)
    level = np.where(u < p_up, upper, lower).astype(np.uint8)
    sign = (g < 0).astype(np.uint8) << 7
    return (sign | level).astype(np.uint8)


def decode(codes, scale: float, *, codec: str = "int8") -> np.ndarray:
    """The float32 values of one-byte codes at ``scale`` (the inverse of :func:`encode`)."""
    _check_codec(codec)
    _check_scale(scale)
    c = np.atleast_1d(np.asarray(codes)).astype(code_dtype(codec), copy=False)
    if codec == "int8":
        if (c == -128).any():
            raise ValueError("int8 code -128 is not produced by the encoder; the message is corrupt")
        return (c.astype(np.float64) * (float(scale) / INT8_LEVELS)).astype(np.float32)
    mags = log8_magnitudes(scale)
    value = mags[c & 0x7F] * np.where(c >> 7, -1.0, 1.0)
    return value.astype(np.float32)


def error_bound(values, scale: float, *, codec: str = "int8") -> np.ndarray:
    """Largest possible ``|decode(encode(g)) - clip(g, -s, s)|`` for each value."""
    g = np.abs(np.asarray(values, dtype=np.float64))
    if codec == "int8":
        return np.full(g.shape, scale / INT8_LEVELS)
    smallest = log8_magnitudes(scale)[1]
    return np.maximum(np.minimum(g, scale) * (np.exp(1 / LOG8_PER_E_FOLD) - 1), smallest)


def to_bytes(codes: np.ndarray) -> bytes:
    """Codes as raw bytes (one per code) for a ``ConfigRecord`` value."""
    return np.ascontiguousarray(codes).tobytes()


def from_bytes(data: bytes, codec: str) -> np.ndarray:
    """Raw bytes back to codes of ``codec``'s dtype."""
    return np.frombuffer(data, dtype=code_dtype(codec)).copy()


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown one-byte codec {codec!r}; choose one of {CODECS}")


def _check_scale(scale: float) -> None:
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"codec scale must be finite and > 0, got {scale!r}")
