"""Byte sizes as users write them (``--max-shard-size``, ``cpift.max_shard_size``).

Two conventions meet here and do not conflict:
- mergekit's ``parse_kmb``: a bare ``K`` / ``M`` / ``B`` suffix is thousand / million / billion, so
  ``1B`` is 10^9 bytes and ``500M`` is 5·10^8 (mergekit's ``--out-shard-size 5B``);
- transformers' ``convert_file_size_to_int``: ``KB`` / ``MB`` / ``GB`` / ``TB`` are powers of 10,
  ``KiB`` / ``MiB`` / ``GiB`` / ``TiB`` powers of 2.
A plain integer is bytes. Suffixes are case-insensitive. A shard size under 1 MB written with a
suffix is almost always a slip (``1B`` read as "one byte" made one shard per tensor), so
``parse_size`` refuses it; plain bytes say it was meant.
"""

from __future__ import annotations

import re

from cpift.errors import ParameterError
from cpift.numbers import parse_number, shown

MIN_SHARD_BYTES = 10**6
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
HELP = ("Largest output shard: plain bytes (1500000), or K/M/B = 10^3/10^6/10^9 as in mergekit "
        "(500M, 1B), KB/MB/GB = powers of 10 and KiB/MiB/GiB = powers of 2 as in transformers "
        "(5GB, 1GiB). Under 1 MB only as plain bytes.")


def size_bytes(value: int | str, *, field: str = "max_shard_size") -> int:
    """Bytes from ``1B`` (10^9), ``500M``, ``5GB``, ``1GiB``, ``2KB``, ``123``; no lower bound.

    Raises:
        ParameterError: not a size, or not positive.

    Example:
        >>> size_bytes("1B"), size_bytes("1GiB"), size_bytes("2KB")
        (1000000000, 1073741824, 2000)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParameterError(f"{field}: expected a size, got {shown(value)}")
    m = _SIZE.match(str(value))
    unit = m.group(2).upper() if m else None
    if m is None or (unit and unit not in _UNITS):
        raise ParameterError(f"{field}: cannot read {shown(str(value))} as a size (use bytes or a suffix like "
                             f"500M, 1B, 2GB, 1GiB)")
    number = parse_number(m.group(1), field, integer=not unit, error=ParameterError)
    return parse_number(int(number * _UNITS[unit]) if unit else number, field, integer=True, lo=1,
                        error=ParameterError)


def parse_size(value: int | str, *, field: str = "max_shard_size") -> int:
    """A shard size in bytes (``size_bytes``), refusing one under 1 MB unless given as plain bytes.

    Raises:
        ParameterError: not a size, not positive, or under 1 MB with a suffix.

    Example:
        >>> parse_size("500M"), parse_size(4096), parse_size("4096")
        (500000000, 4096, 4096)
    """
    size = size_bytes(value, field=field)
    plain = isinstance(value, int) or str(value).strip().isdigit()
    if size < MIN_SHARD_BYTES and not plain:
        raise ParameterError(f"{field}: '{value}' is {size:,} bytes, under 1 MB, which would write about "
                             f"one shard per tensor; give it in plain bytes ({size}) if you mean it "
                             f"(1B = 10^9 bytes, as in mergekit)")
    return size
