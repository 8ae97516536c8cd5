"""One ``cpift-merge`` command per registered merge method, built from its MethodSpec
(merge/methods/registry.py): its inputs become arguments, its parameters options, and the command
runs the method with them and the common options as one MergeOptions (cli/_options.py)."""

from __future__ import annotations

import click

from cpift.merge.methods.registry import METHODS, MethodSpec, ParamSpec, by_cli
from cpift.merge.options import merge_options

from ._options import SEED, Number, common_options, param_value


def _arguments(spec: MethodSpec) -> list:
    """The command's input arguments, then its --base option, as its Inputs declare them."""
    made = [click.argument(a, nargs=-1, required=True, type=click.Path()) if a == "models"
            else click.argument(a, type=click.Path()) for a in spec.inputs.arguments]
    if spec.inputs.base_option is not None:
        required, text = spec.inputs.base_option
        made.append(click.option("--base", required=required, default=None, type=click.Path(), help=text))
    return made


def _option(spec: MethodSpec, p: ParamSpec):
    if p.kind == "flag" and p.default is True:  # on by default: --flag/--no-flag
        return click.option(f"{p.cli}/--no-{p.cli.removeprefix('--')}", p.name, default=True, help=p.help)
    if p.kind == "flag":
        return click.option(p.cli, p.name, is_flag=True, help=p.help)
    if p.kind == "seed":
        return click.option(p.cli, p.name, type=SEED, default=p.default, show_default=True,
                            help=p.help)
    if p.kind in ("number", "integer"):  # a count with a unit (karcher's iterations): the method says a whole number
        return click.option(p.cli, p.name, type=Number(integer=p.kind == "integer" and not p.unit), default=p.default,
                            show_default=True, help=p.help)
    text = p.help.format(base=", base excluded" if spec.inputs.takes_base else "")
    return click.option(p.cli, p.name, default=None if p.default is None else str(p.default),
                        show_default=p.default is not None, help=text)


def method_command(spec: MethodSpec) -> click.Command:
    """The click command of a registered method."""

    def command(out, common, **given):
        inputs = [list(v) if name == "models" else v for name in spec.inputs.positional for v in [given.pop(name)]]
        kwargs = {p.name: param_value(p, given.pop(p.name)) for p in spec.params}
        if spec.inputs.base_keyword:
            kwargs["base"] = given.pop("base")
        from cpift.merge.methods.runner import run_method  # the engine: imported once the arguments are parsed

        return run_method(spec, *inputs, out, options=merge_options(common), **kwargs)

    command.__name__ = spec.name
    command.__doc__ = spec.summary
    fn = common_options(command)
    for p in reversed(spec.params):
        fn = _option(spec, p)(fn)
    for decorate in reversed(_arguments(spec)):
        fn = decorate(fn)
    return click.command(spec.cli, help=spec.summary)(fn)


class MethodGroup(click.Group):
    """A click group whose method commands come from the registry when asked for, so a method
    registered later (a plug-in, a test) is a command too."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(s.cli for s in METHODS.values())})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        spec = by_cli(name)
        return method_command(spec) if spec is not None else None
