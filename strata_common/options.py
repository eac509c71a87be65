"""One configuration machinery: frozen dataclasses whose fields declare their own CLI flags.

A component's config is a frozen dataclass validated in ``__post_init__``. A field that is also a
command-line option says so with :func:`option` (its help, and, where the derived ones do not fit,
its flag or its parser); a field holding another config dataclass is an argument group, declared
with :func:`group`. From those fields alone, :func:`add_options` declares the argparse flags and
their ``PREFIX_*`` environment variables, and :func:`from_namespace` builds the dataclass back::

    @dataclass(frozen=True, slots=True)
    class HttpConfig:
        port: int = option(8000, help="HTTP port (0 = any free port)")
        request_timeout_s: float = option(600.0, help="deadline of a whole request")

    config = from_cli(HttpConfig, ["--request-timeout", "30s"], env_prefix="STRATA_HTTP_")

Derived names: a field ``request_timeout_s`` is the flag ``--request-timeout`` (underscores become
dashes and a unit suffix, ``_s`` or ``_bytes``, is dropped: the value carries its unit, "30s",
"2GiB") and the environment variable ``STRATA_HTTP_REQUEST_TIMEOUT``. A group's ``prefix`` goes in
front of its fields' derived flags (``admin-`` + ``port`` = ``--admin-port``); an explicit ``flag``
is relative to the group's prefix as well, unless it starts with ``--`` (then it is the whole
flag). The command line wins over the environment, the environment over the field's default.

Values are parsed by the field's type unless ``parse`` is given: ``bool`` takes true/false (also
1/0, yes/no, on/off; ``negative_flag`` adds a ``--no-X`` shorthand for false); ``int``, ``float``,
``str``, :class:`pathlib.Path` and :class:`enum.Enum` (by value) as themselves; ``X | None`` takes
``""`` or ``none`` as None; ``tuple[X, ...]`` takes a comma-separated list (a ``parse`` given for
a tuple field turns one value's whole text into a tuple), and with ``repeat`` the flag may also be
given several times, the tuples joined (``--peer a:1 --peer b:2`` = ``--peer a:1,b:2``). Sizes
and durations: ``parse=parse_size`` / ``parse=parse_duration`` (:mod:`strata_common.units`).

A bad value exits through ``parser.error("--flag: message")`` (status 2), as does a value that the
dataclass's ``__post_init__`` refuses (``ValueError``). Fields without :func:`option` are not on
the command line: they keep their defaults (a component sets them from what it learns at run time).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from strata_common.secrets import has_password
from strata_common.units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "Option",
    "OptionGroup",
    "add_options",
    "comma_separated",
    "from_cli",
    "from_namespace",
    "group",
    "option",
    "parse_bool",
    "parse_into",
    "replace_nested",
]

T = TypeVar("T")

_OPTION_KEY = "strata_common.option"
_GROUP_KEY = "strata_common.group"
_UNIT_SUFFIXES = ("_s", "_bytes")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none")


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """What :func:`option` records in a field's metadata."""

    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    env: bool = True
    negative_flag: str | None = None
    negative_help: str | None = None
    repeat: bool = False
    metavar: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class OptionGroup:
    """What :func:`group` records in a field's metadata."""

    cls: type[Any]
    title: str
    prefix: str = ""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    env: bool = True,
    negative_flag: str | None = None,
    negative_help: str | None = None,
    repeat: bool = False,
    metavar: str | None = None,
    repr: bool = True,
) -> Any:  # Any: what a dataclass field specifier must be typed as
    """A dataclass field that is also a command-line option (no ``default``: a required one).

    ``flag`` / ``negative_flag``: names without the leading dashes, relative to the group's prefix
    (a name starting with ``--`` is taken whole). ``parse``: text → value (a tuple, for a tuple
    field); it raises ``ValueError`` with a message. ``env=False``: no environment variable
    (e.g. for a secret, which belongs in a file). ``repeat``: a tuple field's flag may be given
    several times. ``repr=False`` keeps the value out of the dataclass's repr.
    """
    if isinstance(default, list | dict | set):
        raise TypeError("option defaults must be immutable (use a tuple)")
    spec = Option(help, flag, parse, env, negative_flag, negative_help, repeat, metavar)
    metadata = {_OPTION_KEY: spec}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, repr=repr)
    return dataclasses.field(default=default, metadata=metadata, repr=repr)


def group(cls: type[T], *, title: str, prefix: str = "", default: T | None = None) -> Any:
    """A field holding a nested config dataclass, shown as one argument group in ``--help``.

    ``default``: the group's default value (else ``cls()``); its fields are the flags' defaults.
    """
    factory: Callable[[], T] = cls if default is None else (lambda: default)
    return dataclasses.field(
        default_factory=factory, metadata={_GROUP_KEY: OptionGroup(cls, title, prefix)}
    )


def comma_separated(parse_one: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """A parser of ``"a,b,c"`` (blanks around items dropped, empty items skipped) into a tuple
    of ``parse_one(item)``: how a ``tuple[X, ...]`` option parses unless given ``parse``."""

    def parse(text: str) -> tuple[T, ...]:
        return tuple(parse_one(item.strip()) for item in text.split(",") if item.strip())

    return parse


def replace_nested(config: T, **changes: Any) -> T:
    """:func:`dataclasses.replace`, one level down for a group given as a dict:
    ``replace_nested(c, registry={"url": u})`` changes that field of the ``registry`` group and
    keeps the group's other values (a group given as an instance replaces the whole group)."""
    resolved = {
        name: dataclasses.replace(getattr(config, name), **value)
        if isinstance(value, dict)
        else value
        for name, value in changes.items()
    }
    return dataclasses.replace(config, **resolved)  # type: ignore[type-var]


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``, any case)."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# -- declaring -----------------------------------------------------------------------------------


class _Default:
    """An argparse default that is the field's own value (not text): it is not parsed again."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"_Default({self.value!r})"


class _FromEnv(str):
    """An option's value taken from its environment variable (named in errors)."""

    env: str

    def __new__(cls, value: str, env: str) -> _FromEnv:
        text = super().__new__(cls, value)
        text.env = env
        return text


class _Given(list[str]):
    """The values of a repeatable flag given on the command line (they replace the default)."""


class _RepeatAction(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, self.dest, None)
        if not isinstance(given, _Given):
            given = _Given()
        given.append(values)
        setattr(namespace, self.dest, given)


@dataclasses.dataclass(frozen=True, slots=True)
class _Leaf:
    """One option, resolved: where it lives in the nested dataclasses and how it parses."""

    path: tuple[str, ...]
    prefix: str
    flag: str
    spec: Option
    parse_one: Callable[[str], Any]
    optional: bool
    sequence: bool
    metavar: str

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    def parse(self, raw: str | list[str]) -> Any:
        texts = raw if isinstance(raw, list) else [raw]
        if self.optional and len(texts) == 1 and texts[0].strip().lower() in _NONE:
            return None
        if self.sequence:
            return tuple(item for text in texts for item in self.parse_one(text))
        return self.parse_one(texts[0])


def _flag_name(name: str, prefix: str, spec: Option) -> str:
    if spec.flag is not None:
        return spec.flag[2:] if spec.flag.startswith("--") else prefix + spec.flag
    for suffix in _UNIT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return prefix + name.replace("_", "-")


def _type_parser(hint: Any, where: str) -> Callable[[str], Any]:
    if hint is bool:
        return parse_bool
    if hint is int:
        return _parse_int
    if hint is float:
        return _parse_float
    if hint is str:
        return str
    if hint is Path:
        return Path
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_parser(hint)
    raise TypeError(f"{where}: no parser for type {hint!r}; give option(parse=...)")


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _enum_parser(cls: type[enum.Enum]) -> Callable[[str], Any]:
    def parse(text: str) -> enum.Enum:
        try:
            return cls(text.strip())
        except ValueError:
            choices = ", ".join(str(member.value) for member in cls)
            raise ValueError(f"expected one of {choices}, got {text!r}") from None

    return parse


def _metavar(hint: Any, parse: Callable[[str], Any] | None, flag: str) -> str:
    """What ``--help`` shows for the value: its unit or type, else the flag's last word."""
    if parse is parse_duration:
        return "DURATION"
    if parse is parse_size:
        return "SIZE"
    if parse is None:
        if hint is bool:
            return "{true,false}"
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return "{" + ",".join(str(member.value) for member in hint) + "}"
        if hint is int:
            return "N"
        if hint is Path:
            return "PATH"
    return flag.rpartition("-")[2].upper()


def _unwrap(hint: Any) -> tuple[Any, bool, bool]:
    """``X | None`` → (X, optional); ``tuple[X, ...]`` → (X, sequence)."""
    optional = sequence = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"unsupported option type {hint!r}")
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if len(items) != 2 or items[1] is not Ellipsis:
            raise TypeError(f"tuple options must be tuple[X, ...], got {hint!r}")
        hint, sequence = items[0], True
    return hint, optional, sequence


def _leaves(
    cls: type[Any], prefix: str = "", path: tuple[str, ...] = ()
) -> list[tuple[_Leaf, dataclasses.Field[Any]] | tuple[OptionGroup, tuple[str, ...]]]:
    """The options of ``cls`` and of its groups, in field order (groups as markers)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    out: list[tuple[_Leaf, dataclasses.Field[Any]] | tuple[OptionGroup, tuple[str, ...]]] = []
    for f in dataclasses.fields(cls):
        if _GROUP_KEY in f.metadata:
            sub: OptionGroup = f.metadata[_GROUP_KEY]
            out.append((sub, (*path, f.name)))
            out += _leaves(sub.cls, prefix + sub.prefix, (*path, f.name))
        elif _OPTION_KEY in f.metadata:
            spec: Option = f.metadata[_OPTION_KEY]
            where = f"{cls.__name__}.{f.name}"
            hint, optional, sequence = _unwrap(hints[f.name])
            if spec.repeat and not sequence:
                raise TypeError(f"{where}: repeat=True needs a tuple[X, ...] field")
            parse_one = spec.parse
            if parse_one is None:
                parse_one = _type_parser(hint, where)
                if sequence:
                    parse_one = comma_separated(parse_one)
            flag = _flag_name(f.name, prefix, spec)
            metavar = spec.metavar or _metavar(hint, spec.parse, flag)
            leaf = _Leaf(
                (*path, f.name), prefix, flag, spec, parse_one, optional, sequence, metavar
            )
            out.append((leaf, f))
    return out


def _default_text(value: Any, parse: Callable[[str], Any] | None = None) -> str:
    if parse is parse_duration and isinstance(value, int | float) and not isinstance(value, bool):
        return format_duration(value)
    if parse is parse_size and isinstance(value, int) and not isinstance(value, bool):
        return format_size(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(_default_text(item, parse) for item in value) or '""'
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return '""'
    return str(value)


def _defaults_of(cls: type[Any]) -> dict[tuple[str, ...], Any]:
    """Each option's default, by path; a group's default instance supplies its fields'."""
    defaults: dict[tuple[str, ...], Any] = {}

    def visit(klass: type[Any], instance: Any, path: tuple[str, ...]) -> None:
        for f in dataclasses.fields(klass):
            if instance is not None:
                value = getattr(instance, f.name)
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = dataclasses.MISSING
            if _GROUP_KEY in f.metadata:
                visit(f.metadata[_GROUP_KEY].cls, value, (*path, f.name))
            elif _OPTION_KEY in f.metadata:
                defaults[(*path, f.name)] = value

    visit(cls, None, ())
    return defaults


def add_options(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    *,
    env_prefix: str = "",
    environ: Mapping[str, str] | None = None,
) -> None:
    """Declare the flags of ``cls``'s options (and its groups'), with ``env_prefix`` variables.

    ``env_prefix=""``: no environment variables. ``environ``: defaults to ``os.environ``.
    """
    env = os.environ if environ is None else environ
    defaults = _defaults_of(cls)
    target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
    seen: set[str] = set()
    for item, _field in _leaves(cls):
        if isinstance(item, OptionGroup):
            target = parser.add_argument_group(item.title)
            continue
        leaf = item
        spec = leaf.spec
        default = defaults[leaf.path]
        env_name = env_prefix + leaf.flag.upper().replace("-", "_") if env_prefix else ""
        env_value = env.get(env_name) if env_name and spec.env else None
        if env_value is not None and not env_value.strip() and default is dataclasses.MISSING:
            env_value = None  # an empty variable does not stand in for a required option
        help_text = spec.help
        notes = []
        if default is not dataclasses.MISSING:
            notes.append(f"default {_default_text(default, spec.parse)}")
        if env_name and spec.env:
            notes.append(f"env {env_name}")
        if spec.repeat:
            notes.append("repeatable")
        if notes:
            help_text = f"{help_text} ({'; '.join(notes)})"
        help_text = help_text.replace("%", "%%")
        required = default is dataclasses.MISSING and env_value is None
        initial: Any = _FromEnv(env_value, env_name) if env_value is not None else _Default(default)
        negative = None
        if spec.negative_flag is not None:
            negative = _flag_name("", leaf.prefix, Option("", flag=spec.negative_flag))
        for name in (leaf.flag, negative):
            if name is not None and name in seen:
                raise ValueError(f"flag --{name} declared twice")
            seen.add(name or leaf.flag)
        action: Any = _RepeatAction if spec.repeat else "store"
        target.add_argument(
            f"--{leaf.flag}",
            dest=leaf.dest,
            action=action,
            default=initial,
            required=required,
            metavar=leaf.metavar,
            help=help_text,
        )
        if negative is not None:
            target.add_argument(
                f"--{negative}",
                dest=leaf.dest,
                action="store_const",
                const="false",
                help=(spec.negative_help or f"same as --{leaf.flag} false").replace("%", "%%"),
            )


class _ParseError(Exception):
    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"--{flag}: {message}")


def _build(cls: type[T], ns: argparse.Namespace, path: tuple[str, ...], leaves: Any) -> T:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        here = (*path, f.name)
        if _GROUP_KEY in f.metadata:
            values[f.name] = _build(f.metadata[_GROUP_KEY].cls, ns, here, leaves)
        elif _OPTION_KEY in f.metadata:
            leaf: _Leaf = leaves[here]
            raw = getattr(ns, leaf.dest)
            if isinstance(raw, _Default):
                values[f.name] = raw.value
                continue
            if not isinstance(raw, _FromEnv) and any(
                has_password(text) for text in (raw if isinstance(raw, list) else [raw])
            ):
                raise _ParseError(
                    leaf.flag,
                    "a password on the command line is readable by every local user "
                    "(/proc/PID/cmdline): give this value in the option's environment variable "
                    "(see --help) instead",
                )
            try:
                values[f.name] = leaf.parse(raw)
            except ValueError as exc:
                where = f"{leaf.flag} (from ${raw.env})" if isinstance(raw, _FromEnv) else leaf.flag
                raise _ParseError(where, str(exc)) from None
    try:
        return cls(**values)
    except ValueError as exc:
        raise _ParseError("", str(exc)) from None


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """Build ``cls`` from what :func:`add_options` declared; raises ``ValueError`` whose message
    starts with ``--flag:`` for a value that does not parse, or the dataclass's own message."""
    leaves = {item.path: item for item, _ in _leaves(cls) if isinstance(item, _Leaf)}
    try:
        return _build(cls, ns, (), leaves)
    except _ParseError as exc:
        message = str(exc)
        raise ValueError(message[4:] if message.startswith("--: ") else message) from None


def from_cli(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    env_prefix: str = "",
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> T:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into ``cls``; a bad value exits with status 2."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(parser, cls, env_prefix=env_prefix, environ=environ)
    return parse_into(parser, cls, argv)


def parse_into(
    parser: argparse.ArgumentParser, cls: type[T], argv: Sequence[str] | None = None
) -> T:
    """``parser.parse_args(argv)`` then :func:`from_namespace`, a ValueError going to
    ``parser.error`` (exit status 2)."""
    ns = parser.parse_args(argv)
    try:
        return from_namespace(cls, ns)
    except ValueError as exc:
        parser.error(str(exc))
