"""Home Assistant MQTT discovery: the retained config messages that make a cell appear in Home
Assistant with no hand-written YAML (docs/monitoring.md).

Each entity has one config at ``{prefix}/{component}/{node_id}/{object_id}/config`` (the topic
Home Assistant's ``discovery.py`` matches), a JSON object naming its state topic, a
``value_template`` that picks a field out of fogsplit's JSON, a ``unique_id`` and a ``device``
block that groups the entities of one gateway or one device agent. The gateway of a cell
publishes them all, retained, on every connect: the cell's devices are the bundle's sensors.

An empty retained payload on a config topic removes the entity (:func:`removals`). fogsplit
does not remove them on a clean stop: a stopped gateway shows as unavailable (its status is
``offline``) and comes back with its history when it restarts, which is what Home Assistant
users expect of a device that is switched off; removing is for a cell taken out of service.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable, Sequence

from fogsplit.core.topics import Topics

MANUFACTURER = "fogsplit"
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class DiscoveryMessage:
    """One retained config: ``payload`` is the entity's JSON, or empty to remove it."""

    topic: str
    payload: bytes


def version() -> str:
    try:
        return metadata.version("fogsplit")
    except metadata.PackageNotFoundError:
        return "unknown"


def slug(*parts: str) -> str:
    """A node or object id Home Assistant accepts (letters, digits, ``_``, ``-``)."""
    return _NOT_ID.sub("_", "_".join(parts))


def config_topic(prefix: str, component: str, node: str, obj: str) -> str:
    return f"{prefix}/{component}/{slug(node)}/{slug(obj)}/config"


def _availability(topic: str) -> dict:
    """Available while the status JSON on ``topic`` says ``online`` (the birth; the will says offline)."""
    return {"availability_topic": topic, "availability_template": "{{ value_json.state }}",
            "payload_available": "online", "payload_not_available": "offline"}


def _measure(name: str, template: str, unit: str | None = None, device_class: str | None = None) -> dict:
    body = {"name": name, "value_template": template, "state_class": "measurement"}
    if unit is not None:
        body["unit_of_measurement"] = unit
    if device_class is not None:
        body["device_class"] = device_class
    return body


GATEWAY_SENSORS: dict[str, dict] = {
    "events_per_s": _measure("Events per second", "{{ value_json.events_per_s }}", "events/s"),
    "local_latency_p50": _measure("Local-exit latency p50", "{{ value_json.latency_ms.local.p50 }}", "ms",
                                  "duration"),
    "cache_hit_rate": _measure("Cache hit rate", "{{ ((value_json.cache_hit_rate or 0) * 100) | round(1) }}", "%"),
    "online_devices": _measure("Online devices", "{{ value_json.online_devices | length }}"),
}
"""The cell's figures, read off the gateway's stats topic (docs/monitoring.md)."""

DEVICE_SENSORS: dict[str, dict] = {
    "shard_p50": _measure("Shard latency p50", "{{ value_json.shard_ms.p50 }}", "ms", "duration"),
    "rss": _measure("Memory (RSS)", "{{ value_json.rss_mb }}", "MiB", "data_size"),
}
"""Each device's figures, read off its stats topic."""


def cell_configs(topics: Topics, *, prefix: str, cell: str, gateway: str, devices: Sequence[str],
                 model: str) -> list[DiscoveryMessage]:
    """Every config of one cell: the gateway's entities, then each device's."""
    fleet, sw = topics.fleet, version()
    node = slug("fogsplit", fleet, cell)
    origin = {"name": "fogsplit", "sw_version": sw}
    gw_id = slug("fogsplit", fleet, cell, gateway)
    gw_device = {"identifiers": [gw_id], "name": f"fogsplit {fleet}/{cell} gateway {gateway}",
                 "model": "fogsplit gateway", "manufacturer": MANUFACTURER, "sw_version": f"{sw} model {model}"}
    gw_common = {"device": gw_device, "origin": origin, **_availability(topics.gateway_status(cell, gateway))}

    def entity(component: str, obj: str, body: dict) -> DiscoveryMessage:
        payload = {**body, "unique_id": slug(node, obj)}
        return DiscoveryMessage(config_topic(prefix, component, node, obj), json.dumps(payload).encode())

    out = [entity("sensor", f"{gateway}_label", {
        "name": "Last label", "state_topic": topics.result(cell), "value_template": "{{ value_json['class'] }}",
        "icon": "mdi:label", **gw_common})]
    stats = topics.gateway_stats(cell, gateway)
    out += [entity("sensor", f"{gateway}_{key}", {**body, "state_topic": stats, **gw_common})
            for key, body in GATEWAY_SENSORS.items()]
    for dev in devices:
        status = topics.device_status(cell, dev)
        dev_device = {"identifiers": [slug("fogsplit", fleet, cell, dev)], "name": f"fogsplit {fleet}/{cell} {dev}",
                      "model": "fogsplit device agent", "manufacturer": MANUFACTURER, "sw_version": sw,
                      "via_device": gw_id}
        out.append(entity("binary_sensor", f"{dev}_online", {
            "name": "Online", "state_topic": status, "value_template": "{{ value_json.state }}",
            "payload_on": "online", "payload_off": "offline", "device_class": "connectivity",
            "device": dev_device, "origin": origin}))
        out += [entity("sensor", f"{dev}_{key}", {**body, "state_topic": topics.device_stats(cell, dev),
                                                  "device": dev_device, "origin": origin, **_availability(status)})
                for key, body in DEVICE_SENSORS.items()]
    return out


def removals(messages: Iterable[DiscoveryMessage]) -> list[DiscoveryMessage]:
    """The messages that remove these entities from Home Assistant: empty, retained."""
    return [DiscoveryMessage(m.topic, b"") for m in messages]
