"""The machinery under every model fogsplit reads (settings, the manifest): msgspec, strictly.

``msgspec.convert(..., strict=True)`` refuses a bool where a number is due and applies the
bounds declared with ``msgspec.Meta``; this module adds what msgspec leaves out: bounds checked
when code builds a model directly, unknown keys of dataclasses (msgspec ignores them), and
errors that read ``gateway.deadline_ms: expected a number > 0`` instead of msgspec's
``Expected `float` > 0.0 - at `$.gateway.deadline_ms```.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Annotated, Any, Iterator, NamedTuple, Union

import msgspec

from fogsplit.core.errors import ConfigError

MASK = "********"


class SettingsError(ConfigError, ValueError):
    """A value refused by a model. Also a ValueError, so that msgspec, converting a document,
    adds where in it the refused table is."""


class Secret:
    """A string that never prints: ``repr`` and ``str`` show a mask; ``reveal()`` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise SettingsError("a secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def setting(kind: Any, description: str, **bounds: Any) -> Any:
    """A field type with its description and bounds: ``setting(int, "threads", ge=1, le=64)``."""
    return Annotated[kind, msgspec.Meta(description=description, **bounds)]


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every settings model: its fields are checked when code builds one directly too
    (msgspec itself checks bounds only while converting), then :meth:`check` runs."""

    def __post_init__(self) -> None:
        for name, kind in _field_types(type(self)):
            value = getattr(self, name)
            if isinstance(value, (Settings, Secret)):
                continue
            table = table_of(kind)
            if table is not None and value is not None:
                raise SettingsError(f"{name}: expected {table.__name__}, got {type(value).__name__}")
            try:
                msgspec.convert(value, kind, strict=True)
            except msgspec.ValidationError as exc:
                raise SettingsError(f"{name}: {describe(str(exc), kind)}") from None
        self.check()

    def check(self) -> None:
        """Cross-field checks: raise :class:`SettingsError` naming the fields."""


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, Any], ...]:
    return tuple((f.name, f.type) for f in msgspec.structs.fields(cls))


def _dec_hook(kind: type, value: object) -> object:
    if kind is Secret and isinstance(value, (str, Secret)):
        return Secret(value) if isinstance(value, str) else value
    raise NotImplementedError


def convert(body: object, model: Any, *, strict: bool = True) -> Any:
    """``msgspec.convert`` with the hooks fogsplit's models need (secrets from strings)."""
    return msgspec.convert(body, model, strict=strict, dec_hook=_dec_hook)


def load(body: object, model: type, where: str, error: type[Exception] = ConfigError, *,
         top: str = "the top level", prefix: str = "") -> Any:
    """``body`` (JSON-like) as ``model``. Refused: unknown and missing keys (all named), then bad
    values (all named), then what the models' cross-field checks refuse; each with ``where``.
    ``top`` names the outermost table in messages, ``prefix`` is its path in a larger document."""
    problems = [p.text(top) for p in key_problems(body, model, prefix)] \
        or [str(p) for p in value_problems(body, model, prefix)]
    if problems:
        raise error(f"{where}: " + "; ".join(problems))
    try:
        return convert(body, model)
    except msgspec.ValidationError as exc:
        raise error(f"{where}: {explain(str(exc), model, prefix)}") from None


# -- keys --------------------------------------------------------------------------------------

class KeyProblem(NamedTuple):
    """Keys of one table that its model does not know (``unknown``) or needs (``missing``)."""

    kind: str
    table: str
    keys: list[str]

    def text(self, top: str = "the top level") -> str:
        return f"{self.kind} keys {self.keys} in {self.table or top}"

    def __str__(self) -> str:
        return self.text()


def key_problems(body: object, model: Any, path: str = "") -> Iterator[KeyProblem]:
    """The unknown and missing keys of every table of ``body`` that ``model`` (a Struct or a
    dataclass, possibly inside lists, dicts and optionals) describes. Values are not checked."""
    table = table_of(model)
    if table is not None:
        if not isinstance(body, dict):
            return
        fields = _fields(table)
        unknown = sorted(set(body) - set(fields))
        if unknown:
            yield KeyProblem("unknown", path, unknown)
        missing = sorted(name for name, (_, required) in fields.items() if required and name not in body)
        if missing:
            yield KeyProblem("missing", path, missing)
        for name, value in body.items():
            if name in fields:
                yield from key_problems(value, fields[name][0], _join(path, name))
        return
    kind = _strip(model)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, tuple) and isinstance(body, list) and args:
        for i, item in enumerate(body):
            yield from key_problems(item, args[0], f"{path}[{i}]")
    elif origin is dict and isinstance(body, dict) and len(args) == 2:
        for key, value in body.items():
            yield from key_problems(value, args[1], _join(path, str(key)))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _strip(kind: Any) -> Any:
    while typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    return kind


@functools.cache
def _fields(kind: type) -> dict[str, tuple[Any, bool]]:
    """name -> (type, required) of a Struct or dataclass."""
    if issubclass(kind, msgspec.Struct):
        return {f.name: (f.type, f.required) for f in msgspec.structs.fields(kind)}
    hints = typing.get_type_hints(kind, include_extras=True)
    return {f.name: (hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(kind) if f.init}


def field_type(model: type, path: tuple[str, ...]) -> Any | None:
    """The declared type at ``path`` in ``model`` (through nested tables), or None if no such key."""
    kind: Any = model
    for key in path:
        table = table_of(kind)
        if table is None or key not in _fields(table):
            return None
        kind = _fields(table)[key][0]
    return kind


def field_doc(model: type, key: str) -> tuple[str, object]:
    """The description and default of the setting ``key`` (dotted) of a Struct ``model``;
    the default is ``msgspec.NODEFAULT`` for a required key."""
    *table_path, name = key.split(".")
    table = table_of(field_type(model, tuple(table_path))) if table_path else model
    info = next(f for f in msgspec.structs.fields(table) if f.name == name)
    default = info.default_factory() if info.default_factory is not msgspec.NODEFAULT else info.default
    return _description(info.type), default


def _description(kind: Any) -> str:
    if typing.get_origin(kind) is Annotated:
        return next((m.description for m in typing.get_args(kind)[1:]
                     if isinstance(m, msgspec.Meta) and m.description), "")
    if typing.get_origin(kind) in (Union, types.UnionType):
        return next((d for d in map(_description, typing.get_args(kind)) if d), "")
    return ""


def table_of(kind: Any) -> type | None:
    """The Struct or dataclass a field's type is (``X``, ``X | None``, annotated), else None."""
    kind = _strip(kind)
    if typing.get_origin(kind) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = _strip(inner[0]) if len(inner) == 1 else None
    if isinstance(kind, type) and (issubclass(kind, msgspec.Struct) or dataclasses.is_dataclass(kind)):
        return kind
    return None


# -- values ----------------------------------------------------------------------------------

_NOT_SHOWN = object()


class ValueProblem(NamedTuple):
    """One refused value: where it is, what it was (masked if secret), what is wrong."""

    path: str
    value: object
    problem: str

    def __str__(self) -> str:
        if not self.path:
            return self.problem
        shown = "" if self.value is _NOT_SHOWN else f"={self.value!r}"
        return f"{self.path}{shown}: {self.problem}"


def value_problems(body: object, model: Any, path: str = "") -> Iterator[ValueProblem]:
    """Every value of ``body`` refused by the type of its own field (cross-field checks are
    not run), walking into tables, lists and dicts; unknown keys are skipped."""
    table = table_of(model)
    kind = _strip(model)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if table is not None and isinstance(body, dict):
        fields = _fields(table)
        for name, value in body.items():
            if name in fields:
                yield from value_problems(value, fields[name][0], _join(path, name))
    elif origin in (list, tuple) and isinstance(body, list) and args and (origin is list or args[-1] is ...):
        for i, item in enumerate(body):
            yield from value_problems(item, args[0], f"{path}[{i}]")
    elif origin is dict and isinstance(body, dict) and len(args) == 2:
        for key, value in body.items():
            yield from value_problems(value, args[1], _join(path, str(key)))
    else:
        try:
            convert(body, model)
        except msgspec.ValidationError as exc:
            text, _, inner = str(exc).partition(" - at `$")
            shown = MASK if _is_secret(model) else body
            yield ValueProblem(path + inner.rstrip("`"), _NOT_SHOWN if inner else shown, describe(text, model))


def check_field(model: type, name: str, value: object) -> None:
    """Refuse ``value`` for field ``name`` of ``model`` as loading a document would."""
    for problem in value_problems({name: value}, model):
        raise SettingsError(str(problem))


def _is_secret(kind: Any) -> bool:
    kind = _strip(kind)
    if typing.get_origin(kind) in (Union, types.UnionType):
        return any(_is_secret(a) for a in typing.get_args(kind))
    return kind is Secret


# -- messages ----------------------------------------------------------------------------------

_NAMES = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false",
          "object": "an object (table)", "array": "a list", "null": "nothing"}
_GOT = {**_NAMES, "bool": "a bool"}


def _names(match: re.Match, names: dict[str, str]) -> str:
    return " or ".join(names.get(part, part) for part in match.group(1).split(" | "))


def explain(message: str, model: Any = None, prefix: str = "") -> str:
    """A msgspec ValidationError message as ``key.path: problem`` or ``unknown key 'key.path'``."""
    text, _, at = message.partition(" - at `")
    path = at.rstrip("`").removeprefix("$").lstrip(".")
    for start, what in (("Object contains unknown field `", "unknown key"),
                        ("Object missing required field `", "missing key")):
        if text.startswith(start):
            return f"{what} {_join(_join(prefix, path), text.split('`')[1])!r}"
    kind = field_type(model, tuple(path.split("."))) if model is not None and path else None
    problem = describe(text, kind)
    path = _join(prefix, path)
    inner = re.match(r"([a-z_][a-z0-9_.]*): ", problem)   # a model's own check names its field
    if inner:
        path, problem = _join(path, inner.group(1)), problem[inner.end():]
    return f"{path}: {problem}" if path else problem


def describe(text: str, kind: Any = None) -> str:
    """msgspec's ``Expected `float` >= 1, got `str``` as ``expected a number >= 1, got a string``;
    a refused choice lists the choices."""
    choices = choices_of(kind)
    if choices and text.startswith(("Invalid enum value", "Expected `str`")):
        return f"expected one of {', '.join(map(repr, choices))}"
    head, sep, got = text.partition(", got ")
    text = re.sub(r"`([^`]*)`", lambda m: _names(m, _NAMES), head) + sep \
        + re.sub(r"`([^`]*)`", lambda m: _names(m, _GOT), got)
    return text[:1].lower() + text[1:]


def choices_of(kind: Any) -> tuple:
    """The values a Literal type (possibly annotated or optional) allows; () for other types."""
    kind = _strip(kind)
    if typing.get_origin(kind) in (Union, types.UnionType):
        return sum((choices_of(a) for a in typing.get_args(kind)), ())
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
