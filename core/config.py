"""Load a role's settings: defaults < TOML file < ``FOGSPLIT_*`` environment < command-line flags.

Every value is traced to where it came from, so a refusal names the key, the problem and the
source: ``gateway.deadline_ms=0: expected a number > 0.0 (from /etc/fogsplit/gateway.toml)``.
Environment variables are the key path in capitals, tables joined by ``__``:
``FOGSPLIT_GATEWAY__DEADLINE_MS``, ``FOGSPLIT_BROKER__URL``, ``FOGSPLIT_BUNDLE``. A variable no
role reads is refused; one that another role reads is ignored, so that one environment file
can serve every role. The broker password comes only from ``FOGSPLIT_BROKER__PASSWORD`` or the
file named by ``broker.password_file``: never from a flag, a URL or the settings file.
The models themselves are in :mod:`fogsplit.core.settings`; docs/configuration.md tells it all.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping, NamedTuple

import msgspec

from fogsplit.core.errors import ConfigError
from fogsplit.core.settings import PASSWORD_ENV, ROLES, RoleConfig
from fogsplit.core.validation import MASK, Secret, convert, describe, explain, field_type, key_problems, \
    table_of, value_problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

ENV_PREFIX = "FOGSPLIT_"
ENV_SEPARATOR = "__"
# Read by docker compose (compose/.env), not by fogsplit.
NOT_SETTINGS = frozenset({"FOGSPLIT_UID", "FOGSPLIT_GID", "FOGSPLIT_TAG"})
DEFAULT = "default"
KeyPath = tuple[str, ...]


class Flag(NamedTuple):
    """A command-line flag bound to a setting; ``value`` None when the flag was not given."""

    key: str
    flag: str
    value: object = None


@dataclass(frozen=True)
class Loaded:
    """A role's effective settings and, for each dotted key set anywhere, where it came from."""

    config: Any
    sources: dict[str, str] = field(default_factory=dict)

    def source(self, key: str) -> str:
        return self.sources.get(key, DEFAULT)


def env_name(key: str) -> str:
    """``gateway.deadline_ms`` -> ``FOGSPLIT_GATEWAY__DEADLINE_MS``."""
    return ENV_PREFIX + ENV_SEPARATOR.join(key.split(".")).upper()


def load_config(role: str | type[RoleConfig], *, path: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None, flags: Iterable[Flag] = (),
                read_secrets: bool = True) -> Loaded:
    """The settings of ``role`` from its layers (``environ``: ``os.environ`` if None); raises
    ConfigError listing every problem found. ``read_secrets=False`` leaves ``password_file``
    unread, to check a deployment's settings away from the machine that holds the secret."""
    model = ROLES[role] if isinstance(role, str) else role
    flags = list(flags)
    leaves: list[tuple[KeyPath, object, str]] = []
    problems: list[str] = []
    if path is not None:
        _add(leaves, problems, _file_leaves(model, Path(path)))
    _add(leaves, problems, _env_leaves(model, os.environ if environ is None else environ))
    leaves += [(tuple(f.key.split(".")), f.value, f.flag) for f in flags if f.value is not None]
    body, sources = _merge(leaves)
    _refuse(body, sources, model, flags, problems)
    try:
        config = convert(body, model)
    except msgspec.ValidationError as exc:
        at = str(exc).partition(" - at `$")[2].rstrip("`").lstrip(".")
        raise ConfigError(f"{explain(str(exc), model)}{_from(sources, at, prefix=True)}") from None
    if read_secrets and getattr(config, "broker", None) is not None and config.broker.password_file is not None:
        config = msgspec.structs.replace(config, broker=_with_password(config.broker, sources))
        sources[("broker", "password")] = f"broker.password_file ({config.broker.password_file})"
    return Loaded(config, {".".join(k): v for k, v in sources.items()})


def _add(leaves: list, problems: list, results: tuple[list, list]) -> None:
    leaves += results[0]
    problems += results[1]


# -- the layers --------------------------------------------------------------------------------

def _file_leaves(model: type, path: Path) -> tuple[list, list[str]]:
    try:
        body = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the settings file ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    problems = [f"unknown key {_dotted(p.table, key)!r} in {path}"
                for p in key_problems(body, model) if p.kind == "unknown" for key in p.keys]
    broker = body.get("broker")
    if isinstance(broker, dict) and "password" in broker:
        problems.append(f"broker.password in {path}: a password is not kept in the settings file; "
                        f"put it in the file named by broker.password_file, or in {PASSWORD_ENV}")
    return list(_flatten(body, (), str(path))), problems


def _flatten(body: dict, path: KeyPath, source: str) -> Iterable[tuple[KeyPath, object, str]]:
    for key, value in body.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, path + (key,), source)
        else:
            yield path + (key,), value, source


def _env_leaves(model: type, environ: Mapping[str, str]) -> tuple[list, list[str]]:
    leaves, problems = [], []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = tuple(name[len(ENV_PREFIX):].lower().split(ENV_SEPARATOR))
        kind = field_type(model, path)
        if kind is None:
            if not any(field_type(other, path) is not None for other in ROLES.values()):
                problems.append(f"unknown environment variable {name}: no setting {'.'.join(path)!r}")
            continue
        if table_of(kind) is not None:
            problems.append(f"{name} names a table: set its keys, e.g. {name}{ENV_SEPARATOR}...")
            continue
        try:
            value = [i for i in environ[name].split(",") if i] if _is_list(kind) else environ[name]
            leaves.append((path, convert(value, kind, strict=False), name))
        except msgspec.ValidationError as exc:
            shown = MASK if name == PASSWORD_ENV else environ[name]
            expected = str(exc).split(" - at ")[0].split(", got ")[0]
            problems.append(f"{'.'.join(path)}={shown!r}: {describe(expected, kind)} (from {name})")
    return leaves, problems


def _is_list(kind: Any) -> bool:
    """A list setting: from the environment, its items separated by commas."""
    while typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    return typing.get_origin(kind) in (list, tuple)


def _merge(leaves: list[tuple[KeyPath, object, str]]) -> tuple[dict, dict[KeyPath, str]]:
    body: dict = {}
    sources: dict[KeyPath, str] = {}
    for path, value, source in leaves:
        node = body
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            continue
        node[path[-1]] = value
        sources = {p: s for p, s in sources.items() if p[:len(path)] != path}
        sources[path] = source
    return body, sources


def _refuse(body: dict, sources: dict[KeyPath, str], model: type, flags: list[Flag], problems: list[str]) -> None:
    """``problems`` found so far, every bad value and every missing key, each with its source."""
    problems = problems + [f"{p}{_from(sources, p.path)}" for p in value_problems(body, model)]
    hints = {f.key: f.flag for f in flags}
    for p in key_problems(body, model):
        if p.kind == "missing":
            for key in p.keys:
                dotted = _dotted(p.table, key)
                ways = [f"{dotted} in the --config file", env_name(dotted)] + \
                    ([hints[dotted]] if dotted in hints else [])
                problems.append(f"missing setting {dotted!r}: give {', '.join(ways[:-1])} or {ways[-1]}")
    if problems:
        raise ConfigError("; ".join(problems))


def _from(sources: dict[KeyPath, str], dotted: str, prefix: bool = False) -> str:
    """`` (from X)``: where the value at ``dotted`` came from; with ``prefix``, every source
    under it (a refused table)."""
    path = tuple(dotted.split("[")[0].split(".")) if dotted else ()
    found = sorted({s for p, s in sources.items() if p[:len(path)] == path or path[:len(p)] == p}) \
        if prefix else [s for p, s in sources.items() if path[:len(p)] == p]
    return f" (from {', '.join(found)})" if found else ""


def _dotted(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


# -- the password --------------------------------------------------------------------------------

def _with_password(broker: Any, sources: dict[KeyPath, str]) -> Any:
    where = sources.get(("broker", "password_file"), DEFAULT)
    if broker.password is not None:
        raise ConfigError(f"broker.password_file ({where}) and {PASSWORD_ENV} are both set: give one")
    return msgspec.structs.replace(broker, password=Secret(read_secret(broker.password_file, where)))


def read_secret(path: str | os.PathLike, where: str = "") -> str:
    """The secret in ``path``, one trailing newline dropped. A file every user may read is
    used, with a warning (docker compose mounts secrets with the host file's mode)."""
    named = f"{path}" + (f" (broker.password_file, from {where})" if where else "")
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{named}: cannot read the password file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{named}: the password file is not UTF-8 text") from None
    if mode & stat.S_IROTH:
        log.warning("%s: the password file is readable by every user; chmod 600 it", path)
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret or "\n" in secret:
        raise ConfigError(f"{named}: the password file must hold the password on one line")
    return secret


# -- showing -------------------------------------------------------------------------------------

def show(loaded: Loaded, fmt: str = "toml") -> str:
    """The effective settings as TOML (each key with where it came from) or JSON; secrets masked."""
    body = msgspec.to_builtins(loaded.config, enc_hook=_mask)
    if fmt == "json":
        return json.dumps(body, indent=2)
    return "\n".join(_toml(body, (), loaded)) + "\n"


def _mask(value: object) -> object:
    if isinstance(value, Secret):
        return MASK
    raise NotImplementedError(type(value).__name__)


def _toml(body: dict, path: KeyPath, loaded: Loaded) -> Iterable[str]:
    tables = [(k, v) for k, v in body.items() if isinstance(v, dict)]
    for key, value in body.items():
        if isinstance(value, dict):
            continue
        dotted = ".".join(path + (key,))
        where = f"  # {loaded.source(dotted)}"
        yield f"# {key} = (unset){where}" if value is None else f"{key} = {_toml_value(value)}{where}"
    for key, value in tables:
        yield ""
        yield f"[{'.'.join(path + (key,))}]"
        yield from _toml(value, path + (key,), loaded)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)
