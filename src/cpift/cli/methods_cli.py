"""One ``cpift-merge`` command per registered merge method, built from its MethodSpec
(merge/methods/registry.py): its inputs become arguments, its parameters options, and the command
runs the method with them and the common options as one MergeOptions (cli/_options.py)."""

from __future__ import annotations

import click

from cpift.merge.methods.registry import METHODS, MethodSpec, ParamSpec, by_cli
from cpift.merge.options import merge_options

from ._options import SEED, Number, common_options, param_value

ROLE_ARGUMENTS = {
    ("model_a", "model_b"): [click.argument("model_a", type=click.Path()),
                             click.argument("model_b", type=click.Path())],
    ("model",): [click.argument("model", type=click.Path())],
    ("models",): [click.argument("models", nargs=-1, required=True, type=click.Path())],
    ("base", "models"): [click.argument("models", nargs=-1, required=True, type=click.Path()),
                         click.option("--base", required=True, type=click.Path(),
                                      help="Base model the deltas are taken from.")],
}

# A method with an optional base (nuslerp, multislerp): the models are taken as deltas from it if given.
OPTIONAL_BASE = [click.option("--base", default=None, type=click.Path(),
                              help="Optional base model: merge the deltas from it and add it back.")]


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
    text = p.help.format(base=", base excluded" if spec.has_base or spec.optional_base else "")
    return click.option(p.cli, p.name, default=None if p.default is None else str(p.default),
                        show_default=p.default is not None, help=text)


def method_command(spec: MethodSpec) -> click.Command:
    """The click command of a registered method."""
    if spec.roles not in ROLE_ARGUMENTS:
        raise ValueError(f"method '{spec.name}': no command for inputs {spec.roles}")

    def command(out, common, **given):
        inputs = [list(v) if role == "models" else v for role in spec.roles for v in [given.pop(role)]]
        kwargs = {p.name: param_value(p, given.pop(p.name)) for p in spec.params}
        if spec.optional_base:
            kwargs["base"] = given.pop("base")
        from cpift.merge.methods.runner import run_method  # the engine: imported once the arguments are parsed

        return run_method(spec, *inputs, out, options=merge_options(None, common), **kwargs)

    command.__name__ = spec.name
    command.__doc__ = spec.summary
    fn = common_options(command)
    for p in reversed(spec.params):
        fn = _option(spec, p)(fn)
    for decorate in reversed(ROLE_ARGUMENTS[spec.roles] + (OPTIONAL_BASE if spec.optional_base else [])):
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
