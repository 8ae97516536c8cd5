"""How both CLIs end: user errors as one line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import os
import select
import stat
import sys
from typing import NoReturn

import click

from cpift.errors import CpiftError


def _stdout_reader_gone() -> bool:
    """stdout is a pipe whose reading end is closed (``cmd | head -0``)."""
    try:
        fd = sys.__stdout__.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _exit_reader_gone() -> NoReturn:
    """Exit as a Unix writer does when its reader left: quietly, with 141 (128 + SIGPIPE, the status a
    shell shows for ``yes | head -1``), whatever the command had finished (its output is published)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.__stdout__.fileno())  # the interpreter's last flush must not fail again
    os.close(devnull)
    sys.exit(141)


def run(group: click.Group, prog: str, argv: list[str] | None, *, aborted: str = "aborted",
        missing: dict[str, str] | None = None) -> None:
    """Run a click group; exit 0, 2 (user error), 130 (interrupted) or 141 (stdout's reader left).

    ``missing`` maps an optional module's name to the one-line error shown when it is not installed.
    """
    try:
        code = group.main(args=argv, prog_name=prog, standalone_mode=False)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit (status 120)
    except (BrokenPipeError, SystemExit) as e:  # click turns EPIPE into exit 1; the Unix convention is 141
        if (isinstance(e, BrokenPipeError) or e.code == 1) and _stdout_reader_gone():
            _exit_reader_gone()
        raise
    except click.exceptions.Abort:  # click turns Ctrl-C into Abort
        click.echo(f"{prog}: {aborted}", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"{prog}: error: {e.format_message()}", err=True)
        sys.exit(2)
    except CpiftError as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as e:
        if e.name not in (missing or {}):
            raise
        click.echo(f"{prog}: error: {missing[e.name]}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted; no output was written", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
