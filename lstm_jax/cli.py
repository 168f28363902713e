"""Command-line flags generated from config dataclasses, so no flag is written twice.

Every field becomes ``--field-name``; its ``metadata["help"]`` is the help text and
its default is shown, and ``metadata["resumable"]`` adds that a resumed run may change it.
Booleans get ``--flag / --no-flag``. A numeric field's ``metadata["range"]`` (a :class:`Range`) is what
:func:`check_ranges` holds its value to, in the config itself and before a command reads or writes anything.
"""

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping


class Range(typing.NamedTuple):
    """The values a numeric config field may take: from ``low`` to ``high``, each bound included unless open."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _bound_text(self.low), _bound_text(self.high)
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _bound_text(bound: float) -> str:
    return str(int(bound)) if math.isfinite(bound) and bound == int(bound) else f"{bound:g}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
SEED = Range(0, 2**63)  # what jax.random.key takes
RATE = Range(0, 1)  # a probability of dropping, or a decay: 1 would drop everything or never move
FRACTION = Range(0, 1, high_open=False)


def range_errors(values: Mapping, *config_classes) -> list[str]:
    """One message per field of ``config_classes`` whose value in ``values`` (field name -> value) is outside its
    ``metadata["range"]``, e.g. ``--input-dropout must be in [0, 1), got 1.5``."""
    return [f"{flag_name(field.name)} must be {_finite(values[field.name])}{field.metadata['range']}, got {values[field.name]}"
            for cls in config_classes for field in dataclasses.fields(cls)
            if "range" in field.metadata and values[field.name] not in field.metadata["range"]]  # fmt: skip


def _finite(value) -> str:
    return "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""


def check_ranges(config) -> None:
    """ValueError naming every field of the dataclass ``config`` that is outside its range."""
    errors = range_errors(vars(config), type(config))
    if errors:
        raise ValueError("; ".join(errors))


def field_with_default(config_cls, name: str, default) -> dataclasses.Field:
    """Field ``name`` of ``config_cls`` (its help and range) with another default, for a subclass that only changes
    defaults."""
    inherited = next(field for field in dataclasses.fields(config_cls) if field.name == name)
    return dataclasses.field(default=default, metadata=inherited.metadata)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line that points at ``--help``, not the whole usage block first
    (with some forty flags, that block buried the message)."""

    def __init__(self, *args, **kwargs):
        self.option_names: list[str] = []  # before argparse's own __init__, which adds --help
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every option)\n")

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.option_names.extend(action.option_strings)
        return action

    def parse_args_with_texts(self, argv: list[str]) -> argparse.Namespace:
        """``parse_args`` for a command whose positionals are free texts: one that argparse would take for an unknown
        option (``-bad``) is an error saying to put it after ``--`` (argparse said that the texts were missing)."""
        for item in argv[: argv.index("--")] if "--" in argv else argv:
            name = item.split("=", 1)[0]
            if (item.startswith("-") and len(item) > 1 and not any(c.isspace() for c in item)
                    and not re.fullmatch(r"-\d+|-\d*\.\d+", item)  # argparse's own test for a negative number
                    and not any(option.startswith(name) for option in self.option_names)):  # fmt: skip
                self.error(f"{item!r} is no option of this command; a text starting with '-' goes after --, as in "
                           f"{self.prog} ... -- {item!r}")
        return self.parse_args(argv)


def os_error_message(error: OSError, fix: str) -> str:
    """The one ``error:`` line for an ``OSError`` met outside a command's own checks (a full disk, a read-only
    folder), naming its file where it has one, then ``fix``."""
    where = f": {error.filename}" if error.filename else ""
    return f"error: {error.strerror or error}{where}; {fix}"


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
