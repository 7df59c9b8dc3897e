"""Settings: defaults < file < environment < flags, strict refusals that name the key and the
source, and a password that never travels in argv and never prints. No broker needed."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import msgspec
import pytest

from fogsplit.cli import build_parser, main
from fogsplit.core.config import Flag, env_name, load_config, show
from fogsplit.core.errors import ConfigError
from fogsplit.core.settings import ROLES, BrokerSettings, CacheSettings, DeviceSettings, ExportOptions, \
    GatewayConfig, GatewaySettings, Secret
from fogsplit.core.validation import table_of

REQUIRED = {"device": {"bundle": "b", "name": "cam0"}, "gateway": {"bundle": "b"}, "cloud": {"bundle": "b"},
            "export": {"out": "b"}, "broker": {}, "watch": {}, "rollout": {"bundle": "b", "cell": "c0"}, "fog": {"bundle": "b"}}
PASSWORD = "s3cret-Pa55word"


def toml(body: dict) -> str:
    """A TOML document of scalars and (nested) tables, enough for these tests."""
    def value(v) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else repr(v)

    def lines(table: dict, path: tuple) -> list[str]:
        out = [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for k, v in table.items():
            if isinstance(v, dict):
                out += [f"[{'.'.join(path + (k,))}]", *lines(v, path + (k,))]
        return out
    return "\n".join(lines(body, ())) + "\n"


def nested(key: str, value) -> dict:
    *tables, leaf = key.split(".")
    body: dict = {leaf: value}
    for table in reversed(tables):
        body = {table: body}
    return body


@pytest.fixture
def write(tmp_path):
    def make(body: dict | str, name: str = "settings.toml") -> Path:
        path = tmp_path / name
        path.write_text(body if isinstance(body, str) else toml(body))
        return path
    return make


def leaves(model, prefix: str = ""):
    """(dotted key, field type, default) of every setting of ``model``, through its tables."""
    for f in msgspec.structs.fields(model):
        key = f"{prefix}{f.name}"
        table = table_of(f.type)
        if table is not None:
            yield from leaves(table, key + ".")
        else:
            default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
            yield key, f.type, default


# Values for the settings that are unset by default (any valid value will do).
EXAMPLES = {"bundle": "/srv/bundle", "name": "cam1", "out": "/srv/out", "count": 5, "events": 100, "broker.username": "u", "broker.password_file": "/run/secrets/pw",
            "broker.ca_file": "/etc/ca.crt", "gateway.local_threshold": 0.3, "gateway.edge_threshold": 0.4,
            "gateway.capture_rate": 12.5, "cache.k": 3, "cache.threshold": 0.5, "cache.min_agreement": 0.75,
            "export.feature_bytes": 64, "export.epochs": 12, "export.steps": 500, "export.target_flops": 0.5, "export.fog_nodes": 3, "export.target_params": 0.6,
            "trusted_keys": ["/etc/fogsplit/a.pub", "/etc/fogsplit/b.pub"], "sign_key": "/srv/keys/b.key",
            "health.file": "/tmp/fogsplit.health", "rollout.store": "/var/lib/fogsplit/bundles",
            "canary_cell": "c9", "cell": "c1", "seconds": 2.5, "data": "/srv/cam1.npz",
            "broker.session_expiry_s": 600, "device.spool": "/var/lib/fogsplit/spool.sqlite",
            "gateway.journal": "/var/lib/fogsplit/journal.sqlite", "data_dir": "/var/lib/mosquitto"}


def example(key: str, default):
    for name, value in EXAMPLES.items():
        if key == name or key.endswith("." + name):
            return value
    assert default is not None and default is not msgspec.NODEFAULT, f"give {key} an example value"
    return default


# -- defaults and layers ------------------------------------------------------------------------

@pytest.mark.parametrize("role", sorted(ROLES))
def test_defaults_load(role):
    loaded = load_config(role, environ={env_name(k): v for k, v in REQUIRED[role].items()})
    assert loaded.config == ROLES[role](**REQUIRED[role])
    assert set(loaded.sources.values()) <= {env_name(k) for k in REQUIRED[role]}


def test_direct_construction_has_the_tiers_defaults():
    assert GatewaySettings().deadline_ms == 250.0 and DeviceSettings().policy == "request"
    assert GatewayConfig(bundle="b").gateway == GatewaySettings()


def test_file_then_environment_then_flags(write):
    path = write({"bundle": "/b", "cell": "file-cell", "name": "file-gw",
                  "gateway": {"deadline_ms": 100.0, "threads": 2, "stats_period_s": 9.0}})
    environ = {"FOGSPLIT_GATEWAY__DEADLINE_MS": "200", "FOGSPLIT_CELL": "env-cell"}
    flags = [Flag("gateway.deadline_ms", "--deadline-ms", 300.0), Flag("cell", "--cell", None)]
    loaded = load_config("gateway", path=path, environ=environ, flags=flags)
    c = loaded.config
    assert (c.gateway.deadline_ms, c.cell, c.name, c.gateway.threads, c.gateway.feature_deadline_ms) == \
        (300.0, "env-cell", "file-gw", 2, 500.0)
    assert loaded.source("gateway.deadline_ms") == "--deadline-ms"
    assert loaded.source("cell") == "FOGSPLIT_CELL"
    assert loaded.source("name") == str(path)
    assert loaded.source("gateway.feature_deadline_ms") == "default"
    assert load_config("gateway", path=path, environ=environ).config.gateway.deadline_ms == 200.0
    assert load_config("gateway", path=path, environ={}).config.gateway.deadline_ms == 100.0


def test_flags_on_the_command_line_reach_the_settings(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("FOGSPLIT_")]:
        monkeypatch.delenv(name)
    from fogsplit.cli import load
    args = build_parser().parse_args(["gateway", "--bundle", "b", "--deadline-ms", "120", "--cache-entries", "500",
                                      "--username", "gw", "--broker", "mqtts://broker:8883"])
    c = load(args).config
    assert c.gateway.deadline_ms == 120.0 and c.gateway.cache == CacheSettings(max_entries=500)
    assert (c.broker.url, c.broker.username) == ("mqtts://broker:8883", "gw")
    device = load(build_parser().parse_args(["device", "--bundle", "b", "--device", "cam1", "--cache"])).config
    assert device.name == "cam1" and device.device.cache.max_entries == 256, "a device's cache is device-sized"


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_setting_is_reachable_from_a_file_and_from_the_environment(role, write):
    model = ROLES[role]
    for key, kind, default in leaves(model):
        if key == "broker.password":
            continue    # never from a file: the next tests
        value = example(key, default)
        body = {**REQUIRED[role], **nested(key, value)} if key not in REQUIRED[role] else \
            {**REQUIRED[role], key: value}
        if key == "export.target_params":
            body["export"].pop("target_flops", None)
        path = write(body)
        from_file = load_config(role, path=path, environ={}, read_secrets=False)
        from_env = load_config(role, environ={**{env_name(k): str(v) for k, v in REQUIRED[role].items()},
                                              env_name(key): _env_text(value)}, read_secrets=False)
        for loaded, source in ((from_file, str(path)), (from_env, env_name(key))):
            got = loaded.config
            for part in key.split("."):
                got = getattr(got, part)
            assert got == value, key
            assert loaded.source(key) == source, key


def _env_text(value) -> str:
    if isinstance(value, list):
        return ",".join(value)      # a list setting from the environment: comma-separated
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# -- refusals name the key and the source ---------------------------------------------------------

def test_an_unknown_key_in_a_file_is_refused_naming_it_and_the_file(write):
    path = write({"bundle": "b", "gateway": {"deadlin_ms": 3}, "colour": "red"})
    with pytest.raises(ConfigError) as err:
        load_config("gateway", path=path, environ={})
    assert f"unknown key 'gateway.deadlin_ms' in {path}" in str(err.value)
    assert f"unknown key 'colour' in {path}" in str(err.value)
    with pytest.raises(ConfigError, match=re.escape(f"unknown key 'gateway' in {path}")):
        load_config("device", path=write({"bundle": "b", "name": "c", "gateway": {}}), environ={})


def test_an_unknown_environment_variable_is_refused_naming_it():
    with pytest.raises(ConfigError, match="unknown environment variable FOGSPLIT_GATEWAY__DEADLIN_MS"):
        load_config("gateway", environ={"FOGSPLIT_BUNDLE": "b", "FOGSPLIT_GATEWAY__DEADLIN_MS": "3"})
    with pytest.raises(ConfigError, match="FOGSPLIT_GATEWAY__CACHE names a table"):
        load_config("gateway", environ={"FOGSPLIT_BUNDLE": "b", "FOGSPLIT_GATEWAY__CACHE": "on"})


def test_variables_of_other_roles_and_of_compose_are_ignored():
    """One environment file may serve every role (docs/configuration.md)."""
    environ = {"FOGSPLIT_BUNDLE": "b", "FOGSPLIT_DEVICE__RATE": "3", "FOGSPLIT_OUT": "x", "FOGSPLIT_TAG": "0.1.0",
               "FOGSPLIT_UID": "1000"}
    assert load_config("gateway", environ=environ).config == GatewayConfig(bundle="b")


@pytest.mark.parametrize("argv,flag", [
    (["gateway", "--deadline-ms", "-5"], "--deadline-ms"),
    (["gateway", "--deadline-ms", "nan"], "--deadline-ms"),
    (["gateway", "--threads", "1.5"], "--threads"),
    (["gateway", "--local-threshold", "1.5"], "--local-threshold"),
    (["gateway", "--broker", "mqtt://gw:pw@broker:1883"], "--broker"),
    (["device", "--cache-entries", "0"], "--cache-entries"),
    (["device", "--policy", "sometimes"], "--policy"),
    (["watch", "--password", PASSWORD], "unrecognized arguments"),
])
def test_a_bad_flag_is_refused_naming_it(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


def test_a_bad_flag_value_given_in_code_names_the_flag():
    with pytest.raises(ConfigError, match=re.escape("gateway.threads=0: expected an integer >= 1 (from --threads)")):
        load_config("gateway", environ={"FOGSPLIT_BUNDLE": "b"}, flags=[Flag("gateway.threads", "--threads", 0)])


@pytest.mark.parametrize("text,needle", [
    ("[gateway]\nthreads = true", "gateway.threads=True: expected an integer, got a bool"),
    ("[gateway]\ndeadline_ms = \"250\"", "gateway.deadline_ms='250': expected a number, got a string"),
    ("[gateway]\ndeadline_ms = 0", "gateway.deadline_ms=0: expected a number > 0"),
    ("[gateway]\ndeadline_ms = nan", "gateway.deadline_ms=nan: expected a number > 0"),
    ("[gateway]\nstats_period_s = inf", "gateway.stats_period_s=inf: expected a number <= 86400"),
    ("[gateway.cache]\nenabled = 1", "gateway.cache.enabled=1: expected true or false, got an integer"),
    ("[gateway.cache]\nann = \"faiss\"", "gateway.cache.ann='faiss': expected one of 'hnswlib'"),
    ("[broker]\nprotocol = 5", "broker.protocol=5: expected one of 'auto', '5', '3.1.1'"),
    ("cell = \"a/b\"", "cell='a/b'"),
    ("gateway = 5", "gateway=5: expected an object (table), got an integer"),
])
def test_bad_values_in_a_file_are_refused_naming_key_problem_and_file(text, needle, write):
    path = write("bundle = \"b\"\n" + text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config("gateway", path=path, environ={})
    assert needle in str(err.value) and f"(from {path})" in str(err.value)


@pytest.mark.parametrize("name,value,needle", [
    ("FOGSPLIT_GATEWAY__THREADS", "true", "gateway.threads='true': expected an integer (from FOGSPLIT_GATEWAY__THREADS)"),
    ("FOGSPLIT_GATEWAY__THREADS", "0", "gateway.threads='0': expected an integer >= 1 (from FOGSPLIT_GATEWAY__THREADS)"),
    ("FOGSPLIT_GATEWAY__DEADLINE_MS", "fast", "gateway.deadline_ms='fast': expected a number (from FOGSPLIT_"),
    ("FOGSPLIT_GATEWAY__DEADLINE_MS", "nan", "expected a number > 0"),
])
def test_bad_values_in_the_environment_are_refused_naming_the_variable(name, value, needle):
    with pytest.raises(ConfigError) as err:
        load_config("gateway", environ={"FOGSPLIT_BUNDLE": "b", name: value})
    assert needle in str(err.value) and name in str(err.value)


def test_every_problem_is_reported_at_once(write):
    path = write("bundle = \"b\"\n[gateway]\nthreads = 0\nhold_s = -1\n")
    with pytest.raises(ConfigError) as err:
        load_config("gateway", path=path, environ={"FOGSPLIT_GATEWAY__MAX_OPEN": "0"})
    assert all(key in str(err.value) for key in ("gateway.threads", "gateway.hold_s", "gateway.max_open"))


def test_a_missing_required_setting_says_every_way_to_give_it():
    with pytest.raises(ConfigError, match="missing setting 'name': give name in the --config file, "
                                          "FOGSPLIT_NAME or --device"):
        load_config("device", environ={"FOGSPLIT_BUNDLE": "b"}, flags=[Flag("name", "--device", None)])


def test_cross_field_checks_name_the_fields_and_the_sources(write):
    path = write({"bundle": "b", "name": "cam0", "device": {"cache": {"max_entries": 5000}}})
    with pytest.raises(ConfigError) as err:
        load_config("device", path=path, environ={})
    assert "device.cache.max_entries: 5000 is above cache.ann_above (1024)" in str(err.value)
    assert f"(from {path})" in str(err.value)
    with pytest.raises(ConfigError, match="target_flops or target_params, not both.*FOGSPLIT_EXPORT__TARGET_PARAMS"):
        load_config("export", path=write({"out": "o", "export": {"target_flops": 0.5}}),
                    environ={"FOGSPLIT_EXPORT__TARGET_PARAMS": "0.5"})


def test_a_file_that_is_missing_or_not_toml_is_refused(write, tmp_path):
    with pytest.raises(ConfigError, match="cannot read the settings file"):
        load_config("gateway", path=tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("gateway", path=write("bundle = \"b\n"), environ={})


@pytest.mark.parametrize("model,given,needle", [
    (GatewaySettings, {"threads": True}, "threads: expected an integer, got a bool"),
    (GatewaySettings, {"deadline_ms": math.nan}, "deadline_ms: expected a number > 0"),
    (GatewaySettings, {"deadline_ms": "250"}, "deadline_ms: expected a number, got a string"),
    (GatewaySettings, {"cache": {"k": 2}}, "cache: expected CacheSettings, got dict"),
    (DeviceSettings, {"policy": "sometimes"}, "policy: expected one of"),
    (BrokerSettings, {"keepalive": 1}, "keepalive: expected an integer >= 5"),
    (ExportOptions, {"target_flops": 1.5}, "target_flops"),
])
def test_models_built_in_code_are_checked_too(model, given, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        model(**given)
    with pytest.raises(TypeError):
        model(colour="red")


# -- the password ---------------------------------------------------------------------------------

def test_the_password_comes_from_the_environment():
    c = load_config("watch", environ={"FOGSPLIT_BROKER__PASSWORD": PASSWORD}).config
    assert c.broker.secret == PASSWORD and isinstance(c.broker.password, Secret)


def test_the_password_comes_from_a_file_with_its_newline_dropped(tmp_path, write):
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    loaded = load_config("watch", path=write({"broker": {"password_file": str(secret)}}), environ={})
    assert loaded.config.broker.secret == PASSWORD
    assert "password_file" in loaded.source("broker.password")
    secret.write_text("")
    with pytest.raises(ConfigError, match="one line"):
        load_config("watch", environ={"FOGSPLIT_BROKER__PASSWORD_FILE": str(secret)})
    with pytest.raises(ConfigError, match="cannot read the password file"):
        load_config("watch", environ={"FOGSPLIT_BROKER__PASSWORD_FILE": str(tmp_path / "none")})


def test_a_password_file_every_user_can_read_is_used_with_a_warning(tmp_path, caplog):
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    secret.chmod(0o644)
    assert load_config("watch", environ={"FOGSPLIT_BROKER__PASSWORD_FILE": str(secret)}).config.broker.secret == PASSWORD
    assert "readable by every user" in caplog.text and PASSWORD not in caplog.text


def test_a_password_is_refused_in_the_settings_file_in_a_url_and_twice(tmp_path, write):
    with pytest.raises(ConfigError, match="broker.password in .*FOGSPLIT_BROKER__PASSWORD") as err:
        load_config("watch", path=write({"broker": {"password": PASSWORD}}), environ={})
    assert PASSWORD not in str(err.value)
    for environ in ({"FOGSPLIT_BROKER__URL": f"mqtt://op:{PASSWORD}@h:1883"},):
        with pytest.raises(ConfigError, match="broker.url: holds a password; put it in password_file or the "
                                              "FOGSPLIT_BROKER__PASSWORD environment variable") as err:
            load_config("watch", environ=environ)
    with pytest.raises(ConfigError, match="broker.url: holds a password"):
        load_config("watch", path=write({"broker": {"url": f"mqtt://op:{PASSWORD}@h"}}), environ={})
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    with pytest.raises(ConfigError, match="both set"):
        load_config("watch", environ={"FOGSPLIT_BROKER__PASSWORD": PASSWORD,
                                      "FOGSPLIT_BROKER__PASSWORD_FILE": str(secret)})


def test_the_password_never_prints(capsys, monkeypatch):
    loaded = load_config("watch", environ={"FOGSPLIT_BROKER__PASSWORD": PASSWORD})
    for text in (repr(loaded.config), str(loaded.config), repr(loaded.config.broker.password),
                 str(loaded.config.broker.password), show(loaded), show(loaded, "json")):
        assert PASSWORD not in text
    assert '"password": "********"' in show(loaded, "json")
    assert 'password = "********"  # FOGSPLIT_BROKER__PASSWORD' in show(loaded)
    monkeypatch.setenv("FOGSPLIT_BROKER__PASSWORD", PASSWORD)
    assert main(["config", "show", "--role", "watch", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert PASSWORD not in out and json.loads(out)["broker"]["password"] == "********"


def test_config_show_says_where_each_setting_came_from(write, capsys, monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("FOGSPLIT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FOGSPLIT_GATEWAY__THREADS", "3")
    path = write({"bundle": "/srv/bundle", "gateway": {"deadline_ms": 120.0, "cache": {}}})
    assert main(["config", "show", "--role", "gateway", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f'bundle = "/srv/bundle"  # {path}' in out
    assert "threads = 3  # FOGSPLIT_GATEWAY__THREADS" in out
    assert "feature_deadline_ms = 500.0  # default" in out
    assert "[gateway.cache]" in out
    shown = Path(path).with_name("shown.toml")
    shown.write_text(out)
    assert load_config("gateway", path=shown, environ={}).config == \
        load_config("gateway", path=path, environ={"FOGSPLIT_GATEWAY__THREADS": "3"}).config, \
        "what config show prints loads back to the same settings"


def test_every_setting_is_documented():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    missing = [f"{role}: {key}" for role, model in ROLES.items() for key, _, _ in leaves(model)
               if f"`{key}`" not in docs]
    assert not missing, f"docs/configuration.md does not describe {missing}"
