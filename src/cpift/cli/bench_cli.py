"""``cpift-merge bench``: merge throughput against the I/O floor and mergekit (cpift.merge.tools.bench)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cpift.merge.methods.registry import METHODS

from ._options import MAX_THREADS, THREADS, Number, require_module

REPEATS = Number(integer=True, lo=1, hi=10**4)


def _check_target(path: str | None, option: str, models: tuple[str, ...]) -> Path | None:
    """Fail before the (long) measurement, not after it, if a result cannot be written."""
    if path is None:
        return None
    from cpift.errors import OutputError
    from cpift.merge.io.publish import check_side_file

    try:
        return check_side_file(path, inputs=models)
    except OutputError as e:
        raise type(e)(f"{option}: {e}") from None


@click.command()
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--synthetic", metavar="SHAPE", default=None,
              help="Generate Llama-shaped base + two fine-tunes instead of MODELs: PRESET[-layers:N][:DTYPE] "
                   "with PRESET one of tiny, small, 1b, 7b, 8b (e.g. 1b, 1b:bf16, 7b-layers:4, 8b-layers:2:fp16).")
@click.option("--methods", default="slerp,ties,task-arithmetic", show_default=True,
              help=f"Comma-separated: {', '.join(s.cli for s in METHODS.values())}, fuse "
                   "(CPI fusion of the tasks into the base with p = 1 cores, computed once untimed), cores "
                   "(p = 1 masks of the tasks, against one read pass of base and tasks).")
@click.option("--backends", default="torch,cpu", show_default=True,
              help="cpift kernel backends, each method run on each: torch (the reference), cpu (the fused "
                   "CPU kernels; their cold-compile time is measured once with an empty numba cache).")
@click.option("--busy", type=Number(integer=True, lo=0, hi=MAX_THREADS), default=0, show_default=True,
              help="Repeat the runs while N CPU-bound competing processes (not pinned; started by the bench, "
                   "killed after) share the machine, and report the slowdown busy/quiet.")
@click.option("--busy-repeat", type=REPEATS, default=None,
              help="How many of the --repeat rounds get a busy run too (default: all).")
@click.option("--compare-mergekit", is_flag=True,
              help="Also run every method through mergekit-yaml ($CPIFT_MERGEKIT_YAML, else on PATH).")
@click.option("--mergekit-methods", default=None,
              help="Comma-separated: the methods run through mergekit too (default: all of --methods it has).")
@click.option("--mergekit-repeat", type=REPEATS, default=None,
              help="Runs of each mergekit case, in the first rounds (default: --repeat).")
@click.option("--repeat", type=REPEATS, default=3, show_default=True,
              help="Runs per case (cases alternate); the median and the p20–p80 spread are reported.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw wall seconds per case into this PNG (needs matplotlib).")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None,
              help="Write the results table here (it is printed either way).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where synthetic models (kept and reused) and outputs go; default: a temporary directory.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Output shard size of the cpift runs.")
@click.option("--threads", type=THREADS, default=None,
              help="torch threads of the cpift and mergekit runs (default: each tool's own, one per core); "
                   "1 on a machine shared with other work, where thread barriers stall.")
@click.option("--case-timeout", type=Number(lo=0, lo_open=True), default=None, metavar="SECONDS",
              help="Kill a run still going after this long and record it as timed out (its wall time a lower "
                   "bound), so one stalled case cannot hold up the bench.")
@click.option("--cold", is_flag=True,
              help="One more run per case with the inputs evicted from the page cache first (posix_fadvise "
                   "DONTNEED per file, no root needed), beside the O_DIRECT disk floor (every input byte read from "
                   "the disk, one model written to it).")
@click.option("--note", default=None, help="Free text stored with the results, e.g. what else ran meanwhile.")
def bench(models, synthetic, methods, backends, busy, busy_repeat, compare_mergekit, mergekit_methods,
          mergekit_repeat, repeat, json_path, plot_path, md_path, workdir, max_shard_size, threads, case_timeout, cold,
          note):
    """Measure merge throughput: the floors (read every input byte, write one model), then each method
    on each backend, quiet and (with --busy) beside competing processes.

    MODEL arguments: the base model first, then task models; or --synthetic. Each case runs as its own
    command; rows give wall and work seconds, GB/s of input, peak RSS, the ratios to the floors, to
    mergekit and busy/quiet; the fused kernels' cold-compile time is reported apart.

    Example: cpift-merge bench --synthetic 1b --compare-mergekit --json bench.json --plot bench.png
    """
    from cpift.merge.tools.bench import run_bench
    from cpift.merge.tools.bench_report import markdown, plot

    targets = [_check_target(p, o, models) for p, o in ((json_path, "--json"), (plot_path, "--plot"),
                                                          (md_path, "--markdown"))]
    if workdir is not None:
        from cpift.merge.io.publish import check_inputs, check_not_protected

        check_not_protected(workdir, what="workdir")
        check_inputs(workdir, models, what="workdir")
    from cpift.merge.io.sizes import parse_size

    parse_size(max_shard_size, field="--max-shard-size")  # a bad size fails now, not in every case
    if plot_path is not None:
        require_module("matplotlib", "--plot", "plot")

    def items(text: str | None) -> list[str] | None:
        return None if text is None else [m.strip() for m in text.split(",") if m.strip()]

    result = run_bench(models=list(models), synthetic=synthetic, methods=items(methods), backends=items(backends),
                       busy=busy, busy_repeat=busy_repeat, compare_mergekit=compare_mergekit,
                       mergekit_methods=items(mergekit_methods), mergekit_repeat=mergekit_repeat, repeat=repeat,
                       workdir=workdir, cold=cold, max_shard_size=max_shard_size, threads=threads,
                       case_timeout=case_timeout,
                       note=note,
                       echo=lambda s: click.echo(s, err=True))
    json_target, plot_target, md_target = targets
    from cpift.merge.io.publish import write_atomic

    if json_target is not None:
        write_atomic(json_target, json.dumps(result, indent=2) + "\n", inputs=models)
    if md_target is not None:
        write_atomic(md_target, markdown(result), inputs=models)
    if plot_target is not None:
        plot(result, plot_target)
    click.echo(markdown(result))
