"""Operator commands: every bad body is refused with what is wrong, nothing of it applied."""
from __future__ import annotations

import json

import pytest

from fogsplit.core.commands import parse_thresholds
from fogsplit.core.errors import FrameError

TOPIC = "fogsplit/v1/f/cell/c/cmd/thresholds"


def test_a_thresholds_command_gives_its_settings_as_floats():
    assert parse_thresholds(b'{"local": 0, "edge": 0.5, "cache": 1.5, "device_cache": 2}', TOPIC) == {
        "local": 0.0, "edge": 0.5, "cache": 1.5, "device_cache": 2.0}


@pytest.mark.parametrize("payload,topic,needle", [
    (b'{"local": 0.2}', "fogsplit/v1/f/cell/c/cmd/reboot", "unknown command 'reboot'"),
    (b"not json", TOPIC, "not a JSON object"),
    (b"[0.2]", TOPIC, "not a JSON object"),
    (b"{}", TOPIC, "no setting at all"),
    (b'{"local": 0.2, "speed": 3}', TOPIC, "unknown keys ['speed']"),
    (b'{"local": 1.5}', TOPIC, "for ['local']"),
    (b'{"cache": -0.1}', TOPIC, "for ['cache']"),
    (b'{"device_cache": "near"}', TOPIC, "for ['device_cache']"),
    (b'{"edge": true}', TOPIC, "for ['edge']"),
    (json.dumps({"edge": float("nan")}).encode(), TOPIC, "for ['edge']"),
])
def test_bad_commands_are_refused_naming_the_problem(payload, topic, needle):
    with pytest.raises(FrameError) as err:
        parse_thresholds(payload, topic)
    assert err.value.rule == "cmd" and needle in str(err.value) and err.value.topic == topic
