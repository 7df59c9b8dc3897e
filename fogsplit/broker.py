"""The embedded broker: rumqttd (through the ``iotcore`` wheel) in a child process.

Chosen because it is a compiled broker that installs with pip on x86_64, aarch64 and armv7,
speaks MQTT 3.1.1 with retained messages, last wills and shared subscriptions, and stops
cleanly (docs/architecture.md has the measurement against amqtt).
"""
from __future__ import annotations

import logging
import socket

log = logging.getLogger("fogsplit.broker")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """Start with ``with EmbeddedBroker() as url: ...``; the broker stops on exit."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        try:
            from iotcore import Broker
        except ImportError as exc:
            raise RuntimeError("the embedded broker needs the 'broker' extra: pip install 'fogsplit[broker]'; "
                               "or point --broker at a running MQTT broker") from exc
        self._broker = Broker(port=self.port, listen=self.host).start()
        log.info("embedded broker listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def __enter__(self) -> str:
        return self.start().url

    def __exit__(self, *exc: object) -> None:
        self.stop()
