"""Freezing overhead: SFT step time with and without core-mask freezing, in one run.

    python benchmarks/freeze_overhead.py [--hidden 256 --layers 4 --batch 32 --seq 128]
                                         [--masks 5 --share 1.0] [--steps 30] [--threads N]

Builds a random Llama (float32) and `--masks` core-mask files, each selecting a random `--share`
percent of every tensor's entries (the CPI default p = 1 per task; five tasks ≈ 5% frozen), and
times the optimizer step of training/sft.py: forward, response loss, backward, gradient clipping,
AdamW with weight decay, plus for the "freeze" provider the two guards (mask_grads before
clipping, restore after the step). Both providers train their own copy of the same model on the
same random batches, one step each in turn, so load from other processes on the machine falls on
both alike. The first `--warmup` steps of each are not timed. Rows report step-time p50/p20/p80; the
guards alone are timed too. Results: benchmarks/results/freeze_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cpift.kernels.masks import pack_bits
from cpift.merge.cpi.masks import save_core_mask
from cpift.training.evaluate import response_loss_sum
from cpift.training.freeze import Freezer, load_freezer

HERE = Path(__file__).resolve().parent


def build_model(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def write_masks(model: torch.nn.Module, folder: Path, n: int, share: float) -> list[Path]:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        bits = {name: torch.rand(torch.Size(s).numel(), generator=g) < share / 100 for name, s in shapes.items()}
        counts = {name: int(b.sum()) for name, b in bits.items()}
        paths.append(save_core_mask(folder / f"task{i}.safetensors", {k: pack_bits(b) for k, b in bits.items()},
                                    shapes, granularity="element", p=share, k=sum(counts.values()), threshold=0.0,
                                    counts=counts))
    return paths


class Trainer:
    """One model and its AdamW, stepping like training/sft.py (one micro-batch per step)."""

    def __init__(self, model: torch.nn.Module, freezer: Freezer | None):
        self.model, self.freezer = model, freezer
        params = [p for p in model.parameters()]
        self.params = params
        self.opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-4)
        self.guard_s: list[float] = []

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = response_loss_sum(self.model(input_ids=ids).logits, labels) / labels[:, 1:].numel()
        loss.backward()
        g0 = time.perf_counter()
        if self.freezer:
            self.freezer.mask_grads()
        guard = time.perf_counter() - g0
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        g0 = time.perf_counter()
        if self.freezer:
            self.freezer.restore()
        self.guard_s.append(guard + time.perf_counter() - g0)
        return time.perf_counter() - t0


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--masks", type=int, default=5, help="core-mask files, united")
    ap.add_argument("--share", type=float, default=1.0, help="percent of every tensor each mask selects")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per provider")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per provider first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()  # other work on the machine, for the record

    base = build_model(args.hidden, args.layers, args.vocab)
    plain_model, frozen_model = copy.deepcopy(base), copy.deepcopy(base)
    with tempfile.TemporaryDirectory() as tmp:
        freezer = load_freezer(frozen_model, write_masks(base, Path(tmp), args.masks, args.share))
    n_params = sum(p.numel() for p in base.parameters())
    providers = {"no-freeze": Trainer(plain_model, None), "freeze": Trainer(frozen_model, freezer)}
    times: dict[str, list[float]] = {k: [] for k in providers}
    g = torch.Generator().manual_seed(0)
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        for name, trainer in providers.items():  # same batch for both, one step each in turn
            t = trainer.step(ids, ids)
            if i >= args.warmup:
                times[name].append(t)
    guard = providers["freeze"].guard_s[args.warmup:]
    # the frozen entries must not have moved, or the timing would be of something else
    for p, idx, values in freezer.entries:
        assert torch.equal(p.detach().view(-1)[idx], values)

    rows = [{"op": "sft-step", "provider": name, "step_s": {"p50": statistics.median(ts), "p20": _q(ts, 0.2),
                                                           "p80": _q(ts, 0.8), "all": ts}}
            for name, ts in times.items()]
    rows.append({"op": "freeze-guards", "provider": "freeze",
                 "step_s": {"p50": statistics.median(guard), "p20": _q(guard, 0.2), "p80": _q(guard, 0.8),
                            "all": guard}})
    p50 = {r["provider"]: r["step_s"]["p50"] for r in rows if r["op"] == "sft-step"}
    result = {
        "benchmark": "freeze_overhead", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "parameters": n_params,
                   "frozen_entries": freezer.frozen, "frozen_share": freezer.frozen / n_params,
                   "tokens_per_step": args.batch * args.seq, "dtype": "float32", "device": "cpu"},
        "overhead_p50": p50["freeze"] / p50["no-freeze"] - 1,
        "guards_share_of_step_p50": rows[-1]["step_s"]["p50"] / p50["no-freeze"],
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "freeze_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "freeze_overhead.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [f"# Freezing overhead ({r['date']})", "",
             f"Machine: {m['cpus']} CPUs, {m['platform']}, torch {m['torch']}, {m['torch_threads']} threads; "
             f"load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])} at the start, "
             f"{', '.join(f'{x:.2f}' for x in m['load_average_at_end'])} at the end.",
             f"Model: random Llama, hidden {c['hidden']}, {c['layers']} layers, vocab {c['vocab']}, "
             f"{c['parameters'] / 1e6:.1f}M parameters, float32 on the CPU. Batch {c['batch']} × {c['seq']} tokens, "
             f"AdamW (weight decay 0.1), clipping at 1.0. Frozen: {c['masks']} masks × {c['share']}% of every "
             f"tensor, united: {c['frozen_entries']:,} entries ({c['frozen_share']:.2%}).",
             f"{c['steps']} timed steps per provider after {c['warmup']} untimed, the providers alternating "
             "step by step.",
             "", "| op | provider | step s (p50) | p20–p80 |", "|---|---|---|---|"]
    for x in r["rows"]:
        s = x["step_s"]
        lines.append(f"| {x['op']} | {x['provider']} | {s['p50']:.4f} | {s['p20']:.4f}–{s['p80']:.4f} |")
    lines += ["", f"Overhead of freezing (p50 step time, target ≤ 5%): **{r['overhead_p50']:+.2%}**; the two guards "
              f"alone take {r['guards_share_of_step_p50']:.2%} of a step.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
