"""Settings declared once, in their dataclass: each field's default, help and CLI spelling sit on
the field, and the click options and the parsing back into the dataclass are generated from them.

A field becomes a command-line option when its metadata is :func:`flag` (a value or an on/off
switch) or :func:`switch_for` (an optional nested settings object, on when its switch is given,
with its own flagged fields under the switch's name). Adding a setting is then one field: the CLI,
the Python API (the dataclass itself) and every record made with :func:`dataclasses.asdict` follow.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import click

Settings = TypeVar("Settings")
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
FLAG = "jdfashion.flag"


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field reads on the command line. ``name``: the option (default ``--field-name``);
    ``type``: a click type (default: the field's); ``parse``: text -> value, for values given as
    text (``"tta"`` for rotation angles); ``nested``: the settings class a switch turns on."""

    help: str
    name: str | None = None
    type: click.ParamType | Any = None
    parse: Callable[[str], Any] | None = None
    show: str | None = None
    nested: type | None = None


def flag(
    help: str,
    *,
    name: str | None = None,
    type: click.ParamType | Any = None,
    parse: Callable[[str], Any] | None = None,
    show: str | None = None,
) -> dict[str, Flag]:
    """Field metadata making the field an option; ``show`` is the default as a user types it."""
    return {FLAG: Flag(help, name, type, parse, show)}


def switch_for(nested: type, help: str, *, name: str | None = None) -> dict[str, Flag]:
    """Field metadata for an optional nested settings object: ``--name/--no-name`` turns it on, its
    flagged fields become ``--name-field`` options."""
    return {FLAG: Flag(help, name, nested=nested)}


def _flagged(cls: type) -> Iterator[tuple[dataclasses.Field, Flag, Any]]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if FLAG in field.metadata:
            yield field, field.metadata[FLAG], hints[field.name]


def _option_name(field: dataclasses.Field, spec: Flag, prefix: str) -> str:
    return spec.name or f"--{prefix}{field.name.replace('_', '-')}"


def _dest(field: dataclasses.Field, prefix: str) -> str:
    return f"{prefix.replace('-', '_')}{field.name}"


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{field.name}: a command-line setting needs a default")


def _click_type(hint: Any) -> Any:
    """The click type a field's annotation implies: a choice for a Literal, the type inside an
    ``X | None``, None (text) for what a ``parse`` reads."""
    if typing.get_origin(hint) is typing.Literal:
        return click.Choice(typing.get_args(hint))
    inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(inner) == 1:
        return _click_type(inner[0])
    return hint if hint in (int, float, str) else None


def _switch(name: str, dest: str, default: bool | None, help: str) -> Decorator:
    negative = f"--no-{name.removeprefix('--')}"
    shown = default is not None
    return click.option(f"{name}/{negative}", dest, default=default, show_default=shown, help=help)


def _inner_prefix(field: dataclasses.Field, spec: Flag, prefix: str) -> str:
    """The option prefix of a switched nested object's fields: ``self-training-`` for ``--self-training``."""
    return _option_name(field, spec, prefix).removeprefix("--") + "-"


def _options(cls: type, prefix: str = "", unset: bool = False) -> list[Decorator]:
    options = []
    for field, spec, hint in _flagged(cls):
        name, dest = _option_name(field, spec, prefix), _dest(field, prefix)
        if spec.nested is not None:
            options.append(_switch(name, dest, None if unset else False, spec.help))
            options.extend(_options(spec.nested, _inner_prefix(field, spec, prefix), unset))
            continue
        shown = spec.show if spec.show is not None else _default(field)
        help = f"{spec.help} [default: {_text(shown)}]" if unset else spec.help
        if hint is bool:
            options.append(_switch(name, dest, None if unset else shown, help))
            continue
        kind = spec.type or _click_type(hint)
        default = None if unset else shown
        options.append(
            click.option(name, dest, type=kind, default=default, show_default=not unset, help=help)
        )
    return options


def click_options(cls: type, *, unset: bool = False) -> Decorator:
    """A decorator adding one click option per flagged field of ``cls`` (and of its switched nested
    settings), in field order. ``unset``: every option defaults to None (not given), its help naming
    the field's default, for commands where something else (a training recipe) fills what is not
    given; read those with :func:`given_options`."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(_options(cls, unset=unset)):
            function = option(function)
        return function

    return decorate


def _parsed(spec: Flag, value: Any) -> Any:
    return spec.parse(value) if spec.parse is not None and isinstance(value, str) else value


def given_options(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` whose options were given (``unset`` mode), parsed where a field says how."""
    given = {}
    for field, spec, _ in _flagged(cls):
        value = values[_dest(field, "")]
        if value is not None:
            given[field.name] = (
                spec.parse(value) if spec.parse is not None and isinstance(value, str) else value
            )
    return given


def option_names(cls: type, prefix: str = "") -> list[str]:
    """The keyword names the options of :func:`click_options` pass to the command."""
    names = []
    for field, spec, _ in _flagged(cls):
        names.append(_dest(field, prefix))
        if spec.nested is not None:
            names.extend(
                option_names(spec.nested, _option_name(field, spec, prefix).removeprefix("--") + "-")
            )
    return names


def from_options(cls: type[Settings], values: Mapping[str, Any], prefix: str = "", **fixed: Any) -> Settings:
    """``cls`` from the keyword values of its options (text parsed where a field says how), plus
    ``fixed`` fields that have no option."""
    kwargs = dict(fixed)
    for field, spec, _ in _flagged(cls):
        value = values[_dest(field, prefix)]
        if spec.nested is not None:
            nested = from_options(spec.nested, values, _inner_prefix(field, spec, prefix)) if value else None
            kwargs[field.name] = nested
        else:
            kwargs[field.name] = _parsed(spec, value)
    return cls(**kwargs)


def _text(value: Any) -> str:
    """A value as a user types it: 90 for 90.0 degrees."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def command_words(settings: Any, prefix: str = "") -> list[str]:
    """The options that rebuild ``settings`` on a command line, those that differ from the defaults."""
    words: list[str] = []
    for field, spec, _ in _flagged(type(settings)):
        value, default = getattr(settings, field.name), _default(field)
        name = _option_name(field, spec, prefix)
        if spec.nested is not None:
            if value is not None:
                words.append(name)
                words += command_words(value, _inner_prefix(field, spec, prefix))
        elif isinstance(default, bool):  # a switch
            if value != default:
                words.append(name if value else "--no-" + name.removeprefix("--"))
        elif value != default:
            words += [name, ",".join(map(_text, value)) if isinstance(value, tuple) else _text(value)]
    return words
