"""Supervised fine-tuning of a Hugging Face causal LM: a plain torch loop.

Batches. Each optimizer step takes ``batch_size`` examples, the *global* batch, from a seeded
shuffle of the training set, epoch after epoch (a step may span an epoch boundary). Under DDP each
rank takes its share of them, and every rank splits its share into ``grad_accum`` micro-batches run
one after the other. The loss of a step is the summed cross-entropy of its response tokens divided
by the number of response tokens in the whole global batch, so the gradient is the same, up to
float rounding, whether the batch runs in one piece, in micro-batches or on several ranks.

Step: forward/backward of each micro-batch (a hook zeroes the gradient of frozen entries as it is
accumulated) → clip the global gradient norm → AdamW (decoupled weight decay on matrices only, as
usual: norms and biases keep theirs) → a step hook writes frozen entries back (training/freeze.py).
Learning rate: linear warm-up over the first ``warmup`` share of the steps, then a cosine to zero,
never zero at a step.

Precision: float32 master weights; the forward under bf16 autocast on CUDA, float32 on the CPU.
The model is saved in the dtype its checkpoint stored (a frozen bf16 entry survives the float32
round trip bit for bit), or in ``save_dtype``: float32 keeps the exact update, which a bf16 save
rounds away at small learning rates (a core computed from a rounded probe marks where the weights
are large, not where the update is). On the CPU a run is deterministic for a given seed and thread count.

Output: the model (``save_pretrained``, safetensors), the tokenizer and ``metrics.json`` (per-step
loss, learning rate and gradient norm, the final eval, the settings) are written to a hidden
sibling directory ``.NAME.cpift-partial`` and renamed to NAME when complete; a run that dies leaves
no NAME.

Scale-out: under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel, or sharded with FSDP2 (``fsdp=True``; training/shard.py), gloo on the CPU
and NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK). Every rank reads the same files, so data
order and freeze masks are identical everywhere (under FSDP2 each rank keeps the frozen entries of
its own shards); rank 0 alone writes. A caller that runs several ``sft`` calls in one torchrun
process may initialise the process group itself; ``sft`` then reuses it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cpift.errors import ParameterError, TrainingError
from cpift.merge.io.publish import Publication, check_output
from cpift.merge.io.stream import progress_bar
from cpift.numbers import parse_number

from .data import Dataset, collate, load_dataset
from .evaluate import (
    autocast,
    evaluate_model,
    json_text,
    load_model,
    load_tokenizer,
    pad_id,
    pick_device,
    quiet_transformers,
    response_loss_sum,
)
from .freeze import check_masks, freeze_cores
from .shard import (
    check_wrapping,
    dist_env,
    first_nonfinite,
    full_value,
    gather_for_saving,
    init_group,
    no_sync,
    rank_sum,
    wrap,
)

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class SFTResult:
    out: Path
    steps: int
    examples: int
    truncated: int  # training examples cut to max_length
    frozen: int  # parameter entries held fixed
    tokens: int  # input tokens processed, padding excluded, all ranks
    seconds: float
    train_loss: list[float] = field(default_factory=list)  # per step, mean over the step's response tokens
    lr: list[float] = field(default_factory=list)  # per step
    grad_norm: list[float] = field(default_factory=list)  # per step, of the trainable entries, before clipping
    eval: dict | None = None

    def summary(self) -> str:
        s = (f"sft: {self.steps} steps on {self.examples} examples ({self.truncated} truncated), loss "
             f"{self.train_loss[0]:.4f} -> {self.train_loss[-1]:.4f}, {self.tokens:,} tokens in {self.seconds:.1f} s "
             f"({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s), {self.frozen:,} entries frozen")
        if self.eval:
            s += (f"; eval loss {self.eval['loss']:.4f}, exact match {self.eval['exact_match']:.3f} "
                  f"(n={self.eval['n']})")
        return s + f" -> {self.out}"


MAX_STEPS = 10**9  # optimizer steps of one run; more is a typo, not a plan
MAX_EPOCHS = 10**6


def _check(steps, epochs, lr, weight_decay, batch_size, grad_accum, max_length, warmup, max_grad_norm,
           world: int, seed: int = 0) -> None:
    """Every option through the bounded parser (cpift.numbers), before anything is read."""
    if steps is not None and epochs is not None:
        raise ParameterError("steps / epochs: give one of them, not both")

    def num(value, field, **bounds):
        return value if value is None else parse_number(value, field, error=ParameterError, **bounds)

    num(steps, "steps", integer=True, lo=1, hi=MAX_STEPS)
    num(epochs, "epochs", lo=0, lo_open=True, hi=MAX_EPOCHS)
    num(lr, "lr", lo=0, lo_open=True)
    num(weight_decay, "weight_decay", lo=0)
    num(grad_accum, "grad_accum", integer=True, lo=1)
    num(batch_size, "batch_size", integer=True, lo=1, hi=2**31)
    num(max_length, "max_length", integer=True, lo=2, hi=2**31)
    num(warmup, "warmup", lo=0, hi=1, hi_open=True)
    num(max_grad_norm, "max_grad_norm", lo=0)
    num(seed, "seed", integer=True, lo=0)
    if batch_size < world * grad_accum:
        raise ParameterError(f"batch_size: {batch_size} examples cannot fill {grad_accum} micro-batch(es) on each of "
                             f"{world} rank(s); use a batch size of at least {world * grad_accum}")


def lr_factor(step: int, steps: int, warm: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then cosine."""
    if step < warm:
        return (step + 1) / (warm + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def global_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless global batches of example indices: a fresh seeded permutation per epoch, read in order."""
    g = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending += torch.randperm(n, generator=g).tolist()
        yield pending[:batch_size]
        pending = pending[batch_size:]


def split(items: list, parts: int) -> list[list]:
    """``parts`` contiguous pieces whose sizes differ by at most one (the first ones larger)."""
    q, r = divmod(len(items), parts)
    bounds = [i * q + min(i, r) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def sft(model: str | os.PathLike, train: str | os.PathLike, out: str | os.PathLike, *,
        eval: str | os.PathLike | None = None, steps: int | None = None, epochs: float | None = None,
        lr: float = 2e-5, weight_decay: float = 0.0, batch_size: int = 8, grad_accum: int = 1,
        max_length: int = 1024, warmup: float = 0.03, max_grad_norm: float | None = 1.0, seed: int = 0,
        freeze: Sequence[str | os.PathLike] = (), overwrite: bool = False,
        schedule_window: tuple[int, int] | None = None, device: str | torch.device | None = None,
        fsdp: bool = False, activation_checkpointing: bool = False, save_dtype: str = "auto",
        progress: bool = True) -> SFTResult:
    """Fine-tune a causal LM on JSONL prompt/response data, loss on response tokens only.

    Args:
        model: Hugging Face model directory (safetensors weights and tokenizer).
        train: JSONL training data (see training/data.py for the line formats).
        out: output directory, written atomically; must not exist unless ``overwrite``, and may not be,
            hold or lie inside the model, a data file or a mask (cpift.merge.io.publish).
        eval: JSONL data evaluated after training (loss and exact match, in metrics.json).
        steps: optimizer steps. Default: ``epochs`` worth of steps.
        epochs: passes over the training set (may be fractional); default 1 when ``steps`` is not given.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay, applied to matrices.
        batch_size: examples per optimizer step over all micro-batches and ranks (the global batch).
        grad_accum: micro-batches each rank splits its share of a step into (memory, not maths).
        max_length: tokens kept per example (the first ones); truncations are counted.
        warmup: share of the steps with a linear warm-up, in [0, 1).
        max_grad_norm: clip the global gradient L2 norm to this; 0 or None: no clipping.
        seed: data order and dropout.
        freeze: core-mask files; every entry set in any of them stays bit-identical.
        overwrite: replace an earlier cpift output (or an empty directory) at ``out``, only once the new
            one is complete; any other existing path is refused.
        schedule_window: ``(first, total)``: this run is steps first … first + steps − 1 of a schedule
            of ``total`` steps (warm-up and cosine laid over the total), so stages run one after the
            other continue one learning-rate schedule. Default: the schedule spans this run.
        device: default CUDA when available (cuda:LOCAL_RANK under torchrun), else the CPU.
        fsdp: shard the model with FSDP2 (training/shard.py) instead of DDP; a world of one outside torchrun.
        activation_checkpointing: recompute each decoder block's activations in the backward pass.
        save_dtype: dtype of the saved model, one of SAVE_DTYPES; ``auto``: the dtype the checkpoint stored.
        progress: show a tqdm bar with loss and tokens/s (rank 0 only).

    Returns:
        SFTResult (steps, per-step loss, tokens, time, the eval dict, the output path).

    Raises:
        ParameterError, DataError, CheckpointError, MismatchError, OutputError: bad options, data,
        model, mask or output path, all found before the first step; nothing is written then.

    Example:
        >>> sft("base", "math.jsonl", "probe-math", steps=200, lr=1e-5, batch_size=16).summary()
    """
    world, rank, local_rank = dist_env()
    if save_dtype not in SAVE_DTYPES:
        raise ParameterError(f"save_dtype: expected one of {', '.join(SAVE_DTYPES)}, got '{save_dtype}'")
    _check(steps, epochs, lr, weight_decay, batch_size, grad_accum, max_length, warmup, max_grad_norm, world,
           seed)
    if schedule_window is not None:
        first, total = schedule_window
        if not (0 <= first and (steps is None or first + steps <= total)):
            raise ParameterError(f"schedule_window: steps {first}..{first + (steps or 0) - 1} do not lie inside a "
                                 f"schedule of {total} steps")
    dev = pick_device(device)  # an unavailable device fails before anything is read
    out = check_output(out, overwrite=overwrite, inputs=[model, train, eval, *freeze])
    if world > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)

    tokenizer = load_tokenizer(model)
    data = load_dataset(train, tokenizer, max_length=max_length)
    eval_data = load_dataset(eval, tokenizer, max_length=max_length, for_eval=True) if eval is not None else None
    # FSDP2 moves each block's shard to the device as it shards it: the whole model never sits on one GPU
    net, stored_dtype = load_model(model, torch.device("cpu") if fsdp else dev)
    check_masks(net, freeze, model_label=model)
    check_wrapping(fsdp, net)
    saved_dtype = stored_dtype if save_dtype == "auto" else getattr(torch, save_dtype)
    if steps is None:
        steps = max(1, math.ceil((epochs or 1.0) * len(data) / batch_size))
        if steps > MAX_STEPS:
            raise ParameterError(f"epochs: {epochs:g} passes over {len(data)} examples are {steps:,} steps, over "
                                 f"{MAX_STEPS:,}; give fewer epochs or --steps")

    import torch.distributed as dist

    if (world > 1 or fsdp) and dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL binds each rank to its current device
    own_group = init_group(dev, world) if world > 1 or fsdp else False
    pub = Publication(out, overwrite=overwrite)
    tmp = pub.tmp
    if rank == 0:
        pub.begin()  # locked until published: a second run on this output is refused now, not after training
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            result = _train(net, tokenizer, data, steps=steps, lr=lr, weight_decay=weight_decay,
                            batch_size=batch_size, grad_accum=grad_accum, warmup=warmup,
                            max_grad_norm=max_grad_norm, seed=seed, freeze=freeze, model_label=model,
                            world=world, rank=rank, fsdp=fsdp, activation_checkpointing=activation_checkpointing,
                            progress=progress and rank == 0, window=schedule_window or (0, steps), dev=dev)
        result.out, result.truncated = out, data.truncated
        whole = gather_for_saving(net, rank) if fsdp else net  # collective: every rank takes part
        if rank == 0:
            with quiet_transformers():
                whole.to(saved_dtype).save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            if eval_data is not None:
                # evaluate the weights as saved: float32 of the saved dtype, as `cpift-train eval` loads them
                whole = load_model(tmp, dev)[0] if fsdp else whole.float()
                result.eval = evaluate_model(whole, tokenizer, eval_data, progress=progress)
            metrics = {"model": str(model), "train": str(train), "eval_data": None if eval is None else str(eval),
                       "settings": dict(steps=steps, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                                        warmup=warmup, max_grad_norm=max_grad_norm, seed=seed,
                                        freeze=[str(f) for f in freeze], world_size=world, device=str(dev),
                                        schedule_window=list(schedule_window) if schedule_window else None,
                                        fsdp=fsdp, activation_checkpointing=activation_checkpointing,
                                        saved_dtype=str(saved_dtype).removeprefix("torch.")),
                       "examples": result.examples, "truncated": result.truncated, "frozen_entries": result.frozen,
                       "tokens": result.tokens, "seconds": result.seconds, "train_loss": result.train_loss,
                       "lr": result.lr, "grad_norm": result.grad_norm, "eval": result.eval}
            (tmp / "metrics.json").write_text(json_text(metrics, indent=2) + "\n")
            pub.commit()
        if world > 1:
            dist.barrier()
    except BaseException:
        pub.abort()
        raise
    finally:
        if own_group:
            dist.destroy_process_group()
    return result


def _train(net: torch.nn.Module, tokenizer, data: Dataset, *, steps: int, lr: float, weight_decay: float,
           batch_size: int, grad_accum: int, warmup: float, max_grad_norm: float | None, seed: int,
           freeze: Sequence[str | os.PathLike], model_label, world: int, rank: int, fsdp: bool,
           activation_checkpointing: bool, progress: bool, window: tuple[int, int], dev: torch.device) -> SFTResult:
    """The optimisation loop; returns per-step loss, lr and gradient norm, token count and time."""
    model = wrap(net, dev, world=world, fsdp=fsdp, activation_checkpointing=activation_checkpointing)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
    with freeze_cores(model, freeze, opt, model_label=model_label) as freezer:
        frozen = rank_sum(freezer.frozen, dev, world) if fsdp else freezer.frozen  # FSDP2: each rank its shards
        return _loop(model, net, opt, frozen, tokenizer, data, steps=steps, lr=lr, batch_size=batch_size,
                     grad_accum=grad_accum, warmup=warmup, max_grad_norm=max_grad_norm, seed=seed, world=world,
                     rank=rank, progress=progress, window=window)


def _loop(model, net, opt, frozen: int, tokenizer, data: Dataset, *, steps: int, lr: float, batch_size: int,
          grad_accum: int, warmup: float, max_grad_norm: float | None, seed: int, world: int, rank: int,
          progress: bool, window: tuple[int, int]) -> SFTResult:
    dev = next(net.parameters()).device
    params = [p for p in net.parameters() if p.requires_grad]
    first, total = window
    warm = round(warmup * total)
    pad = pad_id(tokenizer)
    run = SFTResult(out=Path(), steps=steps, examples=len(data), truncated=0, frozen=frozen, tokens=0,
                    seconds=0.0)
    batches = global_batches(len(data), batch_size, seed)
    net.train()
    bar = progress_bar("sft", steps, progress, unit="step", leave=True)
    start = time.perf_counter()
    for step in range(steps):
        run.lr.append(lr * lr_factor(first + step, total, warm))
        for group in opt.param_groups:
            group["lr"] = run.lr[-1]
        chosen = [data.examples[i] for i in next(batches)]
        targets = sum(e.targets for e in chosen)  # the step's normaliser, known on every rank
        micro = split(split(chosen, world)[rank], grad_accum)
        stats = torch.zeros(2, dtype=torch.float64)  # summed loss, input tokens
        for j, part in enumerate(micro):
            batch = {k: v.to(dev) for k, v in collate(part, pad).items()}
            sync = world == 1 or j == len(micro) - 1
            with no_sync(model, sync):
                with autocast(dev):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = response_loss_sum(logits, batch["labels"])
                # DDP and FSDP2 average gradients over ranks; × world turns that back into the global sum
                (loss * (world / targets)).backward()
            stats += torch.tensor([loss.item(), batch["attention_mask"].sum().item()], dtype=torch.float64)
        # frozen entries' gradients are zero already (freeze_cores' hooks); max_norm = inf returns the norm
        # and scales by exactly 1
        run.grad_norm.append(full_value(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)))
        if not math.isfinite(run.grad_norm[-1]):
            raise TrainingError(f"step {step + 1}: the gradient norm is {run.grad_norm[-1]} (training diverged; "
                                f"lower --lr, now {lr:g}); nothing was written")
        opt.step()  # its post-hook writes the frozen entries back
        opt.zero_grad(set_to_none=True)
        if world > 1:
            import torch.distributed as dist

            reduced = stats.to(dev)
            dist.all_reduce(reduced)
            stats = reduced.cpu()
        run.train_loss.append(float(stats[0]) / targets)
        if not math.isfinite(run.train_loss[-1]):
            raise TrainingError(f"step {step + 1}: the training loss is {run.train_loss[-1]} (training diverged; "
                                f"lower --lr, now {lr:g}); nothing was written")
        run.tokens += int(stats[1])
        run.seconds = time.perf_counter() - start
        bar.set_postfix(loss=f"{run.train_loss[-1]:.4f}", tok_s=f"{run.tokens / run.seconds:,.0f}")
        bar.update()
    bar.close()
    bad = first_nonfinite(net, world)
    if bad is not None:
        raise TrainingError(f"step {steps}: parameter '{bad}' holds NaN or Inf after the last update (training "
                            f"diverged; lower --lr, now {lr:g}); nothing was written")
    return run
