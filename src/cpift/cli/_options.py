"""Options shared by the ``cpift-merge`` commands, defined once: every merge command takes
``common_options``; ``cores`` and ``cluster`` take the compute options (threads, backend, device)
and the output options they need from here too."""

from __future__ import annotations

import functools
import importlib
import os
from contextlib import contextmanager
from typing import Iterator

import click

from cpift.errors import ParameterError
from cpift.kernels.backend import BACKENDS
from cpift.merge.io.sizes import HELP as SIZE_HELP
from cpift.numbers import parse_number

# More torch threads than this many per CPU only slows the work; far more crashes the process.
MAX_THREADS = 4 * (os.cpu_count() or 1)


class Number(click.ParamType):
    """A numeric option read by ``cpift.numbers.parse_number``: finite, in its range, int64 integers."""

    def __init__(self, *, integer: bool = False, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False):
        self.integer, self.bounds = integer, dict(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
        self.name = "integer" if integer else "float"

    def convert(self, value, param, ctx):
        try:
            return parse_number(value, "value", integer=self.integer, **self.bounds)
        except ValueError as e:
            self.fail(str(e).removeprefix("value: "), param, ctx)


INT = Number(integer=True)  # any int64; the library checks the field's own range
FLOAT = Number()  # any finite number, likewise
SEED = Number(integer=True, lo=0)  # a non-negative int64
THREADS = Number(integer=True, lo=1, hi=MAX_THREADS)


def floats(value: str | None, option: str) -> list[float] | None:
    """'1,0.5,2' -> [1.0, 0.5, 2.0]; a click usage error naming ``option`` otherwise."""
    if value is None:
        return None
    try:
        return [parse_number(v, option) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated finite numbers like 1,0.5,2; got "
                                 f"'{value if len(value) <= 60 else value[:48] + '...'}'",
                                 param_hint=option) from None


def out_option(help_text: str):
    return click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help=help_text)


allow_crimes_option = click.option(
    "--allow-crimes", is_flag=True,
    help="Merge anyway when the inputs' config.json name different architectures (model_type, architectures) "
         "or an integer tensor differs between them (mergekit's flag; default: stop with an error).")
overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help=("Replace an earlier cpift output (a directory whose .cpift-output marker lists every file in it) "
          "or an empty directory, atomically, once the new one is complete; any other existing path, or a "
          "file added to a cpift output, is refused."))
threads_option = click.option(
    "--threads", type=THREADS, default=None,
    help="torch compute threads (default: torch's choice, one per core). Use 1 when other "
         "work shares the CPU: torch's per-op thread barriers stall when a core is taken.")
backend_option = click.option(
    "--backend", type=click.Choice(list(BACKENDS)), default=None,
    help="Kernel implementation: triton (CUDA; on the CPU only under TRITON_INTERPRET=1, "
         "for testing), cpu (the fused CPU kernels), torch (the reference), or auto = triton for CUDA "
         "tensors, else cpu. Default: $CPIFT_BACKEND, else auto.")
device_option = click.option(
    "--device", default="cpu", show_default=True,
    help="Where the math runs: cpu (straight from the memory-mapped files), or cuda / cuda:N "
         "(tensors are streamed through pinned host buffers, copy and compute overlapped).")


def compute_options(fn):
    """--threads, --backend, --device."""
    return threads_option(backend_option(device_option(fn)))


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the enclosed work on ``threads`` torch threads (None: leave torch's choice, and leave
    importing torch to the work, after its input checks)."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def common_options(fn):
    """Options every merge command takes, passed on as keyword arguments of the library function."""

    @out_option("Output model directory; written to a hidden sibling and renamed when complete.")
    @click.option("--dtype", default=None,
                  help="Cast inputs to this dtype before merging (float32, bfloat16, float16, float64); "
                       "default: keep each input's dtype. Math is float32 either way (float64 for float64).")
    @click.option("--out-dtype", default=None,
                  help="Dtype of the output tensors; default: --dtype, else the first model's dtype.")
    @click.option("--max-shard-size", default="5GB", show_default=True, help=SIZE_HELP)
    @overwrite_option
    @click.option("--allow-nonfinite", is_flag=True,
                  help="Merge even if an input tensor holds NaN or Inf (default: stop with an error).")
    @allow_crimes_option
    @click.option("--copy-tokenizer-from", type=click.Path(file_okay=False), default=None,
                  help="Directory to copy config.json, tokenizer and chat-template files from "
                       "(default: the first model).")
    @compute_options
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
    def wrapper(*args, out, dtype, out_dtype, max_shard_size, overwrite, allow_nonfinite, allow_crimes,
                copy_tokenizer_from, threads, backend, device, quiet, push_to_hub, private, commit_message,
                dry_run, resume, **kwargs):
        if dry_run and push_to_hub is not None:
            raise click.UsageError("--push-to-hub: a --dry-run writes nothing to push")
        if push_to_hub is None and (private or commit_message is not None):
            raise click.UsageError(f"{'--private' if private else '--commit-message'}: only applies with "
                                   f"--push-to-hub ORG/NAME")
        if push_to_hub is not None:
            from cpift.merge.hub import check_repo_id

            check_repo_id(push_to_hub)  # before the merge, not after it

        common = dict(dtype=dtype, out_dtype=out_dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                      allow_nonfinite=allow_nonfinite, copy_tokenizer_from=copy_tokenizer_from,
                      progress=not quiet, backend=backend, device=device)
        # Only when asked: a command whose function takes no such keyword still runs without them.
        common.update({k: True for k, on in (("dry_run", dry_run), ("resume", resume),
                                             ("allow_crimes", allow_crimes)) if on})
        precheck_command(kwargs, max_shard_size)
        with torch_threads(threads):
            result = fn(*args, out=out, common=common, **kwargs)
        if not quiet:
            for note in result.notes:
                click.echo(note, err=True)
        click.echo(result.summary())
        if push_to_hub is not None:
            from cpift.merge.hub import push

            url = push(result.out, push_to_hub, private=private, commit_message=commit_message)
            click.echo(f"pushed {result.out} to {push_to_hub}: {url}")

    return wrapper


def precheck_command(given: dict, max_shard_size: str) -> None:
    """Refuse the bad input that can be seen without torch before anything imports it (merge/precheck.py):
    a refusal then takes a fraction of a second instead of torch's import time."""
    from cpift.merge.methods.registry import by_cli
    from cpift.merge.precheck import precheck

    spec = by_cli(click.get_current_context().command.name)
    if spec is not None:  # per-model lists parsed as the command will parse them (same errors)
        given = {k: floats(v, p.cli) if (p := spec.param(k)) is not None and p.per_model and isinstance(v, str)
                 else v for k, v in given.items()}
    precheck(spec, given, max_shard_size=max_shard_size)


def require_module(module: str, option: str, extra: str) -> None:
    """Refuse ``option`` before any work when the optional package it needs is not installed (the one
    check for every such option, so nothing is written before the refusal).

    Raises:
        ParameterError: naming the option and the install command.
    """
    try:
        importlib.import_module(module)
    except ImportError:
        raise ParameterError(f"{option}: needs {module}, which is not installed (pip install 'cpift[{extra}]'); "
                             f"nothing was written") from None
