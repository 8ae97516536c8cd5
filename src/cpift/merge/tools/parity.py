"""Parity with mergekit: one config run through ``mergekit-yaml`` and ``cpift-merge config``, every tensor
compared.

``CASES`` lists the configs (templates over a tiny Llama-shaped family: ``{base}``, ``{ft1}``, ``{ft2}``,
``{dtype}``) and the bound each must meet; tests/merge/test_mergekit_parity.py runs every case where a
mergekit-yaml is at hand, and benchmarks/mergekit_parity.py writes the measured table
(benchmarks/results/mergekit_parity.{json,md}) that the README quotes.

Bounds: ``exact`` (every tensor bit-identical), ``ulp N`` (|cpift − mergekit| ≤ N units in the last place of
the output dtype at the tensor's scale, 2^(floor(log2 max|y|) − mantissa bits)), ``rel R`` (≤ R·max(1, |y|)),
``random`` (a method whose drops are random: mergekit's torch RNG and cpift's Philox stream keep other
entries, so the share of entries that differ from the base is compared, within 5 binomial standard
errors), and ``agree S`` (a share S of the entries within 1 ulp; the rest differ by a documented cause).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from cpift.merge.tools.synthetic import PRESETS, make_checkpoint

_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}


@dataclass(frozen=True)
class ParityCase:
    """One mergekit config and the bound cpift's output meets against mergekit's."""

    name: str
    config: str  # YAML template: {base}, {ft1}, {ft2}, {dtype}
    dtype: str  # float32 | bfloat16: the family's storage and the config's dtype
    bound: tuple[str, float]  # ("exact", 0) | ("ulp", n) | ("rel", r) | ("random", 0) | ("agree", share)
    note: str = ""
    tool: str = "mergekit"  # whose -yaml runs the config: mergekit, or mergekitty (the LGPL fork) for its methods
    skip: tuple[str, ...] = ()  # tensors whose name holds one of these are not compared (the note says why)


def tool_command(tool: str) -> str | None:
    """The ``mergekit-yaml`` (or ``mergekitty-yaml``) to compare with: $CPIFT_MERGEKIT_YAML
    ($CPIFT_MERGEKITTY_YAML), else the one on PATH; None when there is none."""
    return os.environ.get(f"CPIFT_{tool.upper()}_YAML") or shutil.which(f"{tool}-yaml")


def _two(method: str, p1: str, p2: str, shared: str = "") -> str:
    """A base + two fine-tunes config of ``method`` with per-model parameters ``p1``, ``p2``."""
    return (f"merge_method: {method}\nbase_model: {{base}}\nmodels:\n"
            f"  - model: {{ft1}}\n    parameters: {{{{{p1}}}}}\n  - model: {{ft2}}\n    parameters: {{{{{p2}}}}}\n"
            + (f"parameters: {{{{{shared}}}}}\n" if shared else "") + "dtype: {dtype}\n")


_SLERP = ("merge_method: slerp\nbase_model: {ft1}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
          "parameters:\n  t: [0, 0.3, 1]\ndtype: {dtype}\n")
_LINEAR = ("merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n"
           "  - model: {ft2}\n    parameters: {{weight: 0.4}}\n  - model: {base}\n    parameters: {{weight: 0.2}}\n"
           "dtype: {dtype}\n")
_STOCK = "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\ndtype: {dtype}\n"
_STACK = ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n"
          "  - sources:\n      - model: {ft2}\n        layer_range: [1, 2]\ndtype: {dtype}\n")
_SLICES_SLERP = ("merge_method: slerp\nbase_model: {ft1}\nslices:\n  - sources:\n      - model: {ft1}\n"
                 "        layer_range: [0, 2]\n      - model: {ft2}\n        layer_range: [0, 2]\n  - sources:\n"
                 "      - model: {ft1}\n        layer_range: [1, 2]\n"
                 "      - model: {base}\n        layer_range: [0, 1]\n"
                 "    parameters: {{t: 0.3}}\nparameters:\n  t: [0, 0.5, 1]\ndtype: {dtype}\n")
_SLICES_TIES = ("merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n      - model: {base}\n"
                "        layer_range: [0, 2]\n      - model: {ft1}\n        layer_range: [0, 2]\n"
                "        parameters: {{weight: 0.7}}\n      - model: {ft2}\n        layer_range: [0, 2]\n"
                "  - sources:\n      - model: {base}\n        layer_range: [1, 2]\n      - model: {ft1}\n"
                "        layer_range: [0, 1]\n      - model: {ft2}\n        layer_range: [1, 2]\n"
                "    parameters: {{density: 0.4}}\nparameters: {{weight: 1.0, density: 0.6}}\ndtype: {dtype}\n")
_SLICES_LINEAR = ("merge_method: linear\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n"
                  "        parameters: {{weight: [1, 3]}}\n      - model: {ft2}\n        layer_range: [0, 2]\n"
                  "  - sources:\n      - model: {ft2}\n        layer_range: [1, 2]\n      - model: {base}\n"
                  "        layer_range: [0, 1]\nparameters: {{weight: 0.5}}\ndtype: {dtype}\n")
_SPHERE = "coefficients from a float64 Gram matrix (cpift) vs mergekit's float32 per-element steps"
_SCE = ("merge_method: sce\nbase_model: {{base}}\nmodels:\n  - model: {{ft1}}\n  - model: {{ft2}}\n"
        "parameters:\n  select_topk: {topk}\ndtype: {{dtype}}\n")
_NEARSWAP = ("merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\n"
             "parameters:\n  t: 0.01\ndtype: {dtype}\n")
_RAM = ("merge_method: {method}\nbase_model: {{base}}\nmodels:\n  - model: {{ft1}}\n  - model: {{ft2}}\n"
        "parameters: {{{{epsilon: 0.001{extra}}}}}\ndtype: {{dtype}}\n")
_FUSION = ("merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\n"
           "dtype: {dtype}\n")
_KITTY = ("mergekitty 0.3.1 always rebuilds the vocabulary from a tokenizer (tokenizer_source defaults to base) "
          "and the synthetic family has none, so the embeddings are not compared")
_NO_VOCAB = ("embed_tokens", "lm_head")
_BF16_MATH = ("mergekit computes in the config's dtype (bf16 sums), cpift in float32 with one rounding")

CASES: tuple[ParityCase, ...] = (
    ParityCase("linear", _LINEAR, "float32", ("rel", 1e-6)),
    ParityCase("linear bf16", _LINEAR, "bfloat16", ("ulp", 1), _BF16_MATH),
    ParityCase("slerp (t gradient)", _SLERP, "float32", ("rel", 1e-6)),
    ParityCase("slerp bf16", _SLERP, "bfloat16", ("ulp", 1), "dot products summed in another order"),
    ParityCase("task_arithmetic", _two("task_arithmetic", "weight: 0.7", "weight: 0.4", "lambda: 0.8"),
               "float32", ("rel", 1e-6)),
    ParityCase("task_arithmetic normalize", _two("task_arithmetic", "weight: 0.7", "weight: 0.4", "normalize: true"),
               "float32", ("rel", 1e-6), "cpift divides the weights by their sum, mergekit the summed delta"),
    ParityCase("task_arithmetic bf16", _two("task_arithmetic", "weight: 0.7", "weight: 0.4"), "bfloat16",
               ("ulp", 1), _BF16_MATH),
    ParityCase("ties", _two("ties", "weight: 0.7, density: 0.5", "weight: 0.4, density: 0.3"), "float32",
               ("rel", 1e-6)),
    ParityCase("ties bf16", _two("ties", "weight: 0.7, density: 0.5", "weight: 0.4, density: 0.3"), "bfloat16",
               ("agree", 0.99), _BF16_MATH + ": where the weighted sign sum is near 0 the elected sign can differ"),
    ParityCase("dare_linear", _two("dare_linear", "weight: 0.7, density: 0.5", "weight: 0.4, density: 0.5"),
               "float32", ("random", 0), "random drops: Philox (cpift) vs torch.bernoulli (mergekit)"),
    ParityCase("dare_ties", _two("dare_ties", "weight: 0.7, density: 0.5", "weight: 0.4, density: 0.5"),
               "float32", ("random", 0), "random drops: Philox (cpift) vs torch.bernoulli (mergekit)"),
    ParityCase("model_stock", _STOCK, "float32", ("rel", 1e-5), "t from float64 (cpift) vs float32 (mergekit) cosines"),
    ParityCase("breadcrumbs", _two("breadcrumbs", "weight: 1.0, density: 0.6, gamma: 0.05",
                                   "weight: 0.5, density: 0.6, gamma: 0.05"), "float32", ("rel", 1e-6)),
    ParityCase("breadcrumbs_ties", _two("breadcrumbs_ties", "weight: 1.0, density: 0.6, gamma: 0.05",
                                        "weight: 0.5, density: 0.6, gamma: 0.05"), "float32", ("rel", 1e-6)),
    ParityCase("della", _two("della", "weight: 1.0, density: 0.5, epsilon: 0.1",
                             "weight: 0.5, density: 0.5, epsilon: 0.1"), "float32", ("random", 0),
               "random drops: Philox (cpift) vs torch.bernoulli (mergekit)"),
    ParityCase("della_linear", _two("della_linear", "weight: 1.0, density: 0.5, epsilon: 0.1",
                                    "weight: 0.5, density: 0.5, epsilon: 0.1"), "float32", ("random", 0),
               "random drops: Philox (cpift) vs torch.bernoulli (mergekit)"),
    ParityCase("passthrough slices", _STACK, "bfloat16", ("exact", 0)),
    ParityCase("slices merged by slerp (per-slice t)", _SLICES_SLERP, "float32", ("rel", 1e-6)),
    ParityCase("slices merged by ties (per-slice density)", _SLICES_TIES, "float32", ("rel", 1e-6)),
    ParityCase("slices merged by linear bf16", _SLICES_LINEAR, "bfloat16", ("ulp", 1), _BF16_MATH),
    ParityCase("nuslerp", "merge_method: nuslerp\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n"
               "  - model: {ft2}\n    parameters: {{weight: 3.0}}\ndtype: {dtype}\n", "float32", ("ulp", 4),
               _SPHERE),
    ParityCase("nuslerp base rows", _two("nuslerp", "weight: 2.0", "weight: 1.0", "nuslerp_flatten: false"),
               "float32", ("ulp", 4), _SPHERE),
    ParityCase("multislerp base", _two("multislerp", "weight: 1.0", "weight: 0.5"), "float32", ("ulp", 4), _SPHERE),
    ParityCase("karcher", "merge_method: karcher\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {base}\n"
               "dtype: {dtype}\n", "float32", ("ulp", 6),
               _SPHERE + "; mergekit's float32 iteration alone drifts ~3 ulps"),
    ParityCase("sce", _SCE.format(topk=1.0), "float32", ("rel", 1e-6),
               "weights from float64 (cpift) vs float32 (mergekit) means"),
    ParityCase("sce select_topk 0.5", _SCE.format(topk=0.5), "float32", ("rel", 1e-6),
               "weights from float64 (cpift) vs float32 (mergekit) means; no tied variances here"),
    ParityCase("sce bf16", _SCE.format(topk=1.0), "bfloat16", ("agree", 0.99),
               _BF16_MATH + ": where two deltas nearly cancel the elected sign can differ"),
    ParityCase("nearswap", _NEARSWAP, "float32", ("exact", 0)),
    ParityCase("nearswap bf16", _NEARSWAP, "bfloat16", ("exact", 0),
               "mergekit's bf16 math and cpift's float32 math round to the same bf16 on this family (measured)"),
    ParityCase("ties rescale", _two("ties", "weight: 0.7, density: 0.5", "weight: 0.4, density: 0.3", "rescale: true"),
               "float32", ("rel", 1e-6), "L1 norms from float64 (cpift) vs float32 (mergekit) sums"),
    ParityCase("ties normalize false", _two("ties", "weight: 0.7, density: 0.5", "weight: 0.4, density: 0.3",
                                            "normalize: false"), "float32", ("rel", 1e-6)),
    ParityCase("ram", _RAM.format(method="ram", extra=""), "float32", ("exact", 0)),
    ParityCase("ram bf16", _RAM.format(method="ram", extra=""), "bfloat16", ("agree", 0.99), _BF16_MATH),
    ParityCase("ramplus_tl", _RAM.format(method="ramplus_tl", extra=", r: 0.5, alpha: 0.4"), "float32", ("exact", 0)),
    ParityCase("arcee_fusion", _FUSION, "float32", ("exact", 0)),
    ParityCase("consensus_ta", _two("consensus_ta", "weight: 0.7", "weight: 0.4", "lambda: 0.8, k: 2"), "float32",
               ("exact", 0), _KITTY, tool="mergekitty", skip=_NO_VOCAB),
    ParityCase("consensus_ta bf16", _two("consensus_ta", "weight: 0.7", "weight: 0.4", "lambda: 0.8, k: 2"),
               "bfloat16", ("agree", 0.99), _BF16_MATH + "; " + _KITTY, tool="mergekitty", skip=_NO_VOCAB),
    ParityCase("consensus_ties", _two("consensus_ties", "weight: 0.7, density: 0.5, lambda: 1.0",
                                      "weight: 0.4, density: 0.3, lambda: 0.6", "k: 1"), "float32", ("exact", 0),
               _KITTY, tool="mergekitty", skip=_NO_VOCAB),
    ParityCase("arcee_fusion bf16", _FUSION + "out_dtype: {dtype}\n", "bfloat16", ("agree", 0.85),
               "mergekit takes softmax, KL and quantiles in bf16, cpift in float32: other entries cross the fence "
               "(10.3% vs 6.8% moved, measured); without out_dtype mergekit writes float32 (its mask is float32)"),
)


def make_family(root: str | os.PathLike, dtype: str) -> dict[str, Path]:
    """A tiny Llama-shaped base and two fine-tunes (deltas 10% of the weights' scale) under ``root``."""
    root = Path(root)
    dt = getattr(torch, dtype)
    shape = PRESETS["tiny"]
    return {"base": make_checkpoint(root / "base", shape, dtype=dt, seed=1),
            "ft1": make_checkpoint(root / "ft1", shape, dtype=dt, seed=2, base_seed=1),
            "ft2": make_checkpoint(root / "ft2", shape, dtype=dt, seed=3, base_seed=1)}


def _cpift_command() -> list[str]:
    exe = Path(sys.executable).with_name("cpift-merge")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from cpift.cli.merge_cli import main; main()"]


def run_both(case: ParityCase, family: dict[str, Path], workdir: str | os.PathLike, mergekit: str) -> tuple[Path, Path]:
    """Write the case's config and run it through mergekit-yaml and ``cpift-merge config``:
    (cpift, mergekit) outputs."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "config.yml"
    cfg.write_text(case.config.format(dtype=case.dtype, **{k: str(v) for k, v in family.items()}))
    ours, theirs = work / "cpift", work / "mergekit"
    for d in (ours, theirs):
        if d.exists():
            shutil.rmtree(d)
    subprocess.run([mergekit, str(cfg), str(theirs), "--no-copy-tokenizer", "--quiet", "--no-write-model-card"],
                   check=True, capture_output=True, text=True)
    subprocess.run([*_cpift_command(), "config", str(cfg), "-o", str(ours), "-q"], check=True,
                   capture_output=True, text=True)
    return ours, theirs


def load(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compare(case: ParityCase, ours: Path, theirs: Path, base: Path) -> dict:
    """The case's figures: entries, share bit-identical, max |Δ|, max |Δ| in ulps, and whether the bound holds."""
    x, y = load(ours), load(theirs)
    x, y = ({k: v for k, v in t.items() if not any(s in k for s in case.skip)} for t in (x, y))
    if set(x) != set(y):
        return {"case": case.name, "ok": False, "why": f"tensor names differ: {sorted(set(x) ^ set(y))[:4]}"}
    b = load(base)
    entries = same = within1 = 0
    max_abs = max_ulps = max_rel = 0.0
    moved_ours = moved_theirs = 0
    for name in sorted(x):
        a, c = x[name], y[name]
        if a.shape != c.shape or a.dtype != c.dtype:
            return {"case": case.name, "ok": False,
                    "why": f"{name}: {a.dtype}{list(a.shape)} vs {c.dtype}{list(c.shape)}"}
        a64, c64 = a.double(), c.double()
        diff = (a64 - c64).abs()
        scale = float(c64.abs().max()) if c.numel() else 0.0
        ulp = 2.0 ** (math.floor(math.log2(scale)) - _MANTISSA[c.dtype]) if scale > 0 else 2.0 ** -149
        entries += a.numel()
        same += int((a == c).sum())
        within1 += int((diff <= ulp).sum())
        if a.numel():
            max_abs = max(max_abs, float(diff.max()))
            max_ulps = max(max_ulps, float(diff.max()) / ulp)
            max_rel = max(max_rel, float((diff / c64.abs().clamp(min=1.0)).max()))
        if name in b and b[name].shape == a.shape:
            moved_ours += int((a != b[name].to(a.dtype)).sum())
            moved_theirs += int((c != b[name].to(c.dtype)).sum())
    kind, value = case.bound
    share_ours, share_theirs = moved_ours / max(entries, 1), moved_theirs / max(entries, 1)
    if kind == "exact":
        ok = same == entries
    elif kind == "ulp":
        ok = max_ulps <= value
    elif kind == "rel":
        ok = max_rel <= value
    elif kind == "agree":
        ok = within1 / max(entries, 1) >= value
    else:  # random: the share of entries moved off the base, within 5 binomial standard errors
        se = math.sqrt(max(share_theirs * (1 - share_theirs), 1e-12) / max(entries, 1))
        ok = abs(share_ours - share_theirs) <= 5 * se + 1e-9
    return {"case": case.name, "dtype": case.dtype, "bound": f"{kind} {value:g}" if kind != "exact" else "exact",
            "ok": ok, "entries": entries, "bit_identical": same / max(entries, 1),
            "within_1_ulp": within1 / max(entries, 1), "max_abs": max_abs, "max_ulps": max_ulps, "max_rel": max_rel,
            "moved_cpift": share_ours, "moved_mergekit": share_theirs, "note": case.note}
