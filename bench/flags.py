"""argparse types shared by the CLI and the benchmarks: each refuses bad input with a message
that names the value and what it must be."""
from __future__ import annotations

import argparse

from fogsplit.core.mqtt import parse_broker_url
from fogsplit.core.topics import check_name


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
    try:
        parse_broker_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
