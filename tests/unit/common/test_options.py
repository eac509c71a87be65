"""strata_common.options: flags, environment variables, parsing and errors derived from fields."""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from strata_common.endpoints import parse_endpoint
from strata_common.options import (
    add_options,
    comma_separated,
    from_cli,
    from_namespace,
    group,
    option,
    parse_bool,
)
from strata_common.units import parse_duration, parse_size


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True, slots=True)
class Inner:
    port: int | None = option(None, help="port (none = off)")
    token: str = field(default="", repr=False)
    """Not an option: keeps its default."""


@dataclass(frozen=True, slots=True)
class Sample:
    model_dir: Path = option(help="model directory")
    timeout_s: float = option(30.0, parse=parse_duration, help="deadline")
    cache_bytes: int = option(1024, parse=parse_size, help="cache size")
    count: int = option(1, help="how many")
    ratio: float = option(0.5, help="a fraction")
    name: str = option("x", help="a name", flag="served-name")
    profile: bool = option(True, help="profile workers", negative_flag="no-profile")
    color: Color = option(Color.RED, help="a colour")
    peers: tuple[str, ...] = option(
        (),
        help="peers",
        flag="peer",
        repeat=True,
        parse=comma_separated(lambda t: str(parse_endpoint(t))),
    )
    cpus: tuple[int, ...] | None = option(None, help="cores")
    slo_s: float | None = option(None, parse=parse_duration, help="an SLO")
    inner: Inner = group(Inner, title="inner things", prefix="inner-", default=Inner(port=5))

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


def test_defaults_and_required(tmp_path: Path) -> None:
    config = from_cli(Sample, ["--model-dir", str(tmp_path)], environ={})
    assert config == Sample(model_dir=tmp_path, inner=Inner(port=5))
    assert config.timeout_s == 30.0 and config.peers == () and config.cpus is None


def test_every_kind_of_value(tmp_path: Path) -> None:
    argv = [
        "--model-dir", str(tmp_path),
        "--timeout", "250ms",
        "--cache", "4KiB",
        "--count", "3",
        "--ratio", "0.25",
        "--served-name", "tiny",
        "--profile", "false",
        "--color", "blue",
        "--peer", "a:1,b:2",
        "--peer", "[::1]:3",
        "--cpus", "0,2",
        "--slo", "1s",
        "--inner-port", "none",
    ]  # fmt: skip
    config = from_cli(Sample, argv, environ={})
    assert config == Sample(
        model_dir=tmp_path,
        timeout_s=0.25,
        cache_bytes=4096,
        count=3,
        ratio=0.25,
        name="tiny",
        profile=False,
        color=Color.BLUE,
        peers=("a:1", "b:2", "[::1]:3"),
        cpus=(0, 2),
        slo_s=1.0,
        inner=Inner(port=None),
    )


def test_negative_flag_and_empty_optional(tmp_path: Path) -> None:
    config = from_cli(
        Sample, ["--model-dir", str(tmp_path), "--no-profile", "--slo", ""], environ={}
    )
    assert config.profile is False and config.slo_s is None


def test_environment_below_command_line(tmp_path: Path) -> None:
    env = {
        "T_MODEL_DIR": str(tmp_path),
        "T_COUNT": "7",
        "T_PEER": "a:1,b:2",
        "T_INNER_PORT": "9",
        "T_PROFILE": "off",
    }
    config = from_cli(Sample, ["--count", "8"], env_prefix="T_", environ=env)
    assert config.model_dir == tmp_path
    assert config.count == 8
    assert config.peers == ("a:1", "b:2")
    assert config.inner.port == 9
    assert config.profile is False
    # A repeatable flag on the command line replaces the environment's list.
    config = from_cli(Sample, ["--peer", "c:3"], env_prefix="T_", environ=env)
    assert config.peers == ("c:3",)


def test_no_env_prefix_reads_no_environment(tmp_path: Path) -> None:
    config = from_cli(Sample, ["--model-dir", str(tmp_path)], environ={"COUNT": "5"})
    assert config.count == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--timeout", "soon"], "--timeout: not a duration: 'soon'"),
        (["--count", "many"], "--count: expected an integer, got 'many'"),
        (["--ratio", "half"], "--ratio: expected a number, got 'half'"),
        (["--profile", "maybe"], "--profile: expected true or false, got 'maybe'"),
        (["--color", "green"], "--color: expected one of red, blue, got 'green'"),
        (["--peer", "nohost"], "--peer: endpoint must be HOST:PORT"),
        (["--cache", "1.5"], "--cache: size '1.5' is not a whole number of bytes"),
        (["--count", "-1"], "count must be >= 0"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        from_cli(Sample, ["--model-dir", str(tmp_path), *flags], environ={}, prog="t")
    assert exc.value.code == 2
    assert f"t: error: {message}" in capsys.readouterr().err


def test_missing_required_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        from_cli(Sample, [], environ={}, prog="t")
    assert exc.value.code == 2
    assert "the following arguments are required: --model-dir" in capsys.readouterr().err


def test_help_shows_defaults_environment_and_groups() -> None:
    parser = argparse.ArgumentParser(prog="t")
    add_options(parser, Sample, env_prefix="T_", environ={})
    text = " ".join(parser.format_help().split())
    assert "--timeout DURATION deadline (default 30s; env T_TIMEOUT)" in text
    assert '--peer PEER peers (default ""; env T_PEER; repeatable)' in text
    assert "--no-profile same as --profile false" in text
    assert "--profile {true,false} profile workers" in text
    assert "--cache SIZE cache size" in text
    assert "--color {red,blue} a colour (default red; env T_COLOR)" in text
    assert "inner things: --inner-port N port (none = off) (default 5; env T_INNER_PORT)" in text
    assert "--token" not in text and "--inner-token" not in text


def test_from_namespace_is_the_same_without_exit(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, Sample, environ={})
    ns = parser.parse_args(["--model-dir", str(tmp_path), "--count", "x"])
    with pytest.raises(ValueError, match=r"^--count: expected an integer, got 'x'$"):
        from_namespace(Sample, ns)


def test_declaration_errors() -> None:
    @dataclass(frozen=True)
    class BadRepeat:
        x: int = option(0, help="x", repeat=True)

    @dataclass(frozen=True)
    class NoParser:
        x: complex = option(0j, help="x")

    @dataclass(frozen=True)
    class Twice:
        a: int = option(0, help="a", flag="x")
        b: int = option(0, help="b", flag="x")

    for cls, match in (
        (BadRepeat, "repeat=True needs a tuple"),
        (NoParser, "no parser for type"),
        (Twice, "flag --x declared twice"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            add_options(argparse.ArgumentParser(), cls, environ={})
    with pytest.raises(TypeError, match="immutable"):
        option([], help="x")


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("Yes", True), ("1", True), ("on", True), ("false", False), (" OFF ", False)],
)
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value


def test_comma_separated() -> None:
    parse = comma_separated(int)
    assert parse("1, 2,,3 ") == (1, 2, 3)
    assert parse("") == ()


def test_replace_nested_changes_one_field_of_a_group(tmp_path: Path) -> None:
    from strata_common.options import replace_nested

    base = Sample(model_dir=tmp_path, inner=Inner(port=5, token="t"))
    changed = replace_nested(base, count=2, inner={"port": 6})
    assert changed == Sample(model_dir=tmp_path, count=2, inner=Inner(port=6, token="t"))
    assert replace_nested(base, inner=Inner()).inner == Inner()
    with pytest.raises(ValueError, match="count must be >= 0"):
        replace_nested(base, count=-1)


def test_an_empty_variable_does_not_stand_in_for_a_required_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        from_cli(Sample, [], env_prefix="T_", environ={"T_MODEL_DIR": ""})
    assert excinfo.value.code == 2
    assert "--model-dir" in capsys.readouterr().err


def test_a_bad_environment_value_names_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        from_cli(Sample, ["--model-dir", "m"], env_prefix="T_", environ={"T_PROFILE": "maybe"})
    assert excinfo.value.code == 2
    assert "--profile (from $T_PROFILE): expected true or false" in capsys.readouterr().err
    config = from_cli(Sample, ["--model-dir", "m"], env_prefix="T_", environ={"T_COUNT": "3"})
    assert config.count == 3


@dataclass(frozen=True, slots=True)
class Percent:
    full: bool = option(True, help="100% of it", negative_flag="partial", negative_help="50% of it")


def test_percent_signs_in_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        from_cli(Percent, ["--help"], environ={})
    out = capsys.readouterr().out
    assert "100% of it" in out
    assert "50% of it" in out
