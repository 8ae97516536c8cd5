"""Parameters of the merge methods: a number, or a function of the tensor name (mergekit-style
gradients and filters come in as functions from cpift.merge.mergekit), validated before anything is
written; each error names the field and, for a per-tensor value, the tensor."""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence, Union

from cpift.errors import ParameterError
from cpift.numbers import F32_MAX, parse_number

Param = Union[float, Callable[[str], float]]
PathLike = Union[str, os.PathLike]

# F32_MAX: the kernels compute in float32, so a parameter (or a sum of weights, or lambda times them)
# beyond the largest finite float32 would turn into inf there and the merge into NaN.


def value(p: Param, name: str, field: str, *, lo: float = -math.inf, hi: float = math.inf,
          lo_open: bool = False) -> float:
    """Resolve a parameter for one tensor and range-check it; the error names field and tensor."""
    v = p(name) if callable(p) else p
    v = float(parse_number(v, field, error=ParameterError))  # finite, or a one-line error
    bad_lo = v <= lo if lo_open else v < lo
    if not math.isfinite(v) or bad_lo or v > hi:
        lo_s = "(" if lo_open else "["
        where = f" for tensor '{name}'" if callable(p) else ""
        raise ParameterError(f"{field}: {v} is outside {lo_s}{lo}, {hi}]{where}")
    if abs(v) > F32_MAX:
        where = f" for tensor '{name}'" if callable(p) else ""
        raise ParameterError(f"{field}: {v:g} overflows float32, in which the merge computes "
                             f"(|value| must be at most {F32_MAX:.7g}){where}")
    return v


def check_scale(ws: list[Param], names: list[str], *, lam: float = 1.0) -> None:
    """Σ|w_i| (and λ·Σ|w_i|) must stay finite in float32 for every tensor."""
    for n in names if any(callable(w) for w in ws) else names[:1]:
        total = sum(abs(value(w, n, "weights")) for w in ws)
        if total > F32_MAX:
            raise ParameterError(f"weights: their magnitudes sum to {total:g}, which overflows float32 "
                                 f"(at most {F32_MAX:.7g})")
        if abs(lam) * total > F32_MAX:
            raise ParameterError(f"lambda: {lam:g} times the weights' sum {total:g} overflows float32 "
                                 f"(at most {F32_MAX:.7g})")


def check_all(p: Param, names: list[str], field: str, **kw) -> None:
    """Validate a parameter for every tensor before the merge starts."""
    for n in names if callable(p) else names[:1]:
        value(p, n, field, **kw)


def weights_for(weights: Sequence[Param] | None, n: int) -> list[Param]:
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise ParameterError(f"weights: got {len(weights)} values for {n} models")
    return weights


def per_model(p: Param | Sequence[Param], n: int, field: str) -> list[Param]:
    if isinstance(p, (list, tuple)):
        if len(p) != n:
            raise ParameterError(f"{field}: got {len(p)} values for {n} models")
        return list(p)
    return [p] * n


def float_names(models) -> list[str]:
    return [n for n in models[0].names() if models[0].info(n).dtype.is_floating_point] or ["<none>"]
