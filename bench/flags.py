"""argparse types shared by the CLI and the benchmarks: each refuses bad input with a message
that names the value and what it must be."""
from __future__ import annotations

import argparse
from typing import Any, Callable

import msgspec

from fogsplit.core.errors import ConfigError
from fogsplit.core.settings import BrokerSettings
from fogsplit.core.topics import check_name
from fogsplit.core.validation import check_field, field_type, table_of


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    return parse


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def fraction(text: str) -> float:
    """A compression rate: a number strictly between 0 and 1 (0.8 removes 80%)."""
    value = number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction between 0 and 1 (exclusive), e.g. 0.8")
    return value


def unit_interval(text: str) -> float:
    """An exit threshold: a number in [0, 1]."""
    value = number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1]")
    return value


def name(text: str) -> str:
    try:
        return check_name("the", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def broker_url(text: str) -> str:
    """An MQTT URL without user or password (those come from settings and the environment)."""
    return setting(BrokerSettings, "url")(text)


def setting(model: type, key: str, parse: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """The argparse type of a flag bound to the setting ``key`` (dotted) of ``model``: ``parse``
    reads the text, then the model's own bounds and checks judge it, so that they live in one
    place and the refusal still names the flag."""
    *table_path, name = key.split(".")
    table = table_of(field_type(model, tuple(table_path))) if table_path else model

    def check(text: str) -> Any:
        try:
            value = parse(text)
        except argparse.ArgumentTypeError:
            raise
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_KINDS.get(parse, 'valid')}") from None
        try:
            if all(not f.required for f in msgspec.structs.fields(table)):
                table(**{name: value})      # the model's cross-field checks too
            else:
                check_field(table, name, value)
        except ConfigError as exc:
            problem = str(exc).split(": ", 1)[-1]
            raise argparse.ArgumentTypeError(f"{text!r}: {problem}") from None
        return value
    check.__name__ = parse.__name__     # argparse's "invalid <name> value" names the kind
    return check


_KINDS = {int: "an integer", float: "a number", str: "text"}
