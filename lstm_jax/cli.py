"""Command-line flags generated from config dataclasses, so no flag is written twice.

Every field becomes ``--field-name``; its ``metadata["help"]`` is the help text and
its default is shown, and ``metadata["resumable"]`` adds that a resumed run may change it.
Booleans get ``--flag / --no-flag``.
"""

import argparse
import dataclasses
import types
import typing


def _flag_type(field: dataclasses.Field):
    kind = field.type
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def flag_name(field_name: str) -> str:
    """The flag of config field ``field_name``: ``--field-name``."""
    return "--" + field_name.replace("_", "-")


def flag_text(field_name: str, value) -> str:
    """``value`` of config field ``field_name`` as written on the command line (``--no-flag`` for a false boolean)."""
    flag = flag_name(field_name)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def add_flags(parser: argparse.ArgumentParser, config_cls, title: str | None = None,
              presets: dict[str, dict] | None = None) -> None:
    """Add one flag per field of ``config_cls`` (a dataclass) to ``parser``; a field that one of ``presets`` (name ->
    {field: value}) sets says so in its help, next to the default."""
    group = parser.add_argument_group(title or config_cls.__name__, config_cls.__doc__)
    for field in dataclasses.fields(config_cls):
        flag = flag_name(field.name)
        resumable = "; a resumed run may change it" if field.metadata.get("resumable") else ""
        preset_values = [f"{name} {values[field.name]!r}" for name, values in (presets or {}).items() if field.name in values]
        in_presets = f"; preset {', '.join(preset_values)}" if preset_values else ""
        help_text = f"{field.metadata.get('help', '')} (default: {field.default!r}{in_presets}{resumable})".replace("%", "%%")
        kind = _flag_type(field)
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=field.default, help=help_text, metavar=kind.__name__.upper())


def from_args(config_cls, args: argparse.Namespace):
    """Build ``config_cls`` from the parsed flags that :func:`add_flags` added."""
    return config_cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(config_cls)})


def check_unique_flags(*config_classes) -> None:
    names = [field.name for cls in config_classes for field in dataclasses.fields(cls)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"config fields appear in more than one config class: {duplicates}")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the options that ``argv`` sets explicitly (not left at their defaults)."""
    probe = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, argparse.BooleanOptionalAction):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kwargs)
    known, _ = probe.parse_known_args(argv)
    return set(vars(known))
