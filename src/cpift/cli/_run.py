"""How both CLIs end: user errors as one line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import sys

import click

from cpift.errors import CpiftError


def run(group: click.Group, prog: str, argv: list[str] | None, *, aborted: str = "aborted",
        missing: dict[str, str] | None = None) -> None:
    """Run a click group; exit 0, 2 (user error) or 130 (interrupted).

    ``missing`` maps an optional module's name to the one-line error shown when it is not installed.
    """
    try:
        code = group.main(args=argv, prog_name=prog, standalone_mode=False)
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
