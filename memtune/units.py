"""Byte sizes and durations as people write them: `16GiB`, `16GB`, `16000MiB`, `60s`, `2m`."""

from __future__ import annotations

import re

from memtune.errors import InputError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """`16GiB` -> 17179869184. Bare numbers are bytes; `16G` means GiB, as in most tools."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise InputError(
            f"bad size {text!r}: write a number with a unit, e.g. 16GiB, 16GB or 16000MiB "
            "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_budget(text: str | int, option: str = "--budget") -> int:
    """A memory budget: a positive size with its unit (`16GiB`; a bare `16` would be 16 bytes, so it is
    refused). An int is bytes already (a plan's `budget_bytes`, a library caller)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise InputError(f"{option} {text!r}: write a size with a unit, e.g. 16GiB")
    if isinstance(text, str):
        m = _SIZE_RE.match(text)
        if m and m.group(2) == "":
            raise InputError(f"{option} {text.strip()}: a size needs a unit (a bare number would be bytes): "
                             f"write e.g. {text.strip()}GiB, {text.strip()}GB or {text.strip()}B")
    n = parse_size(text)
    if n <= 0:
        raise InputError(f"{option} {text}: a budget must be positive, e.g. 16GiB")
    return n


def format_bytes(n: float) -> str:
    """Binary units, 3 significant figures: 17179869184 -> '16.0 GiB'."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.3g} {unit}" if n < 100 else f"{sign}{n:.0f} {unit}"
        n /= 1024
    raise AssertionError


_DUR_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|min|h)?\s*$")
_DUR_UNITS = {None: 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """`60s` -> 60.0, `2m` -> 120.0; bare numbers are seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DUR_RE.match(str(text))
    if not m:
        raise InputError(f"bad duration {text!r}: write e.g. 60s, 2m or 1h")
    return float(m.group(1)) * _DUR_UNITS[m.group(2)]


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"
