"""``cpift-merge``: each command is a thin layer over a function of ``cpift.merge``.

User errors (bad paths, shapes, parameters) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools

import click

from cpift.cli.bench_cli import bench
from cpift.merge import methods
from cpift.merge.sizes import HELP as SIZE_HELP
from cpift.merge.engine import BACKENDS

from ._run import run



def _floats(value: str | None, option: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 1,0.5,2; got '{value}'",
                                 param_hint=option) from None


def common_options(fn):
    """Options every merge command takes, passed on as keyword arguments of the library function."""

    @click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False),
                  help="Output model directory; written to a hidden sibling and renamed when complete.")
    @click.option("--dtype", default=None,
                  help="Cast inputs to this dtype before merging (float32, bfloat16, float16, float64); "
                       "default: keep each input's dtype. Math is float32 either way (float64 for float64).")
    @click.option("--out-dtype", default=None,
                  help="Dtype of the output tensors; default: --dtype, else the first model's dtype.")
    @click.option("--max-shard-size", default="5GB", show_default=True, help=SIZE_HELP)
    @click.option("--overwrite", is_flag=True,
                  help=("Replace an earlier cpift output (a directory holding its .cpift-output marker) or an empty "
                       "directory, atomically, once the new one is complete; any other existing path is refused."))
    @click.option("--allow-nonfinite", is_flag=True,
                  help="Merge even if an input tensor holds NaN or Inf (default: stop with an error).")
    @click.option("--copy-tokenizer-from", type=click.Path(file_okay=False), default=None,
                  help="Directory to copy config.json, tokenizer and chat-template files from "
                       "(default: the first model).")
    @click.option("--threads", type=click.IntRange(min=1), default=None,
                  help="torch compute threads (default: torch's choice, one per core). Use 1 when other "
                       "work shares the CPU: torch's per-op thread barriers stall when a core is taken.")
    @click.option("--backend", type=click.Choice(BACKENDS), default=None,
                  help="Kernel implementation: cpu (fused CPU kernels, needs numba), triton (CUDA; on the "
                       "CPU only under TRITON_INTERPRET=1, for testing), torch (the reference), or auto = "
                       "triton for CUDA tensors, else cpu (torch without numba). "
                       "Default: $CPIFT_BACKEND, else auto.")
    @click.option("--device", default="cpu", show_default=True,
                  help="Where the math runs: cpu (straight from the memory-mapped files), or cuda / cuda:N "
                       "(tensors are streamed through pinned host buffers, copy and compute overlapped).")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar and no notes; the summary line only.")
    @click.option("--dry-run", is_flag=True,
                  help="Validate every input and print the plan (tensors, bytes to read and write, output "
                       "shards, expected peak memory); write nothing.")
    @click.option("--resume", is_flag=True,
                  help="Continue an interrupted merge into the same -o with the same inputs and options: "
                       "the output shards it finished (SHA-256 checked) are kept, the rest computed.")
    @click.option("--push-to-hub", "push_to_hub", metavar="ORG/NAME", default=None,
                  help="After the merge, upload the output (with its model card) to this Hub model repo, "
                       "creating it if needed (as cpift-merge push). A new repo is public unless --private.")
    @click.option("--private", is_flag=True,
                  help="With --push-to-hub: create the repo private (default: public, the Hub's default; "
                       "an existing repo keeps its visibility).")
    @click.option("--commit-message", metavar="TEXT", default=None,
                  help="With --push-to-hub: the commit message (default: Upload NAME with cpift).")
    @functools.wraps(fn)
    def wrapper(*args, out, dtype, out_dtype, max_shard_size, overwrite, allow_nonfinite,
                copy_tokenizer_from, threads, backend, device, quiet, push_to_hub, private, commit_message,
                dry_run, resume, **kwargs):
        import torch

        if dry_run and push_to_hub is not None:
            raise click.UsageError("--push-to-hub: a --dry-run writes nothing to push")
        if push_to_hub is None and (private or commit_message is not None):
            raise click.UsageError(f"{'--private' if private else '--commit-message'}: only applies with "
                                   f"--push-to-hub ORG/NAME")
        if push_to_hub is not None:
            from cpift.merge.hub import check_repo_id

            check_repo_id(push_to_hub)  # before the merge, not after it

        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        common = dict(dtype=dtype, out_dtype=out_dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                      allow_nonfinite=allow_nonfinite, copy_tokenizer_from=copy_tokenizer_from,
                      progress=not quiet, backend=backend, device=device)
        # Only when asked: a command whose function takes no such keyword still runs without them.
        common.update({k: True for k, on in (("dry_run", dry_run), ("resume", resume)) if on})
        try:
            result = fn(*args, out=out, common=common, **kwargs)
        finally:
            torch.set_num_threads(previous)
        if not quiet:
            for note in result.notes:
                click.echo(note, err=True)
        click.echo(result.summary())
        if push_to_hub is not None:
            from cpift.merge.hub import push

            url = push(result.out, push_to_hub, private=private, commit_message=commit_message)
            click.echo(f"pushed {result.out} to {push_to_hub}: {url}")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             no_args_is_help=True)
@click.version_option(package_name="cpift")
def cli() -> None:
    """Streaming model merges over Hugging Face safetensors checkpoints.

    MODEL arguments are directories holding model.safetensors or model.safetensors.index.json
    with its shards, or Hugging Face Hub ids ORG/NAME[@REVISION] (an existing directory wins).
    Inputs are never modified; the output appears only when complete, with a model card (README.md)
    and cpift_recipe.yml, which `cpift-merge config` runs to reproduce it.
    """


@cli.command()
@click.argument("model_a", type=click.Path())
@click.argument("model_b", type=click.Path())
@click.option("--t", "t", type=float, default=0.5, show_default=True,
              help="Interpolation factor in [0, 1]: 0 gives MODEL_A, 1 gives MODEL_B.")
@common_options
def slerp(model_a, model_b, t, out, common):
    """Spherical interpolation of two models, tensor by tensor (each tensor one vector)."""
    return methods.slerp(model_a, model_b, out, t=t, **common)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--weights", default=None, help="Comma-separated weight per model (default: all 1).")
@common_options
def linear(models, weights, out, common):
    """Weighted average Σ w_i x_i / Σ w_i of two or more models."""
    return methods.linear(list(models), out, weights=_floats(weights, "--weights"), **common)


def delta_options(fn):
    fn = click.option("--lambda", "lam", type=float, default=1.0, show_default=True,
                      help="Scale λ of the combined delta added to the base.")(fn)
    fn = click.option("--weights", default=None,
                      help="Comma-separated weight per model, base excluded (default: all 1).")(fn)
    fn = click.option("--base", required=True, type=click.Path(), help="Base model the deltas are taken from.")(fn)
    return click.argument("models", nargs=-1, required=True, type=click.Path())(fn)


def density_option(default: float | None, text: str):
    return click.option("--density", default=None if default is None else str(default), show_default=True,
                        help=text + " One value, or comma-separated per model, each in (0, 1].")


def _density(value: str | None):
    d = _floats(value, "--density")
    return d[0] if d and len(d) == 1 else d


@cli.command("task-arithmetic")
@delta_options
@common_options
def task_arithmetic(models, base, weights, lam, out, common):
    """b + λ Σ w_i (x_i − b)."""
    return methods.task_arithmetic(base, list(models), out, weights=_floats(weights, "--weights"), lam=lam, **common)


@cli.command()
@delta_options
@density_option(1.0, "Share of each delta kept by magnitude (k = floor(density × numel)).")
@click.option("--global-trim", is_flag=True,
              help="Trim with one magnitude threshold over the whole model (TIES paper) instead of per tensor.")
@common_options
def ties(models, base, weights, lam, density, global_trim, out, common):
    """TIES: trim deltas by magnitude, elect a sign per entry, average the agreeing deltas."""
    return methods.ties(base, list(models), out, weights=_floats(weights, "--weights"), lam=lam,
                        density=_density(density), global_trim=global_trim, **common)


def _dare_command(name: str, fn, doc: str):
    @cli.command(name, help=doc)
    @delta_options
    @density_option(0.5, "Probability of keeping each delta entry (kept entries are scaled by 1/density).")
    @click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Seed of the drop mask; the same seed gives byte-identical output.")
    @common_options
    def command(models, base, weights, lam, density, seed, out, common):
        return fn(base, list(models), out, weights=_floats(weights, "--weights"), lam=lam,
                  density=_density(density), seed=seed, **common)

    return command


_dare_command("dare-linear", methods.dare_linear, "DARE drop-and-rescale, then task arithmetic.")
_dare_command("dare-ties", methods.dare_ties, "DARE drop-and-rescale, then TIES sign election.")


@cli.command()
@click.argument("config_file", type=click.Path())
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of every random choice (the DARE drop masks, as mergekit's --random-seed); "
                   "default: the config's cpift.seed, else 0. The same seed gives byte-identical output.")
@common_options
def config(config_file, seed, out, common):
    """Run a mergekit-style YAML config (linear, slerp, task_arithmetic, ties, dare_linear, dare_ties),
    or the cpift_recipe.yml of a cores or fuse output (its `cpift_step` key), to reproduce it.

    The YAML's dtype and out_dtype are used unless --dtype / --out-dtype are given.
    """
    from cpift.merge.config_plan import run_config
    from cpift.merge.step_recipe import is_step_recipe, run_step_recipe

    if click.get_current_context().get_parameter_source("max_shard_size").name == "DEFAULT":
        del common["max_shard_size"]  # the recipe's cpift.max_shard_size, else 5GB, applies
    if is_step_recipe(config_file):  # a cores or fuse recipe (cpift_step: ...)
        return run_step_recipe(config_file, out, **common)
    return run_config(config_file, out, seed=seed, **{k: v for k, v in common.items()
                                           if v is not None or k not in ("dtype", "out_dtype")})


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to build the demo checkpoints (default: a temporary directory, removed after).")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="small", show_default=True,
              help="tiny: ~2 MB models; small: ~100 MB bf16 Llama-shaped models.")
def demo(workdir, size):
    """Build small Llama-shaped checkpoints, merge them with every method, print what happened."""
    from cpift.merge.demo import run_demo

    run_demo(workdir, size=size, echo=click.echo)


cli.add_command(bench)  # cli/bench_cli.py


@cli.command()
@click.argument("repo", metavar="ORG/NAME[@REVISION]")
def pull(repo):
    """Download a Hub model's safetensors, JSON and tokenizer files into the Hub cache; print its path.

    HF_HOME / HF_HUB_CACHE choose the cache; with HF_HUB_OFFLINE=1 only the cache is looked at.
    Merge commands pull ORG/NAME[@REVISION] model arguments the same way.
    """
    from cpift.merge.hub import pull as pull_model

    click.echo(pull_model(repo))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("repo", metavar="ORG/NAME")
@click.option("--private", is_flag=True,
              help="Create the repo private (default: public, the Hub's default; an existing repo keeps its "
                   "visibility).")
@click.option("--revision", metavar="BRANCH", default=None,
              help="Branch to commit to, created if missing (default: main).")
@click.option("--commit-message", metavar="TEXT", default=None,
              help="The commit message (default: Upload NAME with cpift).")
def push(directory, repo, private, revision, commit_message):
    """Upload a model directory with its model card to a Hub model repo, creating the repo if needed."""
    from pathlib import Path

    from cpift.merge.hub import push as push_model

    if Path(directory).is_dir() and not (Path(directory) / "README.md").is_file():
        click.echo(f"note: {directory} has no README.md model card (cpift-merge writes one with every output)",
                   err=True)
    click.echo(f"pushed {directory} to {repo}: {push_model(directory, repo, private=private, revision=revision, commit_message=commit_message)}")


from . import cpi_cli  # noqa: E402,F401  registers cores, cluster and fuse on the group above


def main(argv: list[str] | None = None) -> None:
    # A merge stopped by Ctrl-C leaves its finished shards for --resume.
    run(cli, "cpift-merge", argv, aborted="aborted; no output was written (rerun with --resume to keep the "
                                          "output shards already finished)")


if __name__ == "__main__":
    # Run the package module's main: cli/cpi_cli.py registers cores, cluster and fuse on
    # cpift.cli.merge_cli's group, which under `python -m` is a second copy of this module.
    from cpift.cli.merge_cli import main as package_main

    package_main()
