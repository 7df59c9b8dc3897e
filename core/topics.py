"""The topic tree, in one place. Everything lives under ``fogsplit/v1/{fleet}``."""
from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "fogsplit/v1"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(what: str, value: str) -> str:
    """A fleet, cell, device or gateway name: no MQTT wildcards or separators."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} name {value!r} must be 1-64 of letters, digits, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class Topics:
    """Builds every topic of one fleet."""

    fleet: str = "demo"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)

    @property
    def root(self) -> str:
        return f"{PREFIX}/{self.fleet}"

    def device(self, cell: str, device: str, leaf: str) -> str:
        return f"{self.root}/cell/{cell}/device/{device}/{leaf}"

    def device_status(self, cell: str, device: str) -> str:
        return self.device(cell, device, "status")

    def scores(self, cell: str, device: str) -> str:
        return self.device(cell, device, "scores")

    def feature(self, cell: str, device: str) -> str:
        return self.device(cell, device, "feature")

    def raw(self, cell: str, device: str) -> str:
        return self.device(cell, device, "raw")

    def request(self, cell: str) -> str:
        return f"{self.root}/cell/{cell}/request"

    def forward(self, cell: str) -> str:
        return f"{self.root}/cell/{cell}/forward"

    def result(self, cell: str) -> str:
        return f"{self.root}/cell/{cell}/result"

    def gateway_status(self, cell: str, gateway: str) -> str:
        return f"{self.root}/cell/{cell}/gateway/{gateway}/status"

    def gateway_stats(self, cell: str, gateway: str) -> str:
        return f"{self.root}/cell/{cell}/gateway/{gateway}/stats"

    def cloud_status(self, worker: str) -> str:
        return f"{self.root}/cloud/{worker}/status"

    def cmd(self, cell: str, setting: str) -> str:
        return f"{self.root}/cell/{cell}/cmd/{setting}"

    def model(self, tier: str) -> str:
        return f"{self.root}/model/{tier}"

    @property
    def error(self) -> str:
        return f"{self.root}/error"

    def shared(self, group: str, topic: str) -> str:
        """A shared subscription: the broker hands each message to one member of ``group``."""
        return f"$share/{group}/{topic}"


def device_of(topic: str) -> str:
    """The device name in a ``.../device/{dev}/{leaf}`` topic."""
    parts = topic.split("/")
    return parts[-2]


def cell_of(topic: str) -> str:
    """The cell name in a ``.../cell/{cell}/...`` topic."""
    parts = topic.split("/")
    return parts[parts.index("cell") + 1]
