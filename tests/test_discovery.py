"""The Home Assistant discovery configs validate against Home Assistant's own MQTT schema.

The schema below is transcribed with voluptuous (the library Home Assistant validates with)
from home-assistant/core, homeassistant/components/mqtt/:

- schemas.py at c6ca7f5f416326437e8e652a5623aa5eff7b3d00: MQTT_AVAILABILITY_SINGLE_SCHEMA,
  MQTT_AVAILABILITY_LIST_SCHEMA (``availability_topic`` and ``availability`` exclusive),
  MQTT_ENTITY_DEVICE_INFO_SCHEMA (+ validate_device_has_at_least_one_identifier),
  MQTT_ORIGIN_INFO_SCHEMA, MQTT_ENTITY_COMMON_SCHEMA
  https://github.com/home-assistant/core/blob/c6ca7f5f416326437e8e652a5623aa5eff7b3d00/homeassistant/components/mqtt/schemas.py
- config.py at 459c79f295fd592fc7b235e4bcb5a6a3d160754e: MQTT_BASE_SCHEMA, MQTT_RO_SCHEMA
  https://github.com/home-assistant/core/blob/459c79f295fd592fc7b235e4bcb5a6a3d160754e/homeassistant/components/mqtt/config.py
- sensor.py (_PLATFORM_SCHEMA_BASE, validate_sensor_state_and_device_class_config,
  DISCOVERY_SCHEMA) and binary_sensor.py (PLATFORM_SCHEMA_MODERN, DISCOVERY_SCHEMA), as on the
  dev branch: https://github.com/home-assistant/core/blob/dev/homeassistant/components/mqtt/sensor.py
  (the stored copy read for this carries no commit id);
- util.py valid_topic / valid_subscribe_topic, discovery.py TOPIC_MATCHER.

Where this is stricter than Home Assistant: its DISCOVERY_SCHEMA drops unknown keys
(``extra=vol.REMOVE_EXTRA``), which would hide a misspelt key; here an unknown key fails. The
enum validators (device and state classes, entity categories) list the members fogsplit may use
out of Home Assistant's enums, and templates are parsed by Jinja2, as Home Assistant's
``cv.template`` does.
"""
from __future__ import annotations

import json
import re

import jinja2
import pytest

vol = pytest.importorskip("voluptuous", reason="the dev extra installs voluptuous")

from fakes import CELL, SENSORS, TOPICS, manifest, scores, status, confident  # noqa: E402
from fogsplit.core.clock import FakeClock  # noqa: E402
from fogsplit.core.discovery import cell_configs, removals  # noqa: E402
from fogsplit.core.settings import GatewaySettings  # noqa: E402
from fogsplit.gateway.logic import GatewayLogic  # noqa: E402

PREFIX = "homeassistant"

# -- the transcription: HA's config_validation helpers fogsplit's keys meet ---------------------

_JINJA = jinja2.Environment()


def string(value):
    """cv.string; strict: HA also turns a number into a string, fogsplit never needs that."""
    if isinstance(value, str):
        return value
    raise vol.Invalid("expected a string")


def boolean(value):
    if isinstance(value, bool):
        return value
    raise vol.Invalid("expected a boolean")


def positive_int(value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise vol.Invalid("expected a positive integer")


def template(value):
    """cv.template: a string that compiles as a Jinja template."""
    value = string(value)
    try:
        _JINJA.parse(value)
    except jinja2.TemplateSyntaxError as exc:
        raise vol.Invalid(f"invalid template ({exc})") from None
    return value


def icon(value):
    value = string(value)
    if ":" in value:
        return value
    raise vol.Invalid('Icons should be specified in the form "prefix:name"')


def valid_topic(value):
    value = string(value)
    raw = value.encode()
    if not raw or len(raw) > 65535 or "\0" in value or any(c <= "\x1f" or "\x7f" <= c <= "\x9f" for c in value):
        raise vol.Invalid("MQTT topic name/filter must be 1-65535 bytes without null or control characters")
    return value


def valid_subscribe_topic(value):
    value = valid_topic(value)
    for i, c in enumerate(value):
        if c == "+" and ((i > 0 and value[i - 1] != "/") or (i < len(value) - 1 and value[i + 1] != "/")):
            raise vol.Invalid("Single-level wildcard must occupy an entire level of the filter")
    index = value.find("#")
    if index != -1 and (index != len(value) - 1 or (len(value) > 1 and value[index - 1] != "/")):
        raise vol.Invalid("Multi-level wildcard must be the last character, after a level separator")
    return value


def one_of(*members):
    return vol.All(string, vol.In(members))


# Members of HA's enums that fogsplit may use (SensorDeviceClass, SensorStateClass,
# BinarySensorDeviceClass, EntityCategory have more).
SENSOR_DEVICE_CLASSES = one_of("duration", "data_size")
STATE_CLASSES = one_of("measurement", "total", "total_increasing")
BINARY_SENSOR_DEVICE_CLASSES = one_of("connectivity", "problem", "running")
ENTITY_CATEGORIES = one_of("config", "diagnostic")

# -- schemas.py ------------------------------------------------------------------------------

AVAILABILITY_SINGLE = {
    vol.Exclusive("availability_topic", "availability"): valid_subscribe_topic,
    vol.Optional("availability_template"): template,
    vol.Optional("payload_available", default="online"): string,
    vol.Optional("payload_not_available", default="offline"): string,
}
AVAILABILITY_LIST = {
    vol.Optional("availability_mode", default="latest"): one_of("all", "any", "latest"),
    vol.Exclusive("availability", "availability"): [{
        vol.Required("topic"): valid_subscribe_topic,
        vol.Optional("payload_available", default="online"): string,
        vol.Optional("payload_not_available", default="offline"): string,
        vol.Optional("value_template"): template,
    }],
}


def has_identifier(device: dict) -> dict:
    if device.get("identifiers") or device.get("connections"):
        return device
    raise vol.Invalid("Device must have at least one identifying value in 'identifiers' and/or 'connections'")


DEVICE_INFO = vol.All(vol.Schema({
    vol.Optional("identifiers", default=list): [string],
    vol.Optional("connections", default=list): [vol.All(vol.Length(2), [string])],
    vol.Optional("manufacturer"): string,
    vol.Optional("model"): string,
    vol.Optional("model_id"): string,
    vol.Optional("name"): string,
    vol.Optional("hw_version"): string,
    vol.Optional("serial_number"): string,
    vol.Optional("sw_version"): string,
    vol.Optional("via_device"): string,
    vol.Optional("suggested_area"): string,
    vol.Optional("configuration_url"): string,
}), has_identifier)

ORIGIN_INFO = vol.Schema({
    vol.Required("name"): string,
    vol.Optional("sw_version"): string,
    vol.Optional("support_url"): string,
})

ENTITY_COMMON = {
    **AVAILABILITY_SINGLE, **AVAILABILITY_LIST,
    vol.Optional("device"): DEVICE_INFO,
    vol.Optional("origin"): ORIGIN_INFO,
    vol.Optional("enabled_by_default", default=True): boolean,
    vol.Optional("entity_category"): ENTITY_CATEGORIES,
    vol.Optional("icon"): icon,
    vol.Optional("json_attributes_topic"): valid_subscribe_topic,
    vol.Optional("json_attributes_template"): template,
    vol.Optional("object_id"): string,
    vol.Optional("unique_id"): string,
}

# -- config.py -------------------------------------------------------------------------------

RO = {
    vol.Optional("qos", default=0): vol.In([0, 1, 2]),
    vol.Optional("encoding", default="utf-8"): string,
    vol.Optional("group"): [string],
    vol.Required("state_topic"): valid_subscribe_topic,
    vol.Optional("value_template"): template,
}

# -- sensor.py, binary_sensor.py ---------------------------------------------------------------


def sensor_options(config: dict) -> dict:
    """validate_sensor_state_and_device_class_config."""
    if "last_reset_value_template" in config and config.get("state_class") != "total":
        raise vol.Invalid("last_reset_value_template needs state class total")
    if config.get("options") is not None:
        if not config["options"]:
            raise vol.Invalid("An empty options list is not allowed")
        if config.get("state_class") or config.get("unit_of_measurement"):
            raise vol.Invalid("options is not allowed with state_class or unit_of_measurement")
        if config.get("device_class") != "enum":
            raise vol.Invalid("options needs device class enum")
    return config


SENSOR = vol.All(vol.Schema({
    **RO,
    vol.Optional("device_class"): vol.Any(SENSOR_DEVICE_CLASSES, None),
    vol.Optional("expire_after"): positive_int,
    vol.Optional("force_update", default=False): boolean,
    vol.Optional("last_reset_value_template"): template,
    vol.Optional("name"): vol.Any(string, None),
    vol.Optional("options"): [string],
    vol.Optional("suggested_display_precision"): positive_int,
    vol.Optional("state_class"): vol.Any(STATE_CLASSES, None),
    vol.Optional("unit_of_measurement"): vol.Any(string, None),
    **ENTITY_COMMON,
}, extra=vol.PREVENT_EXTRA), sensor_options)

BINARY_SENSOR = vol.Schema({
    **RO,
    vol.Optional("device_class"): vol.Any(BINARY_SENSOR_DEVICE_CLASSES, None),
    vol.Optional("expire_after"): positive_int,
    vol.Optional("force_update", default=False): boolean,
    vol.Optional("name"): vol.Any(string, None),
    vol.Optional("off_delay"): positive_int,
    vol.Optional("payload_off", default="OFF"): string,
    vol.Optional("payload_on", default="ON"): string,
    **ENTITY_COMMON,
}, extra=vol.PREVENT_EXTRA)

SCHEMAS = {"sensor": SENSOR, "binary_sensor": BINARY_SENSOR}
TOPIC_MATCHER = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config")


# -- the tests -------------------------------------------------------------------------------

def configs(**kwargs):
    return cell_configs(TOPICS, prefix=kwargs.get("prefix", PREFIX), cell=CELL, gateway="gw0", devices=SENSORS,
                        model="m1")


def validate(message) -> tuple[str, dict]:
    """Validate one config as Home Assistant would receive it; returns (component, config)."""
    assert message.topic.startswith(PREFIX + "/")
    match = TOPIC_MATCHER.fullmatch(message.topic[len(PREFIX) + 1:])
    assert match, f"Home Assistant does not read {message.topic} as a discovery topic"
    component = match["component"]
    body = json.loads(message.payload)
    return component, SCHEMAS[component](body)


def test_every_config_validates_against_home_assistants_schema():
    messages = configs()
    kinds = [validate(m)[0] for m in messages]
    assert kinds.count("binary_sensor") == len(SENSORS)
    assert kinds.count("sensor") == 5 + 2 * len(SENSORS)
    unique = [json.loads(m.payload)["unique_id"] for m in messages]
    assert len(set(unique)) == len(unique), "unique_id must be unique"
    assert len({m.topic for m in messages}) == len(messages)


def test_the_cell_groups_under_its_gateway_and_shows_its_availability():
    by_id = {json.loads(m.payload)["unique_id"]: json.loads(m.payload) for m in configs()}
    label = by_id["fogsplit_t_c0_gw0_label"]
    assert label["state_topic"] == TOPICS.result(CELL)
    assert label["availability_topic"] == TOPICS.gateway_status(CELL, "gw0")
    assert (label["payload_available"], label["payload_not_available"]) == ("online", "offline")
    assert label["device"]["identifiers"] == ["fogsplit_t_c0_gw0"]
    online = by_id["fogsplit_t_c0_cam1_online"]
    assert online["state_topic"] == TOPICS.device_status(CELL, "cam1")
    assert online["device"]["via_device"] == "fogsplit_t_c0_gw0"
    for body in by_id.values():
        assert {"identifiers", "name", "model", "manufacturer", "sw_version"} <= set(body["device"])


def test_the_templates_read_real_snapshots():
    """Each value_template renders to the figure it names, over a gateway's real stats JSON."""
    from dataclasses import asdict
    clock = FakeClock()
    logic = GatewayLogic(manifest(), None, cell=CELL, gateway="gw0", settings=GatewaySettings(), clock=clock)
    for device in SENSORS:
        logic.on_status(status(device))
    event = round(clock.time() * 10)
    clock.advance(0.004)
    for device in SENSORS:
        logic.on_scores(scores(device, event, confident(1)))
    clock.advance(1.0)
    stats = json.loads(json.dumps(asdict(logic.snapshot())))
    rendered = {}
    for m in configs():
        body = json.loads(m.payload)
        if body["state_topic"] == TOPICS.gateway_stats(CELL, "gw0"):
            rendered[body["unique_id"]] = _JINJA.from_string(body["value_template"]).render(value_json=stats)
    assert float(rendered["fogsplit_t_c0_gw0_events_per_s"]) == pytest.approx(1 / 1.004, abs=1e-3)
    assert float(rendered["fogsplit_t_c0_gw0_local_latency_p50"]) == stats["latency_ms"]["local"]["p50"] > 0
    assert rendered["fogsplit_t_c0_gw0_online_devices"] == "3"
    assert float(rendered["fogsplit_t_c0_gw0_cache_hit_rate"]) == 0.0
    label = next(json.loads(m.payload) for m in configs() if m.topic.endswith("gw0_label/config"))
    assert _JINJA.from_string(label["value_template"]).render(value_json={"class": "square"}) == "square"


@pytest.mark.parametrize("mutate, problem", [
    (lambda b: b.pop("state_topic"), "state_topic"),
    (lambda b: b.update(availability=[{"topic": "x"}]), "availability"),           # exclusive with availability_topic
    (lambda b: b.update(value_template="{{ value_json.x "), "template"),
    (lambda b: b["device"].update(identifiers=[]), "identifying"),
    (lambda b: b.update(state_topic="a/#/b"), "wildcard"),
    (lambda b: b.update(unit_of_measurment="ms"), "extra keys"),                     # a misspelt key
    (lambda b: b.update(options=["a"]), "options"),
])
def test_the_schema_catches_what_home_assistant_would_refuse(mutate, problem):
    message = next(m for m in configs() if m.topic.endswith("gw0_local_latency_p50/config"))
    body = json.loads(message.payload)
    mutate(body)
    with pytest.raises(vol.Invalid, match=problem):
        SENSOR(body)


def test_removal_is_an_empty_retained_payload_on_each_config_topic():
    messages = configs()
    gone = removals(messages)
    assert [m.topic for m in gone] == [m.topic for m in messages] and all(m.payload == b"" for m in gone)


def test_names_outside_home_assistants_id_alphabet_become_valid_ids():
    from fogsplit.core.topics import Topics
    messages = cell_configs(Topics("plant.1"), prefix="ha/disc", cell="hall.a", gateway="gw-0", devices=["cam.0"],
                            model="m1")
    for m in messages:
        assert TOPIC_MATCHER.fullmatch(m.topic[len("ha/disc/"):]), m.topic
