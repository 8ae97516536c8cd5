"""Per-rank memory of full fine-tuning: training/memory.py's formula against the measured peak RSS on the CPU.

For each configuration (one process; DDP and FSDP2 on two gloo ranks) every rank builds the same
random Llama in float32, wraps it as ``cpift-train sft`` does (training/shard.py), attaches
``freeze_cores`` with a mask freezing 4% of the entries, and runs a few AdamW steps on a tiny batch
(activations negligible). Measured: the rank's peak RSS during those steps (VmHWM, reset through
/proc/self/clear_refs once the model is wrapped) minus its RSS before the model was built (torch,
transformers and cpift already imported). Predicted: rank_memory(...).peak (the state plus AdamW's
step temporaries). FSDP2 adds what it holds unsharded at once (the root's embedding and head, and
the blocks being gathered), which the formula leaves out.

    python benchmarks/memory_per_rank.py            # writes benchmarks/results/memory_per_rank.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("single", 1, False), ("ddp", 2, False), ("fsdp2", 1, True), ("fsdp2", 2, True)]
MODEL = dict(hidden_size=512, intermediate_size=1377, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=8192, max_position_embeddings=64)  # 1377: uneven shards
FROZEN_SHARE, STEPS = 0.04, 3


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_mask(model, path: Path) -> int:
    """A core mask freezing FROZEN_SHARE of every matrix's entries (seeded); returns the frozen count."""
    import torch

    from cpift.kernels.masks import pack_bits
    from cpift.merge.cpi.masks import save_core_mask

    g = torch.Generator().manual_seed(0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2}
    bits = {n: torch.rand(torch.Size(s).numel(), generator=g) < FROZEN_SHARE for n, s in shapes.items()}
    counts = {n: int(b.sum()) for n, b in bits.items()}
    save_core_mask(path, {n: pack_bits(b) for n, b in bits.items()}, shapes, granularity="element",
                   p=FROZEN_SHARE * 100, k=sum(counts.values()), threshold=0.0, counts=counts)
    return sum(counts.values())


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpift.training import freeze_cores
    from cpift.training.shard import dist_env, init_group, wrap

    torch.set_num_threads(1)
    world, rank, _ = dist_env()
    dev = torch.device("cpu")
    if world > 1 or args.fsdp:
        init_group(dev, world)
    base = rss_kb("VmRSS")
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(**MODEL))
    params = sum(p.numel() for p in net.parameters())
    model = wrap(net, dev, world=world, fsdp=args.fsdp, activation_checkpointing=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.1)
    with freeze_cores(model, [args.mask], opt) as freezer:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the steps alone
        ids = torch.randint(0, MODEL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(rank))
        for _ in range(STEPS):
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=False)  # gradients stay allocated, as between steps of a real run
        peak = rss_kb("VmHWM")
        frozen_local = freezer.frozen
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "params": params, "baseline_rss_bytes": base * 1024, "peak_rss_bytes": peak * 1024,
         "measured_bytes": (peak - base) * 1024, "frozen_local": frozen_local}))


def run(name: str, world: int, fsdp: bool, mask: Path, frozen: int, params: int) -> dict:
    from cpift.training.memory import rank_memory

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--worker", "--out", tmp, "--mask", str(mask)] + (["--fsdp"] if fsdp else [])
        if world > 1 or fsdp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   *cmd[1:]]
        # a fixed mmap threshold: glibc returns every freed large tensor to the OS, so RSS is live memory
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072"}
        subprocess.run(cmd, check=True, env=env)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    predicted = rank_memory(params, world=world, fsdp=fsdp, frozen=frozen)
    worst = max(r["measured_bytes"] for r in ranks)
    return {"config": name, "world": world, "params": params, "frozen": frozen,
            "predicted": {"weights": predicted.weights, "grads": predicted.grads, "adam": predicted.adam,
                          "freeze": predicted.freeze, "total": predicted.total, "step_temp": predicted.step_temp,
                          "peak": predicted.peak},
            "ranks": ranks, "measured_max_bytes": worst, "measured_over_predicted": round(worst / predicted.peak, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--mask", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=RESULTS / "memory_per_rank.json")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpift.merge.io.publish import write_atomic

    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            meta = LlamaForCausalLM(LlamaConfig(**MODEL))
        mask = Path(tmp) / "mask.safetensors"
        frozen = write_mask(meta, mask)
        params = sum(p.numel() for p in meta.parameters())
        rows = [run(name, world, fsdp, mask, frozen, params) for name, world, fsdp in CONFIGS]
    result = {"benchmark": "memory_per_rank", "model": MODEL, "frozen_share": FROZEN_SHARE, "steps": STEPS,
              "torch": torch.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    md = ["| config | world | state MB (formula) | peak MB (formula) | measured peak MB (max rank) | measured / peak |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['config']} | {r['world']} | {r['predicted']['total'] / 1e6:.0f} | {r['predicted']['peak'] / 1e6:.0f} "
           f"| {r['measured_max_bytes'] / 1e6:.0f} | {r['measured_over_predicted']:.2f} |" for r in rows]
    write_atomic(args.json.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
