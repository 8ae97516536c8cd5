"""One bounded reader for every number a user hands cpift: command-line options (through the click
type in cli/_options.py), YAML configs and recipes, adapter and mask metadata, environment variables.

The rule: a number is finite, inside its declared range, and an integer field holds an integer within
int64; anything else is one ``ConfigError``/``ParameterError`` line naming the field, never a
traceback (Python turns a 400-digit integer into ``OverflowError`` in ``float()``, ``inf`` into one in
``math.ceil``, and torch crashes on a 2**70 seed or 100000 threads). Text longer than ``MAX_DIGITS``
characters is refused before it is converted.

Example:
    >>> parse_number("1e-3", "lr", lo=0, lo_open=True)
    0.001
    >>> parse_number(7, "seed", integer=True, lo=0)
    7
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from cpift.errors import ConfigError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
F32_MAX = 3.4028234663852886e38  # largest finite float32: the merge math is float32
MAX_DIGITS = 64  # characters of a number written as text; no sensible value needs more


def shown(raw: Any, limit: int = 40) -> str:
    """``repr(raw)`` cut to ``limit`` characters, so a 400-digit value still makes a one-line error."""
    text = repr(raw)
    return text if len(text) <= limit else f"{text[:limit - 12]}...({len(text)} chars)"


def _convert(raw: Any, integer: bool) -> int | float | None:
    """``raw`` as an int (integer fields) or a float; None when it is no number or not finite."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            return None
        try:
            raw = int(text) if integer and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            return None
    elif isinstance(raw, numbers.Integral):  # numpy integers too
        raw = int(raw)
    elif isinstance(raw, numbers.Real):
        raw = float(raw)
    else:
        return None
    if isinstance(raw, float):
        if not math.isfinite(raw) or (integer and not raw.is_integer()):
            return None
        return int(raw) if integer else raw
    if integer:
        return raw
    try:
        return float(raw)
    except OverflowError:  # an int beyond float64
        return None


def _too_large(raw: Any) -> bool:
    """Whether ``raw`` reads as a number, but an infinite or NaN one."""
    try:
        return not math.isfinite(float(raw))
    except OverflowError:
        return True
    except (TypeError, ValueError):
        return False


def parse_number(raw: Any, field: str, *, integer: bool = False, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
                 error: type[Exception] = ConfigError, what: str | None = None) -> int | float:
    """The value of a numeric field, checked: finite, within ``[lo, hi]`` (open ends as asked) and,
    for ``integer``, an integer within int64 (a float such as ``3.0`` counts; text like ``"1e3"`` too).

    Args:
        raw: an int, float, numpy/torch scalar or text.
        field: named first in the error (``FILE: models[0].parameters.weight``, ``--epochs``).
        integer: whether the field holds an integer.
        lo, hi: the declared range (None: no bound but finiteness, int64 for integers).
        lo_open, hi_open: whether ``lo`` / ``hi`` themselves are excluded.
        error: the CpiftError subclass raised (ConfigError for files, ParameterError for arguments).
        what: what the field expects, for the error (default: "an integer" / "a finite number").

    Returns:
        An int for ``integer`` fields, else a float.

    Raises:
        ``error``: "FIELD: expected ..., got VALUE", "FIELD: VALUE does not fit a 64-bit integer" or
            "FIELD: VALUE is outside [lo, hi]" (one bound: "is not ≥ lo").
    """
    if isinstance(raw, str) and len(raw.strip()) > MAX_DIGITS:
        raise error(f"{field}: {shown(raw)} is too long for a number (over {MAX_DIGITS} characters)")
    v = _convert(raw, integer)
    if v is None:
        default = "an integer" if integer else "a finite number"
        raise error(f"{field}: expected {default if _too_large(raw) else what or default}, got {shown(raw)}")
    if integer and not INT64_MIN <= v <= INT64_MAX:
        raise error(f"{field}: {shown(v)} does not fit a 64-bit integer")
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and (v >= hi if hi_open else v > hi)
    if below or above:
        raise error(f"{field}: {_fmt(v)} {_bounds(lo, hi, lo_open, hi_open)}")
    return v


def _fmt(x: int | float) -> str:
    return f"{x:g}" if isinstance(x, float) else shown(x)


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"is not {'>' if lo_open else '≥'} {_fmt(lo)}"
    if lo is None:
        return f"is not {'<' if hi_open else '≤'} {_fmt(hi)}"
    return f"is outside {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"


def env_int(name: str, default: int, *, lo: int = 0, hi: int | None = None,
            error: type[Exception] = ConfigError) -> int:
    """An integer environment variable (``WORLD_SIZE``, ``RANK``), bounded; ``default`` when unset."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return parse_number(raw, f"environment variable {name}", integer=True, lo=lo, hi=hi, error=error)
