"""The delta family over a base b, inputs x_i, weights w_i, deltas δ_i = x_i − b (n entries each): one
per-tensor function, merge_deltas, that sparsifies each δ_i, optionally elects a sign, combines, scales by λ
and adds b; its eight methods bind its configuration (the declarations at the end).

- sparsify: none (task_arithmetic); trim (ties: the k = floor(density·n) largest |δ_i|, ties lowest index
  first; ``global_trim``: one threshold over the whole model, global_trim.py); drop (DARE: each entry kept
  with probability density by a seeded counter-based RNG, kept entries × 1/density); band (breadcrumbs: with
  density < 1, t = floor(density·n), top = floor(gamma·n), bot = max(0, n − t − top), the ranks bot ..
  bot + t − 1 by ascending |δ_i|, ties lower index first, kept: a kernels/band.py Band of two selections, applied
  in the merge kernel);
  magprune (DELLA: with density < 1, in each row (the last dimension; a 1-D tensor is one row) the entry of
  rank r of C kept with probability (density − ε) + 2ε·r/(C − 1) from the seeded Philox stream of
  kernels/dare.py, where mergekit draws from torch's global RNG; a row of one entry keeps it with
  probability density).
- rescale (mergekit's L1 rescale, trim/band/magprune): each sparsified δ_i × Σ|δ_i| / Σ|kept δ_i| (unscaled
  when either sum is below 1e-7), a numerator scale.
- combine: Σ w_i δ_i' (normalize, band/magprune: divided by Σ w_i, a sum below 1e-8 counting as 1); with
  sign election s = sign(Σ w_i δ_i'), Σ_{sign δ_i' = s ≠ 0} w_i δ_i' (normalize: / Σ_{same i} w_i, 0 if none
  agree). Then b + λ·(that), kernels/ties.py's fused delta_merge (CPU numba or Triton).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from cpift.errors import ParameterError

from .declare import Inputs, method
from .params import check_scale
from .registry import WEIGHTS, MergekitSpec, ParamSpec

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: below this either L1 norm leaves the delta as is
NORMALIZE_EPS = 1e-8  # mergekit's divisor guard of a plain (non-TIES) sum of weights
_DELLA_BLOCK = 1 << 20  # entries ranked at a time: slices along dim 0 are independent, so memory is a block's


def l1_scale(x, b, keep) -> float:
    """mergekit's L1 rescale of a masked delta: Σ|δ| / Σ|kept δ| (1 when either is below 1e-7)."""
    import torch

    d = torch.abs(x.float() - b.float()).double()
    before, after = float(d.sum()), float(d[keep].sum())
    return 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after


def trim_l1_scale(x, b, cut) -> float:
    """l1_scale of the entries a TIES trim keeps (the Cut on the float32 |x − b|)."""
    import torch

    from cpift.kernels.select import cut_mask

    return l1_scale(x, b, cut_mask(torch.abs(x.float() - b.float()), cut, 0))


def breadcrumbs_band(x, b, density: float, gamma: float, *, backend: str | None = None):
    """The kernels/band.py Band of the entries breadcrumbs keeps (flat tensors): ascending ranks bot .. bot + t − 1."""
    from cpift.kernels.band import Band, magnitude_band

    n = x.numel()
    if density >= 1:
        return Band.all(n)
    t, top = int(density * n), int(gamma * n)
    bot = max(0, n - t - top)
    return magnitude_band(x, b, bot, bot + t, backend=backend)


def breadcrumbs_keep(x, b, density: float, gamma: float, *, backend: str | None = None):
    """Bool mask of the entries breadcrumbs keeps (flat tensors)."""
    return _band_keep(x, b, breadcrumbs_band(x, b, density, gamma, backend=backend))


def _band_keep(x, b, band):
    from cpift.kernels.band import band_mask
    from cpift.kernels.select import magnitude_scores

    return band_mask(magnitude_scores(x, b, 0, x.numel()), band, 0)  # the float32 |x − b| the band ranks


def della_keep(x, b, shape: Sequence[int], density: float, epsilon: float, seed: int):
    """Bool mask of the entries DELLA keeps (flat tensors of a tensor of ``shape``; density < 1).

    Ranks run along dim 1 (mergekit's), so blocks of whole dim-0 slices are ranked one at a time:
    the same mask as ranking the tensor at once, with the temporaries of one block."""
    import torch

    n = x.numel()
    if len(shape) < 2 or n == 0:
        return _ranked_keep(x, b, (1, n), density, epsilon, seed, 0)
    per = n // shape[0]
    step = max(1, _DELLA_BLOCK // per)
    keep = torch.empty(n, dtype=torch.bool, device=x.device)
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        s, e = r0 * per, r1 * per
        keep[s:e] = _ranked_keep(x[s:e], b[s:e], (r1 - r0, *shape[1:]), density, epsilon, seed, s)
    return keep


def _ranked_keep(x, b, shape: Sequence[int], density: float, epsilon: float, seed: int, start: int):
    """della_keep of the entries start .. start + numel − 1 of a tensor, a whole number of dim-0 slices."""
    import torch

    from cpift.kernels.dare import philox_uniform

    mag = torch.abs(x.float() - b.float())
    rows = mag.view(*shape)
    cols = rows.shape[1]
    # |δ| ≥ 0 (NaN too, its sign bit cleared): its float32 bits as int32 sort in the same order, faster
    order = torch.sort(rows.view(torch.int32), dim=1, stable=True).indices
    view = [1] * order.dim()
    view[1] = cols  # 0 .. C − 1 along dim 1, the ranks scattered to the entries
    ranks = torch.arange(cols, dtype=torch.float32).view(view).expand_as(order).contiguous()
    rank = torch.empty_like(rows).scatter_(1, order, ranks)
    norm = rank / (cols - 1) if cols > 1 else torch.full_like(rank, 0.5)
    p = (density - epsilon) + norm * (2 * epsilon)
    u = philox_uniform(seed, start, x.numel()).view(rows.shape).to(rows.device)
    return (u < p).reshape(-1)


def _sparsified(xs: list, b, *, shape: Sequence[int], name: str, density: list[float], epsilon: list[float],
                seed: int, rescale: bool) -> tuple[list, list[float]]:
    """DELLA's magprune: each x_i with its dropped entries set to b, and its L1 scale."""
    import torch

    from cpift.kernels.dare import tensor_seed

    out, scales = list(xs), [1.0] * len(xs)
    for i, x in enumerate(xs):
        if density[i] >= 1:
            continue
        keep = della_keep(x, b, shape, density[i], epsilon[i], tensor_seed(seed, name, i))
        if rescale:
            scales[i] = l1_scale(x, b, keep)
        out[i] = torch.where(keep, x, b)  # exact: a dropped entry's delta is b − b = 0
    return out, scales


def merge_deltas(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Sequence[int], name: str,
                 sparsify: str, elect_sign: bool, weights: list[float], lam: float,
                 density: list[float] | None = None, gamma: list[float] | None = None,
                 epsilon: list[float] | None = None, seed: int = 0, global_trim: bool = False,
                 normalize: bool = False, rescale: bool = False, cuts: list | None = None) -> None:
    """One tensor of a delta method (the module's docstring); ``cuts``: TIES' global trim (_global_cuts)."""
    from cpift.kernels.dare import tensor_seed
    from cpift.kernels.select import magnitude_cut
    from cpift.kernels.ties import delta_merge

    b, rest = xs[0], list(xs[1:])
    kw: dict[str, Any] = {}
    if sparsify == "trim":
        if cuts is None:
            cuts = [magnitude_cut(x, b, math.floor(d * x.numel()), backend=backend) for x, d in zip(rest, density)]
        kw = {"cuts": cuts, "scales": [trim_l1_scale(x, b, c) for x, c in zip(rest, cuts)] if rescale else None}
    elif sparsify == "drop":
        kw = {"drop_density": density, "drop_seeds": [tensor_seed(seed, name, i) for i in range(len(rest))]}
    elif sparsify == "band":
        # the band applied inside the merge kernel: one pass, no masked copy of the inputs
        bands = [breadcrumbs_band(x, b, d, g, backend=backend) for x, d, g in zip(rest, density, gamma)]
        kw = {"bands": bands, "scales": [l1_scale(x, b, _band_keep(x, b, c)) if d < 1 else 1.0
                                         for x, c, d in zip(rest, bands, density)] if rescale else None}
    elif sparsify == "magprune":
        rest, scales = _sparsified(rest, b, shape=shape, name=name, density=density, epsilon=epsilon, seed=seed,
                                   rescale=rescale)
        kw = {"scales": scales}
    if sparsify in ("band", "magprune") and normalize and not elect_sign:
        total = sum(weights)
        kw["scales"] = [c / (1.0 if abs(total) < NORMALIZE_EPS else total) for c in kw["scales"] or [1.0] * len(rest)]
    delta_merge(b, rest, weights, lam=lam, elect_sign=elect_sign, normalize=normalize, out=out, backend=backend,
                **kw)



def _bind(sparsify: str, elect_sign: bool) -> Callable[..., None]:
    """merge_deltas with one method's configuration."""
    def tensor(xs: Sequence[Any], out: Any, *, name: str, **values: Any) -> None:
        merge_deltas(xs, out, name=name, sparsify=sparsify, elect_sign=elect_sign, **values)

    return tensor


def _check(values: Mapping[str, Any], tensor: str) -> None:
    """Σ|w_i| and λ·Σ|w_i| finite in float32; DELLA's keep probabilities density ± epsilon inside (0, 1)."""
    check_scale(values["weights"], [tensor], lam=values["lam"])
    eps = values.get("epsilon") or []
    for i, (d, e) in enumerate(zip(values["density"] if eps else [], eps)):
        if d < 1 and not (0 < d - e and d + e < 1):
            fld = "epsilon" if len(eps) == 1 else f"epsilon[{i}]"
            raise ParameterError(f"{fld}: density ± epsilon must lie in (0, 1), got density {d:g}, epsilon {e:g} "
                                 f"for tensor '{tensor}'")


def _global_cuts(ckpts: Sequence[Any], values: Mapping[str, Any], opts: Any) -> dict[str, dict[str, Any]] | None:
    """TIES' ``global_trim``: one Cut per (tensor, model) from one magnitude threshold per model over the whole
    model (global_trim.py); a dry run checks and skips the pass."""
    if not values["global_trim"]:
        return None
    if any(callable(d) for d in values["density"]):
        raise ParameterError("density: --global-trim needs one constant density per model")
    from cpift.merge.io.device import check_backend, parse_device

    dev = parse_device(opts.device)
    check_backend(opts.backend, dev)
    if opts.dry_run:
        return None
    from .global_trim import global_magnitude_cuts

    cuts = global_magnitude_cuts(ckpts[0], list(ckpts[1:]), [float(d) for d in values["density"]], device=dev,
                                 backend=opts.backend)
    return {n: {"cuts": c} for n, c in cuts.items()}


LAMBDA = ParamSpec("lam", "--lambda", "number", 1.0, "Scale λ of the combined delta added to the base.",
                   mergekit="lambda", mergekit_default=1.0, label="lambda")
SEED = ParamSpec("seed", "--seed", "seed", 0, "Seed of the drop mask; the same seed gives byte-identical output.")
GLOBAL_TRIM = ParamSpec("global_trim", "--global-trim", "flag", False,
                        "Trim with one magnitude threshold over the whole model (TIES paper) instead of per tensor.")
GAMMA = ParamSpec("gamma", "--gamma", "number_or_per_model", 0.01,
                  "Share of each delta's largest-magnitude entries dropped, in [0, 1].",
                  lo=0.0, hi=1.0, mergekit="gamma", mergekit_default=0.01)
EPSILON = ParamSpec("epsilon", "--epsilon", "number_or_per_model", 0.15,
                    "Spread of the keep probability over a row's magnitude ranks: density ± epsilon, in (0, 1).",
                    mergekit="epsilon", mergekit_default=0.15)


def _density(default: float, text: str) -> ParamSpec:
    return ParamSpec("density", "--density", "number_or_per_model", default,
                     text + " One value, or comma-separated per model, each in (0, 1].",
                     lo=0.0, hi=1.0, lo_open=True, mergekit="density", mergekit_default=1.0)


def _settings(mk: MergekitSpec, *keys: str) -> tuple[ParamSpec, ...]:
    """normalize / rescale as a mergekit config sets them, defaulting to what the method computes."""
    text = {"normalize": "Divide the combined delta by the (agreeing) weights' sum (mergekit's normalize).",
            "rescale": "Scale each sparsified delta back to its L1 norm (mergekit's rescale)."}
    return tuple(ParamSpec(k, "", "flag", getattr(mk, f"cpift_{k}"), text[k], mergekit=k,
                           mergekit_default=getattr(mk, k)) for k in keys)


def _mergekit(normalize: bool, cpift_normalize: bool, rescale: bool, cpift_rescale: bool | None,
              extra: tuple[str, ...] = ()) -> MergekitSpec:
    # mergekit reads density for task_arithmetic too (and ignores it)
    return MergekitSpec(("weight", "density", *extra), ("lambda", "normalize", "rescale", "int8_mask"),
                        normalize=normalize, cpift_normalize=cpift_normalize, rescale=rescale,
                        cpift_rescale=cpift_rescale)


_TIES = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"
_DARE = "Yu et al. 2024, Language Models are Super Mario (arXiv:2311.03099)"
_DROP = "drop each delta entry with probability 1 − density, rescale by 1/density, then "
_DARE_DENSITY = _density(0.5, "Probability of keeping each delta entry (kept entries are scaled by 1/density).")
_CRUMBS = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
_BAND = "keep each delta's entries ranked between its smallest and its largest gamma share by |δ| (density kept), then "
_MAGPRUNE = ("keep each row's entries with probability density − ε + 2ε·rank/(C − 1) by |δ| rank (seeded), "
             "rescale to the delta's L1 norm, then ")
_CRUMBS_DENSITY, _DELLA_DENSITY = _density(0.9, "Share of each delta kept."), _density(0.5, "Share of each delta kept.")
_BASE = Inputs("required")

_MK = _mergekit(False, False, False, None)
method("task_arithmetic", inputs=_BASE, params=(WEIGHTS, LAMBDA), definition="b + λ Σ w_i (x_i − b)",
       paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
       summary="b + λ Σ w_i (x_i − b).", mergekit=_MK, check=_check)(_bind("none", False))
_MK = _mergekit(True, True, False, False)
method("ties", inputs=_BASE,
       params=(WEIGHTS, LAMBDA, _density(1.0, "Share of each delta kept by magnitude (k = floor(density × numel))."),
               GLOBAL_TRIM),
       definition="trim each delta to its largest-magnitude share (density), elect a sign per entry, "
       "combine the agreeing deltas", paper=_TIES,
       summary="TIES: trim deltas by magnitude, elect a sign per entry, average the agreeing deltas.",
       mergekit=_MK, settings=_settings(_MK, "normalize", "rescale"), bench={"--density": "0.3"}, check=_check,
       prepare=_global_cuts)(_bind("trim", True))
method("dare_linear", inputs=_BASE, params=(WEIGHTS, LAMBDA, _DARE_DENSITY, SEED),
       definition=_DROP + "task arithmetic", paper=_DARE, summary="DARE drop-and-rescale, then task arithmetic.",
       mergekit=_mergekit(False, False, True, True), bench={"--density": "0.5"}, check=_check)(_bind("drop", False))
_MK = _mergekit(False, True, True, True)
method("dare_ties", inputs=_BASE, params=(WEIGHTS, LAMBDA, _DARE_DENSITY, SEED),
       definition=_DROP + "TIES sign election", paper=_DARE, summary="DARE drop-and-rescale, then TIES sign election.",
       mergekit=_MK, settings=_settings(_MK, "normalize"), bench={"--density": "0.5"},
       check=_check)(_bind("drop", True))
def _sparse(name: str, density: ParamSpec, extra: tuple[ParamSpec, ...], definition: str, paper: str, summary: str,
            mk: MergekitSpec, sparsify: str, elect_sign: bool) -> None:
    """Declare one of breadcrumbs / DELLA's pair (task arithmetic or TIES sign election after the drops)."""
    method(name, inputs=_BASE, params=(WEIGHTS, LAMBDA, density, *extra), definition=definition, paper=paper,
           summary=summary, mergekit=mk, settings=_settings(mk, "normalize", "rescale"), bench={"--density": "0.5"},
           check=_check)(_bind(sparsify, elect_sign))


_MK = _mergekit(False, False, False, False, ("gamma",))
_sparse("breadcrumbs", _CRUMBS_DENSITY, (GAMMA,), _BAND + "task arithmetic", _CRUMBS,
        "Breadcrumbs: drop the smallest and the largest deltas, then task arithmetic.", _MK, "band", False)
_sparse("breadcrumbs_ties", _CRUMBS_DENSITY, (GAMMA,), _BAND + "TIES sign election", _CRUMBS,
        "Breadcrumbs' sparsification, then TIES sign election.", _MK, "band", True)
_sparse("della", _DELLA_DENSITY, (EPSILON, SEED), _MAGPRUNE + "TIES sign election and disjoint mean", _DELLA,
        "DELLA: magnitude-ranked random drops, L1 rescale, TIES sign election.",
        _mergekit(True, True, True, True, ("epsilon",)), "magprune", True)
_sparse("della_linear", _DELLA_DENSITY, (EPSILON, SEED), _MAGPRUNE + "task arithmetic", _DELLA,
        "DELLA's drops and rescale, then task arithmetic.", _mergekit(False, False, True, True, ("epsilon",)),
        "magprune", False)
