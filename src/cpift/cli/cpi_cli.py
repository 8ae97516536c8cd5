"""The CPI-FT steps of ``cpift-merge``: ``cores``, ``cluster``, ``fuse`` (cli/merge_cli.py adds them to its group)."""

from __future__ import annotations

import click

from cpift.errors import ParameterError

from ._options import (
    SEED,
    Number,
    allow_crimes_option,
    common_options,
    compute_options,
    out_option,
    overwrite_option,
    require_module,
    torch_threads,
)


def _named(specs: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise ParameterError(f"{option}: '{spec}' is not NAME=PATH (e.g. math=probes/math)")
        out.append((name, path))
    return out


@click.command()
@click.option("--base", required=True,
              help="The pre-trained model the tasks were fine-tuned from (directory or org/name).")
@click.option("--model", "models", multiple=True, required=True, metavar="NAME=PATH",
              help="A task's fine-tuned model; repeat for each task (they share each read of the base).")
@click.option("--p", "p", type=Number(), default=1.0, show_default=True,
              help="Core size: percentage of all scored entries, in (0, 100] (the paper: 1).")
@out_option("Directory for the masks, one NAME.safetensors per task (format: docs/cpi-ft.md#mask-files).")
@click.option("--granularity", default="element", show_default=True,
              help="What one mask entry covers: element (one parameter), row (a row of the last dimension) "
                   "or block:N (N consecutive parameters; score = mean |Δ| over the block).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Score only tensors whose name matches (repeatable; default: every floating-point tensor).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Do not score tensors whose name matches (repeatable).")
@overwrite_option
@allow_crimes_option
@compute_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table; the summary line only.")
def cores(base, models, p, out, granularity, include, exclude, overwrite, allow_crimes, threads, backend, device,
          quiet):
    """Each task's core region: the exact global top-p% of |θ_task − θ_base| over the whole model.

    Three streaming passes (radix select), memory independent of model size; ties at the threshold go
    to the tensor first in name order, then the lowest flat index, so exactly floor(p·D/100) entries
    are selected.
    """
    from cpift.merge.cpi.cores import compute_cores

    with torch_threads(threads):
        result = compute_cores(base, _named(models, "--model"), out, p=p, granularity=granularity,
                               include=list(include) or None, exclude=list(exclude) or None, overwrite=overwrite,
                               allow_crimes=allow_crimes, progress=not quiet, backend=backend, device=device)
    for warning in result.warnings():
        click.echo(warning, err=True)
    if not quiet:
        for note in result.notes:
            click.echo(note, err=True)
        click.echo(result.table())
    click.echo(result.summary())


@click.command()
@click.argument("masks", nargs=-1, required=True, type=click.Path())
@click.option("--tau", type=Number(), default=0.1, show_default=True,
              help="Link two tasks when the Jaccard overlap of their cores is ≥ τ, in [0, 1] (the paper: 0.1).")
@click.option("--order", type=click.Choice(["random", "given"]), default="random", show_default=True,
              help="Stage order of the groups: seeded random (the paper) or as the masks are given.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of --order random.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help='Write {"tasks", "jaccard", "groups", "order"} to this file.')
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a Jaccard heatmap with the groups outlined to this PNG (needs matplotlib).")
@compute_options
def cluster(masks, tau, order, seed, json_path, plot, threads, backend, device):
    """Group tasks by core overlap: Jaccard matrix (popcount on the packed masks), connected components.

    MASKS are files written by `cpift-merge cores`; the task name is the file name without
    .safetensors.
    """
    from cpift.merge.cpi.cluster import cluster_masks, plot_heatmap, write_json
    from cpift.merge.io.publish import check_side_file

    for target in (json_path, plot):  # refused before any work: never over a mask, never a directory
        if target:
            check_side_file(target, inputs=masks)
    if plot:
        require_module("matplotlib", "--plot", "plot")
    with torch_threads(threads):
        result = cluster_masks(list(masks), tau=tau, order=order, seed=seed, backend=backend, device=device)
    click.echo(result.table())
    if json_path:
        write_json(result, json_path, inputs=masks)
        click.echo(f"wrote {json_path}")
    if plot:
        plot_heatmap(result, plot, inputs=masks)
        click.echo(f"wrote {plot}")


@click.command()
@click.option("--backbone", required=True, help="The model to fuse into (the paper: the last stage of staged SFT).")
@click.option("--task", "tasks", multiple=True, required=True, metavar="NAME=MODEL:MASK",
              help="A task's model and core mask; repeat in stage order (later tasks win overlapping cores "
                   "with --overlap last).")
@click.option("--overlap", type=click.Choice(["last", "largest"]), default="last", show_default=True,
              help="Where cores overlap: the later task wins, or the larger |θ_task − θ_base| (needs --base).")
@click.option("--base", default=None, help="The pre-trained model, for --overlap largest.")
@click.option("--omega", type=Number(), default=None,
              help="Constant SLERP factor in [0, 1] for each step (default: t_k = 1/(k+1), an equal-weight "
                   "spherical running mean).")
@common_options
def fuse(backbone, tasks, overlap, base, omega, out, common):
    """Fuse task models into the backbone: incremental SLERP of non-core entries, then each task's core
    transplanted unchanged (docs/cpi-ft.md#fusion)."""
    from cpift.merge.cpi.fuse import parse_task, run_fuse
    from cpift.merge.options import merge_options

    return run_fuse(backbone, [parse_task(t) for t in tasks], out, overlap=overlap, base=base, omega=omega,
                    options=merge_options(common))
