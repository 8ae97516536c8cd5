"""Options shared by the ``cpift-merge`` commands, defined once: every merge command takes
``common_options``; ``cores`` and ``cluster`` take the compute options (threads, backend, device)
and the output options they need from here too."""

from __future__ import annotations

import functools
import importlib
import os
from contextlib import contextmanager
from typing import Any, Iterator

import click

from cpift.errors import ParameterError
from cpift.kernels.backend import BACKENDS
from cpift.merge.options import CLI_FIELDS
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


def param_value(p, raw: Any) -> Any:
    """A method parameter as its command passes it on: per-model lists parsed (one value of a
    number-or-per-model parameter stays a number); other kinds as given."""
    if p.kind == "per_model":
        return floats(raw, p.cli)
    if p.kind == "number_or_per_model":
        values = floats(raw, p.cli)
        return values[0] if values and len(values) == 1 else values
    return raw


def out_option(help_text: str):
    return click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help=help_text)


def merge_option(name: str):
    """The click option of a MergeOptions field, from its ``cli`` metadata (merge/options.py)."""
    meta = dict(CLI_FIELDS[name].metadata["cli"])
    flag, kind = meta.pop("flag"), meta.pop("kind")
    if kind == "flag":
        return click.option(flag, is_flag=True, **meta)
    if kind == "dir":
        meta["type"] = click.Path(file_okay=False)
    elif kind == "backend":
        meta["type"] = click.Choice(list(BACKENDS))
    meta.setdefault("default", CLI_FIELDS[name].default)
    return click.option(flag, **meta)


allow_crimes_option = merge_option("allow_crimes")
overwrite_option = merge_option("overwrite")
threads_option = click.option(
    "--threads", type=THREADS, default=None,
    help="torch compute threads (default: torch's choice, one per core). Use 1 when other "
         "work shares the CPU: torch's per-op thread barriers stall when a core is taken.")
backend_option = merge_option("backend")
device_option = merge_option("device")


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


def _merge_options(fn):
    """Every MergeOptions field with a command-line option, in field order; --threads before --backend
    and -q/--quiet (progress off) after --device, as the merge commands have always listed them."""
    for name in reversed(CLI_FIELDS):
        if name == "device":
            fn = quiet_option(fn)
        fn = merge_option(name)(fn)
        if name == "backend":
            fn = threads_option(fn)
    return fn


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar and no notes; the summary line only.")


def common_options(fn):
    """Options every merge command takes, passed on as keyword arguments of the library function."""

    @out_option("Output model directory; written to a hidden sibling and renamed when complete.")
    @_merge_options
    @click.option("--push-to-hub", "push_to_hub", metavar="ORG/NAME", default=None,
                  help="After the merge, upload the output (with its model card) to this Hub model repo, "
                       "creating it if needed (as cpift-merge push). A new repo is public unless --private.")
    @click.option("--private", is_flag=True,
                  help="With --push-to-hub: create the repo private (default: public, the Hub's default; "
                       "an existing repo keeps its visibility).")
    @click.option("--commit-message", metavar="TEXT", default=None,
                  help="With --push-to-hub: the commit message (default: Upload NAME with cpift).")
    @functools.wraps(fn)
    def wrapper(*args, out, threads, quiet, push_to_hub, private, commit_message, **kwargs):
        given = {name: kwargs.pop(name) for name in CLI_FIELDS}
        dry_run, resume, allow_crimes = given["dry_run"], given["resume"], given["allow_crimes"]
        if dry_run and push_to_hub is not None:
            raise click.UsageError("--push-to-hub: a --dry-run writes nothing to push")
        if push_to_hub is None and (private or commit_message is not None):
            raise click.UsageError(f"{'--private' if private else '--commit-message'}: only applies with "
                                   f"--push-to-hub ORG/NAME")
        if push_to_hub is not None:
            from cpift.merge.hub import check_repo_id

            check_repo_id(push_to_hub)  # before the merge, not after it

        common = {k: v for k, v in given.items() if k not in ("dry_run", "resume", "allow_crimes")}
        common["progress"] = not quiet
        # Only when asked: a command whose function takes no such keyword still runs without them.
        common.update({k: True for k, on in (("dry_run", dry_run), ("resume", resume),
                                             ("allow_crimes", allow_crimes)) if on})
        precheck_command(kwargs, given["max_shard_size"])
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
        given = {k: param_value(p, v) if (p := spec.param(k)) is not None and isinstance(v, str) else v
                 for k, v in given.items()}
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
