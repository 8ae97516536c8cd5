"""``cpift-train``: SFT with exact core freezing, and evaluation; thin layers over ``cpift.training``.

User errors (bad data lines, options, masks, paths) print one line on stderr and exit with code 2.
Under ``torchrun --nproc-per-node N cpift-train sft ...`` (or ``python -m torch.distributed.run
... -m cpift.cli.train_cli sft ...``) training runs with DistributedDataParallel.
"""

from __future__ import annotations

import os

import click

from cpift.numbers import env_int

from ._options import FLOAT, INT, SEED, THREADS, overwrite_option
from ._run import run


def _threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


THREADS_HELP = ("torch compute threads per process (default: torch's choice, one per core). Use 1 when other "
                "work shares the CPU.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             no_args_is_help=True)
@click.version_option(package_name="cpift")
def cli() -> None:
    """Fine-tune and evaluate Hugging Face causal LMs on JSONL data.

    Data files hold one JSON object per line: {"prompt": ..., "response": ...} or
    {"messages": [{"role": ..., "content": ...}, ...]} (rendered with the tokenizer's chat template
    when it has one). The loss counts response (assistant) tokens only.
    """


@cli.command()
@click.option("--model", required=True, type=click.Path(),
              help="Model directory to start from (safetensors + tokenizer).")
@click.option("--train", "train", required=True, type=click.Path(), help="Training data, JSONL.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output model directory; written to a hidden sibling and renamed when complete.")
@click.option("--eval", "eval_data", type=click.Path(), default=None,
              help="JSONL evaluated after training (mean response loss, exact match), recorded in OUT/metrics.json.")
@click.option("--steps", type=INT, default=None, help="Optimizer steps. Default: --epochs worth of steps.")
@click.option("--epochs", type=FLOAT, default=None,
              help="Passes over the training data, may be fractional (default 1 when --steps is not given).")
@click.option("--lr", type=FLOAT, default=2e-5, show_default=True,
              help="Peak learning rate of AdamW, reached after the warm-up, then cosine to zero.")
@click.option("--weight-decay", type=FLOAT, default=0.0, show_default=True,
              help="AdamW decoupled weight decay: each step multiplies weight matrices by 1 - lr x this.")
@click.option("--batch-size", type=INT, default=8, show_default=True,
              help="Examples per optimizer step, over all --grad-accum micro-batches and all torchrun processes.")
@click.option("--grad-accum", type=INT, default=1, show_default=True,
              help="Micro-batches each process splits its share of a step into (saves memory; same result).")
@click.option("--max-length", type=INT, default=1024, show_default=True,
              help="Tokens kept per example (the first ones); truncated examples are counted in the summary.")
@click.option("--warmup", type=FLOAT, default=0.03, show_default=True,
              help="Share of the steps, in [0, 1), over which the learning rate rises linearly to --lr.")
@click.option("--max-grad-norm", type=FLOAT, default=1.0, show_default=True,
              help="Clip the global gradient L2 norm to this; 0: no clipping.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the data order and dropout; on the CPU the same seed gives the same weights.")
@click.option("--freeze", multiple=True, type=click.Path(),
              help="Core-mask file (cpift core-mask safetensors); every entry set in it stays bit-identical. "
                   "Repeat for several masks.")
@overwrite_option
@click.option("--fsdp", is_flag=True,
              help="Shard parameters, gradients and AdamW state over the torchrun processes with FSDP2 (each "
                   "decoder block and the root; bf16 compute on CUDA) instead of DDP; alone: a world of one.")
@click.option("--activation-checkpointing", is_flag=True,
              help="Recompute each decoder block's activations in the backward pass (less memory, more compute).")
@click.option("--save-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True,
              help="dtype of the saved model; auto: the checkpoint's. float32 keeps small updates that bf16 "
                   "rounds away.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available, else cpu).")
@click.option("--threads", type=THREADS, default=None, help=THREADS_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; the summary line only.")
def sft(model, train, out, eval_data, steps, epochs, lr, weight_decay, batch_size, grad_accum, max_length,
        warmup, max_grad_norm, seed, freeze, fsdp, activation_checkpointing, save_dtype, overwrite, device, threads,
        quiet):
    """Supervised fine-tuning; writes OUT (model, tokenizer, metrics.json) when complete."""
    from cpift.training.sft import sft as run_sft

    _threads(threads)
    result = run_sft(model, train, out, eval=eval_data, steps=steps, epochs=epochs, lr=lr,
                     weight_decay=weight_decay, batch_size=batch_size, grad_accum=grad_accum,
                     max_length=max_length, warmup=warmup, max_grad_norm=max_grad_norm or None, seed=seed,
                     freeze=list(freeze), overwrite=overwrite, device=device, fsdp=fsdp,
                     activation_checkpointing=activation_checkpointing, save_dtype=save_dtype, progress=not quiet)
    if env_int("RANK", 0) == 0:  # checked by sft() already
        click.echo(result.summary())


@cli.command("eval")
@click.option("--model", required=True, type=click.Path(), help="Model directory (safetensors + tokenizer).")
@click.option("--data", required=True, type=click.Path(),
              help="JSONL; each conversation must end with the assistant turn that generation is compared with.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the result to this JSON file (atomically; never over the model or --data).")
@click.option("--batch-size", type=INT, default=8, show_default=True, help="Examples per forward / generation batch.")
@click.option("--max-length", type=INT, default=1024, show_default=True,
              help="Tokens kept per example (the first ones) for the loss.")
@click.option("--max-new-tokens", type=INT, default=None,
              help="Generation budget in tokens (default: the reference's token count + 8).")
@click.option("--exact-match", "exact_match", type=click.Choice(["greedy", "teacher-forced"]), default="greedy",
              show_default=True, help="greedy: generate and compare; teacher-forced: the same verdict from the loss "
                                      "pass's logits (argmax = reference token at every answer position, end token "
                                      "included), no generation.")
@click.option("--per-item", is_flag=True, help="Also report every example's hit, loss and token count (items).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available, else cpu).")
@click.option("--threads", type=THREADS, default=None, help=THREADS_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(model, data, json_path, batch_size, max_length, max_new_tokens, exact_match, per_item, device,
                 threads, quiet):
    """Mean response loss (nats per token) and exact match of greedy generation, printed as JSON."""
    from cpift.merge.io.publish import check_side_file, write_atomic
    from cpift.training.evaluate import evaluate, json_text, pick_device

    pick_device(device)  # an unavailable --device fails before the model is read
    if json_path is not None:  # refused before any work: never over the model or the data file
        check_side_file(json_path, inputs=[model, data])
    _threads(threads)
    result = evaluate(model, data, batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
                      device=device, progress=not quiet, exact_match=exact_match, per_item=per_item)
    text = json_text(result)
    if json_path is not None:
        write_atomic(json_path, text + "\n", inputs=[model, data])
    click.echo(text)


@cli.command()
@click.argument("recipe", type=click.Path())
@click.option("-o", "--out", "workdir", required=True, type=click.Path(file_okay=False),
              help="WORKDIR: every step's output, report.json and report.md. Rerun to resume: finished steps "
                   "are skipped.")
@click.option("--method", type=click.Choice(["cpi-ft", "full-sft", "multistage-random", "multistage-heuristic",
                                             "task-arithmetic", "ties"]), default="cpi-ft", show_default=True,
              help="CPI-FT, or a baseline on the same base, data, evaluation and optimizer-step budget.")
@click.option("--stages", type=INT, default=None,
              help="K stages of multistage-random (default: the recipe's baselines.stages).")
@click.option("--seed", type=SEED, default=None,
              help="Replaces the recipe's seed (SFT data order, stage order, calibration sample, random split).")
@click.option("--device", default=None, help="Of SFT and eval: cpu, cuda or cuda:N (default: CUDA when available).")
@click.option("--threads", type=THREADS, default=None, help=THREADS_HELP)
@click.option("--fsdp", is_flag=True,
              help="Every SFT step shards the model with FSDP2 (as sft --fsdp). Under torchrun the SFT steps run "
                   "on every process and the others (cores, cluster, fuse, merges, eval) on rank 0.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; one line per step and the table.")
def pipeline(recipe, workdir, method, stages, seed, device, threads, fsdp, quiet):
    """Run CPI-FT (probes, cores, cluster, staged SFT, fuse, calibration, eval) or a baseline from RECIPE.yml."""
    from cpift.training.evaluate import pick_device
    from cpift.training.pipeline import run_pipeline

    if device is not None:
        pick_device(device)  # an unavailable --device fails before any step runs
    _threads(threads)
    run_pipeline(recipe, workdir, method=method, stages=stages, seed=seed, device=device, progress=not quiet,
                 log=click.echo, fsdp=fsdp)
    if env_int("RANK", 0) == 0:  # checked by run_pipeline already
        with open(os.path.join(workdir, "report.md")) as f:
            click.echo(f.read().rstrip())


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Existing directory to write into; none of the files may exist there yet.")
def example(workdir):
    """Write a tiny character-level Llama (tiny-llama/) and example data to try the commands on.

    sums.jsonl (512) and sums-test.jsonl (64): single-digit sums; add, cat, rev .jsonl (256 each) and
    -test.jsonl (32 each) with recipe.yml: a `cpift-train pipeline` example. Under 1 MB, a few seconds.
    """
    from cpift.training.tiny import write_example

    written = write_example(workdir)
    click.echo(f"wrote {', '.join(p.name for p in written)} in {workdir}")


def main(argv: list[str] | None = None) -> None:
    run(cli, "cpift-train", argv, missing={"transformers": "training needs transformers: pip install 'cpift[train]'"})


if __name__ == "__main__":
    main()
