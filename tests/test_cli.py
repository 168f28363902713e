"""Tests for lstm_jax.cli: flags generated from config dataclasses, and which flags were given."""

import argparse
import dataclasses

import pytest

from lstm_jax import cli
from lstm_jax.loop import LoopConfig
from lstm_jax.model import ModelConfig
from lstm_jax.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class Small:
    """Small settings for the tests."""

    count: int = dataclasses.field(default=3, metadata={"help": "how many"})
    rate: float = dataclasses.field(default=0.5, metadata={"help": "a rate"})
    name: str = dataclasses.field(default="abc", metadata={"help": "a name"})
    flag: bool = dataclasses.field(default=True, metadata={"help": "a switch"})
    off: bool = dataclasses.field(default=False, metadata={"help": "another switch"})
    column: str | None = dataclasses.field(default=None, metadata={"help": "optional column"})
    two_words: int = 7


@dataclasses.dataclass(frozen=True)
class Other:
    """Another group."""

    seed: int = dataclasses.field(default=0, metadata={"help": "a seed"})


@dataclasses.dataclass(frozen=True)
class Clash:
    seed: int = 1
    count: int = 2


def parser_for(*classes) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prog")
    for cls in classes:
        cli.add_flags(parser, cls)
    return parser


def test_defaults_round_trip():
    parser = parser_for(Small, Other)
    args = parser.parse_args([])
    assert cli.from_args(Small, args) == Small()
    assert cli.from_args(Other, args) == Other()


def test_every_kind_of_field_is_parsed_to_its_type():
    argv = ["--count", "5", "--rate=1", "--name", "x_y", "--no-flag", "--off", "--column", "text",
            "--two-words", "-9", "--seed", "4"]  # fmt: skip
    args = parser_for(Small, Other).parse_args(argv)
    small = cli.from_args(Small, args)
    assert small == Small(count=5, rate=1.0, name="x_y", flag=False, off=True, column="text", two_words=-9)
    assert type(small.count) is int and type(small.rate) is float and type(small.column) is str
    assert cli.from_args(Other, args) == Other(seed=4)
    assert cli.from_args(Small, parser_for(Small).parse_args(["--flag", "--no-off"])) == Small(flag=True, off=False)


@pytest.mark.parametrize("argv", [["--count", "2.5"], ["--rate", "fast"], ["--flag", "yes"], ["--count"]])
def test_bad_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit):
        parser_for(Small).parse_args(argv)
    assert "error:" in capsys.readouterr().err


def test_help_shows_the_group_the_help_text_and_the_default():
    text = " ".join(parser_for(Small).format_help().split())  # undo argparse's line wrapping
    assert "Small: Small settings for the tests." in text
    assert "--count INT how many (default: 3)" in text
    assert "--rate FLOAT a rate (default: 0.5)" in text
    assert "--name STR a name (default: 'abc')" in text
    assert "--flag, --no-flag a switch (default: True)" in text
    assert "--column STR optional column (default: None)" in text
    assert "--two-words INT (default: 7)" in text
    assert text.count("(default: True)") == 1  # argparse's own default note is not added a second time


def test_help_text_with_a_percent_sign():
    @dataclasses.dataclass(frozen=True)
    class Percent:
        val_fraction: float = dataclasses.field(default=0.1, metadata={"help": "carve 10% of train out"})

    assert "carve 10% of train out" in parser_for(Percent).format_help()


def test_library_configs_round_trip_through_flags():
    classes = (ModelConfig, OptimConfig, LoopConfig)
    cli.check_unique_flags(*classes)
    parser = parser_for(*classes)
    args = parser.parse_args([])
    for cls in classes:
        assert cli.from_args(cls, args) == cls()
    args = parser.parse_args(
        ["--cell", "gru", "--no-bidirectional", "--schedule", "linear", "--ema-decay", "0.99", "--keep", "1"]
    )
    assert cli.from_args(ModelConfig, args) == ModelConfig(cell="gru", bidirectional=False)
    assert cli.from_args(OptimConfig, args) == OptimConfig(schedule="linear", ema_decay=0.99)
    assert cli.from_args(LoopConfig, args) == LoopConfig(keep=1)


def test_invalid_choice_is_rejected_when_the_config_is_built():
    args = parser_for(ModelConfig).parse_args(["--pooling", "min"])
    with pytest.raises(ValueError, match="unknown pooling"):
        cli.from_args(ModelConfig, args)


@pytest.mark.parametrize(
    "argv,expected",
    [
        ([], set()),
        (["--count", "3"], {"count"}),  # explicit even when equal to the default
        (["--no-flag"], {"flag"}),
        (["--flag"], {"flag"}),
        (["--rate=3", "--two-words=1"], {"rate", "two_words"}),
        (["--count", "5", "--no-off", "--column", "c", "--seed", "2"], {"count", "off", "column", "seed"}),
    ],
)
def test_explicit_flags_are_exactly_the_flags_given(argv, expected):
    parser = parser_for(Small, Other)
    parser.parse_args(argv)  # the real parser accepts it
    assert cli.explicit_flags(parser, argv) == expected


def test_explicit_flags_follows_abbreviations_like_the_parser():
    parser = parser_for(Small)
    args = parser.parse_args(["--cou", "8"])
    assert args.count == 8
    assert cli.explicit_flags(parser, ["--cou", "8"]) == {"count"}


def test_check_unique_flags():
    cli.check_unique_flags(Small, Other)
    with pytest.raises(ValueError, match=r"\['count', 'seed'\]"):
        cli.check_unique_flags(Small, Other, Clash)


def test_ranges_hold_their_bounds_and_say_them():
    assert 0 in cli.RATE and 0.999 in cli.RATE and 1 not in cli.RATE and -0.1 not in cli.RATE
    assert 1 in cli.FRACTION and 0 in cli.FRACTION and 1.01 not in cli.FRACTION
    assert 0 not in cli.POSITIVE and 1e-9 in cli.POSITIVE and 0 in cli.AT_LEAST_0 and 0 not in cli.AT_LEAST_1
    assert [str(r) for r in (cli.RATE, cli.FRACTION, cli.POSITIVE, cli.AT_LEAST_1, cli.Range(0, 1, low_open=True))] == [
        "in [0, 1)", "in [0, 1]", "> 0", ">= 1", "in (0, 1)"]  # fmt: skip


def test_every_numeric_setting_of_the_experiments_has_a_range_its_default_is_in():
    """A new numeric flag without a range would take any value silently."""
    from experiments import memory, sentiment

    classes = {*sentiment.CONFIG_CLASSES, *memory.RUN_CLASSES}
    numeric = [(cls, field) for cls in classes for field in dataclasses.fields(cls)
               if cli._flag_type(field) in (int, float)]  # fmt: skip
    assert len(numeric) > 40
    assert [f"{cls.__name__}.{field.name}" for cls, field in numeric if "range" not in field.metadata] == []
    assert all(field.default in field.metadata["range"] for _, field in numeric)


def test_a_config_out_of_range_names_every_bad_field_in_one_line():
    with pytest.raises(ValueError, match=r"^--num-layers must be >= 1, got 0; --input-dropout must be in \[0, 1\), got 1.5$"):
        ModelConfig(input_dropout=1.5, num_layers=0)
    with pytest.raises(ValueError, match=r"^--learning-rate must be > 0, got -0.01$"):
        OptimConfig(learning_rate=-0.01)
    with pytest.raises(ValueError, match=r"^--keep must be >= 1, got 0$"):
        LoopConfig(keep=0)


def test_a_usage_error_is_one_line_that_points_at_help(capsys):
    parser = cli.Parser(prog="prog")
    cli.add_flags(parser, Small)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--count", "x"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "prog: error: argument --count: invalid int value: 'x' (prog --help lists every option)"]  # fmt: skip
