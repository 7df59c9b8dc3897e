"""fogsplit: one deep network run across IoT devices, fog gateways and the cloud, over MQTT.

The package is layered (docs/architecture.md, held by ``lint-imports``):

- ``fogsplit.cli`` and ``fogsplit.demo`` (this folder, app/): the entry points;
- ``fogsplit.bench``: the test harness, the embedded broker and the benchmarks;
- ``fogsplit.device``, ``fogsplit.gateway``, ``fogsplit.cloud``, ``fogsplit.export``: the tiers,
  independent of one another;
- ``fogsplit.core``: frames, codecs, topics, manifest, transport, settings: what every tier shares.
"""

__version__ = "0.1.0"
