"""The rules that several rooms' arguments share, one each: a byte count (the same mistake gets the
same exception wherever it is made: a value of the wrong type a TypeError, a number out of range a
ValueError, both naming the argument), and what an "auto" budget leaves free."""

from __future__ import annotations

#: Byte counts cross into C++ as int64.
MAX_BYTES = 2**63


def byte_count(name: str, value, *, auto: bool = False, none: bool = False) -> None:
    """`value` is a byte count in [0, 2**63), or "auto" / None where `auto` / `none` allow them."""
    if (none and value is None) or (auto and isinstance(value, str) and value == "auto"):
        return
    also = "".join([", 'auto'" if auto else "", " or None" if none else ""])
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a byte count{also}, got {value!r}")
    if not 0 <= value < MAX_BYTES:
        raise ValueError(f"{name} must be a byte count in [0, 2**63){also}, got {value}")


def leave_headroom(available: int, limit: int, *, at_least: int, fraction: float) -> int:
    """An "auto" budget: the bytes `available` less a headroom of max(`at_least`, `fraction` of
    `limit`), never below 0. The device budget and the pin budget each say why theirs is what it is."""
    return max(0, available - max(at_least, int(fraction * limit)))
