"""PostgreSQL WAL positions (LSNs) as plain integers.

The server prints an LSN as two hex halves (``16/B374D848``); comparing and
subtracting is simplest on the 64-bit integer, which is what every other module
uses. Conversion happens only at the edges (SQL results, tokens, display).
"""

from __future__ import annotations

__all__ = ["format_lsn", "parse_lsn"]

_MAX_HALF = 0xFFFFFFFF


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> ``0x16B374D848``; raises ``ValueError`` on anything else."""
    high, sep, low = text.strip().partition("/")
    if not sep or not high or not low or len(high) > 8 or len(low) > 8:
        raise ValueError(f"not an LSN: {text!r}")
    try:
        hi, lo = int(high, 16), int(low, 16)
    except ValueError:
        raise ValueError(f"not an LSN: {text!r}") from None
    if hi < 0 or lo < 0 or hi > _MAX_HALF or lo > _MAX_HALF:
        raise ValueError(f"not an LSN: {text!r}")
    return (hi << 32) | lo


def format_lsn(value: int) -> str:
    """``0x16B374D848`` -> ``'16/B374D848'`` (the server's own spelling)."""
    if value < 0 or value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & _MAX_HALF:X}"
