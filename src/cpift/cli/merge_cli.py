"""``cpift-merge``: each command is a thin layer over a function of ``cpift.merge``; the merge
methods' commands are built from the method registry (cli/methods_cli.py).

User errors (bad paths, shapes, parameters) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import click

from cpift.cli.bench_cli import bench

from ._options import SEED, common_options
from ._run import run
from .cpi_cli import cluster, cores, fuse
from .methods_cli import MethodGroup


@click.group(cls=MethodGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             no_args_is_help=True)
@click.version_option(package_name="cpift")
def cli() -> None:
    """Streaming model merges over Hugging Face safetensors checkpoints.

    MODEL arguments are directories holding model.safetensors or model.safetensors.index.json
    with its shards (failing those, pytorch_model.bin or pytorch_model.bin.index.json, read without
    unpickling code), Hugging Face Hub ids ORG/NAME[@REVISION] (an existing directory wins), PEFT LoRA
    adapter directories (their base from adapter_config.json), or BASE+ADAPTER (the adapter merged into
    BASE while streaming).
    Inputs are never modified; the output appears only when complete, with a model card (README.md)
    and cpift_recipe.yml, which `cpift-merge config` runs to reproduce it.
    """


@cli.command()
@click.argument("config_file", type=click.Path())
@click.option("--seed", type=SEED, default=None,
              help="Seed of every random choice (the DARE drop masks, as mergekit's --random-seed); "
                   "default: the config's cpift.seed, else 0. The same seed gives byte-identical output.")
@common_options
def config(config_file, seed, out, common):
    """Run a mergekit YAML config unchanged (every merge_method cpift-merge has a command for, slices,
    tokenizer_source / tokenizer / chat_template, model+lora inputs), or the cpift_recipe.yml of a
    cores or fuse output (its `cpift_step` key), to reproduce it.

    The YAML's dtype and out_dtype are used unless --dtype / --out-dtype are given.
    """
    from cpift.merge.cpi.recipes import is_step_recipe

    if click.get_current_context().get_parameter_source("max_shard_size").name == "DEFAULT":
        del common["max_shard_size"]  # the recipe's cpift.max_shard_size, else 5GB, applies
    if is_step_recipe(config_file):  # a cores or fuse recipe (cpift_step: ...); a file that is not YAML: refused
        from cpift.merge.cpi.replay import run_step_recipe

        if seed is not None:
            raise click.UsageError("--seed: a cores or fuse recipe makes no random choice; drop --seed")
        return run_step_recipe(config_file, out, **common)
    from cpift.merge.mergekit.run import run_config

    return run_config(config_file, out, seed=seed, **{k: v for k, v in common.items()
                                           if v is not None or k not in ("dtype", "out_dtype")})


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="A new or empty directory to build the demo in, kept after (default: a temporary directory, "
                   "removed after).")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True,
              help="tiny: ~2 MB models (seconds); small: ~100 MB bf16 Llama-shaped models.")
def demo(workdir, size):
    """Build three small Llama-shaped checkpoints, merge them with slerp, linear, task-arithmetic, ties
    and dare-ties, run cores → cluster → fuse on them, and print what happened.

    With --workdir (a new or empty directory, or one an earlier demo made), every step is printed as
    the command that reruns it.
    """
    from cpift.merge.tools.demo import run_demo

    run_demo(workdir, size=size, echo=click.echo)


for command in (bench, cores, cluster, fuse):  # cli/bench_cli.py, cli/cpi_cli.py
    cli.add_command(command)


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

    url = push_model(directory, repo, private=private, revision=revision, commit_message=commit_message)
    click.echo(f"pushed {directory} to {repo}: {url}")
    if not (Path(directory) / "README.md").is_file():  # after the push: a refusal stays one line
        click.echo(f"note: {directory} has no README.md model card (cpift-merge writes one with every output)",
                   err=True)


def main(argv: list[str] | None = None) -> None:
    # A merge stopped by Ctrl-C leaves its finished shards for --resume.
    run(cli, "cpift-merge", argv, aborted="aborted; no output was written (rerun with --resume to keep the "
                                          "output shards already finished)")


if __name__ == "__main__":
    main()
