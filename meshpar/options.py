"""Options written once: each feature declares its options as a small dataclass of
`option(...)` fields beside its code; the command-line flags, their help, the TOML keys,
the Python API's keywords and the checks of type, choice and range all come from them.

    @dataclass
    class ZeroOptions(Section):
        "ZeRO: optimizer states, gradients and parameters sharded over dp."
        stage: int = option(0, "0 replicated, 1 optimizer states sharded, ...", flag="--zero",
                            choices=(0, 1, 2, 3))

        def problems(self, cfg) -> list[str]:   # the rules that involve other options
            ...

A field's flag is `--field-name` unless `flag=` names another; its keyword in
`meshpar.parallelize` is the flag without dashes (`zero=`); its TOML key is the field's
name in the section's table (`[zero] stage = 1`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

if TYPE_CHECKING:
    from meshpar.config import Config

_MISSING = dataclasses.MISSING


class Section:
    """A feature's options: a dataclass of `option(...)` fields, and its rules."""

    def problems(self, cfg: Config) -> list[str]:
        """What keeps these options from running with the rest of `cfg`, as messages
        naming the valid choices; empty when nothing does. Each option's own checks
        (type, choice, range) come from its `option(...)` and run first."""
        return []


def option(default: Any, help: str, *, flag: str | None = None, choices: Iterable | None = None,
           at_least: float | None = None, positive: bool = False,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that is one option: `help` says what it means (its default
    and, from `choices` or a Literal type, its valid values are added where shown);
    `at_least` / `positive` bound a number; `parse` reads the flag's text."""
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None,
                "at_least": at_least, "positive": positive, "parse": parse}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Option:
    """One field of an options dataclass, with everything said about it."""

    section: str  # the attribute of Config (and the TOML table) that holds it
    name: str  # the field's name (and TOML key)
    hint: Any  # its type
    default: Any
    help: str
    flag: str
    choices: tuple | None
    at_least: float | None
    positive: bool
    parse: Callable[[str], Any] | None

    @property
    def keyword(self) -> str:
        """The name `meshpar.parallelize` takes it by: the flag without dashes."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def is_bool(self) -> bool:
        return bool in _members(self.hint)

    def valid_values(self) -> tuple | None:
        if self.choices is not None:
            return self.choices
        literal = [m for m in _members(self.hint) if typing.get_origin(m) is Literal]
        return typing.get_args(literal[0]) if literal else None

    def type_problem(self, value: Any) -> list[str]:
        if _matches(value, self.hint):
            return []
        return [f"{self.section}.{self.name}={value!r} must be of type {_type_text(self.hint)}"]

    def value_problems(self, value: Any) -> list[str]:
        """What is wrong with `value` (of the right type) for this option alone: a
        choice it does not offer, a number out of range."""
        valid = self.valid_values()
        if valid is not None and isinstance(value, (str, int)) and not isinstance(value, bool) and value not in valid:
            return [f"{self.flag} {value!r}: choose one of {', '.join(map(str, valid))}"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.at_least is not None and value < self.at_least:
                return [f"{self.flag}={value} must be at least {self.at_least:g}"]
            if self.positive and value <= 0:
                return [f"{self.flag}={value} must be positive"]
        return []

    def add_to(self, group) -> None:
        """This option as a flag of an argparse group; unset flags stay None, so a TOML
        file's value (or the dataclass default) stands."""
        text = self.help
        valid = self.valid_values()
        if valid is not None and self.parse is None:
            text += f"; one of {', '.join(map(str, valid))}"
        if not (self.default is None or self.default is False or self.default == []):
            text += f" (default {_shown(self.default)})"
        text = text.replace("%", "%%")
        if self.is_bool:
            group.add_argument(self.flag, dest=self.keyword, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            kind = [m for m in _members(self.hint) if m is not type(None)][0]
            group.add_argument(self.flag, dest=self.keyword, type=self.parse or _parser(self.hint), default=None,
                               help=text, metavar={int: "N", float: "X"}.get(kind, self.keyword.upper()))


@functools.cache
def options_of(section: str, cls: type) -> tuple[Option, ...]:
    """The options `cls` declares, as section `section` of a Config (read once per class:
    the type hints are evaluated from their text)."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        default = f.default if f.default is not _MISSING else f.default_factory()
        found.append(Option(section, f.name, hints[f.name], default, meta["help"],
                            meta["flag"] or "--" + f.name.replace("_", "-"), meta["choices"], meta["at_least"],
                            meta["positive"], meta["parse"]))
    return tuple(found)


def comma_list(item: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """A flag's parser for 'a,b,c' lists; `what` names the items in its error."""
    def parse(text: str) -> list:
        try:
            return [item(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
    return parse


def _members(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _matches(value, hint) -> bool:
    for member in _members(hint):
        origin = typing.get_origin(member)
        if member is type(None) and value is None:
            return True
        if origin is Literal and any(type(value) is type(choice) for choice in typing.get_args(member)):
            return True  # of the right type; value_problems() says whether it is a valid choice
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(member)
            if all(_matches(v, item) for v in value):
                return True
        if member is bool and isinstance(value, bool):
            return True
        if member in (int, str) and isinstance(value, member) and not isinstance(value, bool):
            return True
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
    return False


def _type_text(hint) -> str:
    names = []
    for member in _members(hint):
        if member is type(None):
            names.append("None")
        elif typing.get_origin(member) is Literal:
            names.append("str")
        elif typing.get_origin(member) is list:
            names.append(f"list of {typing.get_args(member)[0].__name__}")
        else:
            names.append(member.__name__)
    return " or ".join(names)


def _parser(hint) -> Callable[[str], Any]:
    members = [m for m in _members(hint) if m is not type(None)]
    member = members[0]
    if typing.get_origin(member) is list:
        item = typing.get_args(member)[0]
        return comma_list(item, {int: "integers", str: "names"}.get(item, item.__name__))
    if typing.get_origin(member) is Literal:
        return str
    return member


def _shown(value) -> str:
    if value is True:
        return "on"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)
