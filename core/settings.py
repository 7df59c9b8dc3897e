"""Every setting fogsplit reads, as frozen msgspec Structs: one place, strict, described, bounded.

Each model refuses unknown keys, a bool where a number is due, NaN and values out of bounds,
both when :mod:`fogsplit.core.config` loads a file and when code builds one directly. Checks
that span fields live in the model's ``check`` and raise :class:`SettingsError`. Why msgspec
and not pydantic: docs/configuration.md (import time and memory on the device).

The role configs at the bottom are what ``fogsplit COMMAND --config FILE`` reads: the role's
own top-level keys, a ``[broker]`` table and the tier's table (``[gateway]``, ``[device]``...).
"""
from __future__ import annotations

from typing import ClassVar, Literal, get_args
from urllib.parse import urlsplit

import msgspec

from fogsplit.core.validation import Secret, Settings, SettingsError, load, setting as _field

__all__ = ["ANN_LIBRARIES", "FEATURE_CODECS", "PASSWORD_ENV", "ROLES", "STREAM_CODECS", "BrokerSettings",
           "CacheSettings", "CloudConfig", "CloudSettings", "DeviceCacheSettings", "DeviceConfig",
           "DeviceSettings", "EmbeddedBrokerConfig", "ExportConfig", "ExportOptions", "FogConfig", "FogSettings", "GatewayConfig",
           "GatewaySettings", "HealthSettings", "RoleConfig", "RolloutSettings", "Secret", "Settings", "SettingsError", "WatchConfig"]

AnnLibrary = Literal["hnswlib"]
FeatureCodec = Literal["fp32", "fp16", "int8", "sign"]
StreamCodec = Literal["fp32", "fp16", "int8"]
ANN_LIBRARIES = get_args(AnnLibrary)
FEATURE_CODECS = get_args(FeatureCodec)
STREAM_CODECS = get_args(StreamCodec)
PASSWORD_ENV = "FOGSPLIT_BROKER__PASSWORD"
BUILT_IN_DATA = ("images", "series")


# -- the tiers ---------------------------------------------------------------------------------

class CacheSettings(Settings, frozen=True):
    """What an operator sets for one semantic cache (docs/cache.md).

    ``threshold``, ``k`` and ``min_agreement`` left unset come from the bundle's calibration
    (:func:`fogsplit.core.cache.resolve`); set, they override it.
    """

    enabled: _field(bool, "answer repeated scenes from the cache") = True
    max_entries: _field(int, "bound in entries", ge=1, le=10_000_000) = 4096
    max_bytes: _field(int, "bound in bytes: key arrays plus the ANN index", ge=1024, le=1 << 36) = 64 << 20
    ttl_s: _field(float, "seconds an entry lives", gt=0, le=30 * 86400) = 600.0
    k: _field(int, "neighbours that vote (default: the bundle's)", ge=1, le=64) | None = None
    threshold: _field(float, "L2 distance between unit keys under which a neighbour counts "
                             "(default: the bundle's)", ge=0, le=2) | None = None
    min_agreement: _field(float, "share of the neighbours that must agree (default: the bundle's)",
                          gt=0.5, le=1) | None = None
    ann_above: _field(int, "entries above which search uses the ANN index", ge=64) = 1024
    ann: _field(AnnLibrary, "ANN library") = "hnswlib"

    @classmethod
    def from_dict(cls, body: object, where: str = "cache settings") -> "CacheSettings":
        """Settings from JSON-like data; unknown keys are refused, missing ones take defaults."""
        return load(body, cls, where)

    def to_dict(self) -> dict:
        return msgspec.structs.asdict(self)


class DeviceCacheSettings(CacheSettings, frozen=True):
    """A device's cache: sized for a small board, and exact search only (no ANN index)."""

    max_entries: _field(int, "bound in entries (at most ann_above: a device searches exactly)",
                        ge=1, le=10_000_000) = 256
    max_bytes: _field(int, "bound in bytes", ge=1024, le=1 << 36) = 1 << 20


_DEADLINE = dict(gt=0, le=600_000)
_THREADS = dict(ge=1, le=64)
_INBOX = dict(ge=1, le=10_000_000)


class GatewaySettings(Settings, frozen=True):
    """The gateway (fog node) of one cell."""

    deadline_ms: _field(float, "milliseconds to wait for the cell's scores", **_DEADLINE) = 250.0
    feature_deadline_ms: _field(float, "milliseconds to wait for requested features", **_DEADLINE) = 500.0
    stats_period_s: _field(float, "seconds between two stats snapshots", gt=0, le=86_400) = 5.0
    threads: _field(int, "onnxruntime threads of the gateway shard", **_THREADS) = 1
    local_threshold: _field(float, "normalized-entropy threshold of the local exit "
                                   "(default: the bundle's)", ge=0, le=1) | None = None
    edge_threshold: _field(float, "normalized-entropy threshold of the edge exit "
                                  "(default: the bundle's)", ge=0, le=1) | None = None
    cache: _field(CacheSettings, "the semantic cache; absent: none") | None = None
    hold_s: _field(float, "seconds a feature waits for the label that fills the cache", gt=0, le=3600) = 30.0
    max_held: _field(int, "features held waiting for their label", ge=1, le=1_000_000) = 256
    max_open: _field(int, "events assembled at once", ge=1, le=1_000_000) = 4096
    inbox: _field(int, "messages queued for the service; when full the oldest message is dropped and counted", **_INBOX) = 10_000
    capture_rate: _field(float, "captures per second of a device whose status was not seen "
                                "(default: none assumed)", gt=0, le=10_000) | None = None
    discovery: _field(bool, "publish Home Assistant MQTT discovery configs (retained) on every connect "
                            "(docs/monitoring.md)") = True
    discovery_prefix: _field(str, "topic prefix Home Assistant reads discovery configs under",
                             pattern=r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}$") = "homeassistant"
    fog_deadline_ms: _field(float, "milliseconds to wait for the fog nodes' answers (bundles with fog "
                                   "nodes, docs/eddl.md)", **_DEADLINE) = 200.0
    delivery: _field(Delivery, "reliable: ack every answered event to the devices and journal the answers; "
                               "lean: neither (docs/reliability.md)") = "reliable"
    journal: _field(str, "SQLite file of the answered events (survives a crash: no event is answered "
                         "twice); unset: kept in memory only", min_length=1) | None = None
    journal_max: _field(int, "answers the journal keeps; the oldest go first", ge=16, le=100_000_000) = 1_000_000
    replay_window_s: _field(float, "seconds a late (replayed) event may come after its capture; older "
                                   "frames are refused, answers are journaled this long", gt=0,
                            le=30 * 86400) = 3600.0
    max_skew_s: _field(float, "seconds a capture time may lie ahead of this gateway's clock before its "
                              "frame is refused as from the future", gt=0, le=3600) = 2.0
    ack_period_ms: _field(float, "milliseconds between two acks to the devices", gt=0, le=60_000) = 50.0
    cloud_deadline_ms: _field(float, "milliseconds to wait for the cloud's answer before forwarding again",
                              **_DEADLINE) = 2000.0
    cloud_tries: _field(int, "forwards of one event before it is answered from the edge exit, degraded",
                        ge=1, le=100) = 3
    shed_after_ms: _field(float, "a scores or late frame that waited this long in the inbox, or a live frame "
                                 "lagging the stream this long, is dropped unread and counted; the devices "
                                 "replay its event; the gateway aims to lag by a quarter of it, thinning the "
                                 "devices' stream when it cannot (overload, docs/reliability.md)",
                          **_DEADLINE) = 1000.0


Delivery = Literal["reliable", "lean"]


class FogSettings(Settings, frozen=True):
    """One fog node: a share of the edge part (docs/eddl.md)."""

    threads: _field(int, "onnxruntime threads of the node's shard", **_THREADS) = 1
    inbox: _field(int, "messages queued for the node; when full the oldest message is dropped and counted", **_INBOX) = 1000


class DeviceSettings(Settings, frozen=True):
    """One device agent."""

    policy: _field(Literal["request", "eager", "raw"],
                   "request: features on demand; eager: with the scores; raw: raw samples") = "request"
    rate: _field(float, "captures per second", gt=0, le=10_000) = 10.0
    delivery: _field(Delivery, "reliable: hold every event in the spool until the gateway acks it, replay "
                               "what was not; lean: send once (docs/reliability.md)") = "reliable"
    spool: _field(str, "SQLite file of the spool (survives a restart and a power cut); unset: memory only "
                       "(fogsplit device sets one under its state directory)", min_length=1) | None = None
    spool_max_bytes: _field(int, "bound on the spool's frames in bytes; when full the oldest event is "
                                 "dropped and counted", ge=4096, le=1 << 40) = 64 << 20
    spool_max_age_s: _field(float, "seconds an unacked event is kept and replayed; then dropped and counted",
                            gt=0, le=30 * 86400) = 3600.0
    reoffer_s: _field(float, "seconds without an ack before an event is replayed (then doubling to 30 s)",
                      gt=0, le=3600) = 3.0
    feature_ttl_s: _field(float, "seconds a feature is kept for the gateway to request", gt=0, le=3600) = 10.0
    keep_features: _field(int, "features kept for the gateway to request", ge=1, le=1_000_000) = 1024
    threads: _field(int, "onnxruntime threads of the device shard", **_THREADS) = 1
    cache: _field(DeviceCacheSettings, "the semantic cache; absent: none") | None = None
    inbox: _field(int, "messages queued for the agent; when full the oldest message is dropped and counted",
                  **_INBOX) = 1000
    stats_period_s: _field(float, "seconds between two stats snapshots", gt=0, le=86_400) = 10.0
    capture_backlog: _field(int, "captures that may wait for the shard; a new one then pushes out the "
                                 "oldest, counted as dropped", ge=1, le=1000) = 16

    def check(self) -> None:
        if self.cache is not None and self.cache.max_entries > self.cache.ann_above:
            raise SettingsError(f"cache.max_entries: {self.cache.max_entries} is above cache.ann_above "
                                f"({self.cache.ann_above}); a device searches its cache exactly")


class CloudSettings(Settings, frozen=True):
    """A cloud worker, or the cloud-only baseline (raw offload)."""

    threads: _field(int, "onnxruntime threads", **_THREADS) = 1
    inbox: _field(int, "messages queued for the service; when full the oldest message is dropped and counted", **_INBOX) = 10_000
    deadline_ms: _field(float, "raw offload: milliseconds to wait for every device's sample",
                        **_DEADLINE) = 250.0
    stats_period_s: _field(float, "seconds between two stats snapshots", gt=0, le=86_400) = 10.0



class RolloutSettings(Settings, frozen=True):
    """Over-the-air rollouts (docs/rollout.md); without ``store`` the tier takes none."""

    store: _field(str, "directory of the bundles received over the air; absent: no rollouts", min_length=1) \
        | None = None
    keep: _field(int, "bundles kept in the store; older ones are deleted", ge=1, le=100) = 3
    max_bytes: _field(int, "bound on the bytes one rollout may stage (an offer above it is refused)",
                      ge=1024, le=1 << 34) = 64 << 20
    stage_timeout_s: _field(float, "seconds to receive every chunk before a rollout is refused", gt=0,
                            le=86_400) = 120.0
    health_events: _field(int, "events after the switch that the health check watches", ge=1, le=1_000_000) = 20
    health_s: _field(float, "seconds after the switch after which a model without a failure is healthy",
                     gt=0, le=86_400) = 60.0
    drain_s: _field(float, "seconds the old model's logic stays after a switch, for its open events",
                    gt=0, le=3600) = 10.0
    revert_lead_s: _field(float, "seconds ahead a rollback names for the cell's switch back", ge=0, le=60) = 1.0

class HealthSettings(Settings, frozen=True):
    """The heartbeat file a container's HEALTHCHECK reads (``fogsplit health``, docs/access.md)."""

    file: _field(str, "file the service writes a heartbeat to (on a tmpfs); unset: none", min_length=1) | None = None
    period_s: _field(float, "seconds between two heartbeats", gt=0, le=3600) = 5.0


class BrokerSettings(Settings, frozen=True):
    """The connection to the MQTT broker. The password never comes from the URL or argv."""

    url: _field(str, "mqtt://host[:port] or mqtts://host[:port] (TLS), without user or password",
                min_length=8) = "mqtt://127.0.0.1:1883"
    username: _field(str, "MQTT user name", min_length=1, max_length=256) | None = None
    password: _field(Secret, f"MQTT password: only from {PASSWORD_ENV} or password_file") | None = None
    password_file: _field(str, "file holding the MQTT password (one trailing newline is dropped)",
                          min_length=1) | None = None
    ca_file: _field(str, "CA certificate that signed the broker's (mqtts); default: the system's",
                    min_length=1) | None = None
    keepalive: _field(int, "seconds between MQTT keep-alives", ge=5, le=3600) = 15
    protocol: _field(Literal["auto", "5", "3.1.1"], "MQTT version; auto: 5, else 3.1.1") = "auto"
    session_expiry_s: _field(int, "seconds the broker keeps this client's session (subscriptions and QoS 1 "
                                  "messages) while it is away; 0: a clean session (default: 300 for the "
                                  "gateway, 0 for the others)", ge=0, le=2**32 - 1) | None = None

    def check(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise SettingsError(f"url: {self.url!r} is not mqtt://host[:port] or mqtts://host[:port]")
        if parts.password is not None:
            raise SettingsError(f"url: holds a password; put it in password_file or the {PASSWORD_ENV} "
                                "environment variable (a URL shows in the process list)")
        if parts.username is not None:
            raise SettingsError("url: holds a user name; set broker.username instead")
        try:
            parts.port
        except ValueError:
            raise SettingsError(f"url: {self.url!r} has a bad port") from None
        if parts.path not in ("", "/") or parts.query:
            raise SettingsError(f"url: {self.url!r} must not have a path or query")

    @property
    def secret(self) -> str | None:
        """The password in clear, for the transport."""
        return None if self.password is None else self.password.reveal()


class ExportOptions(Settings, frozen=True):
    """How ``fogsplit export`` trains, prunes, calibrates and splits (export/pipeline.py)."""

    epochs: _field(int, "training epochs (default: a budget in steps fit to the data set's size)",
                   ge=1, le=1000) | None = None
    steps: _field(int, "training steps (default: 8 passes over the data, within 300..3000 steps)",
                  ge=1, le=100_000) | None = None
    augment: _field(bool, "augment the training data by sensor kind (docs/training.md)") = True
    early_stop: _field(bool, "keep the best checkpoint on validation, not the last step") = True
    flips: _field(bool, "let image augmentation mirror views (only if a mirrored view keeps its label)") = False
    seed: _field(int, "random seed", ge=0, le=2**32 - 1) = 0
    feature_channels: _field(int, "channels of the split layer (what devices send)", ge=1, le=512) = 4
    local_fusion: _field(Literal["max", "mean"], "how the device exits are fused while training") = "max"
    fusion_weights: _field(bool, "learn on validation how much the local exit trusts each device") = True
    edge_fusion: _field(Literal["max", "mean", "concat"], "how the gateway fuses device features") = "concat"
    scores_codec: _field(StreamCodec, "how device exit scores travel") = "int8"
    feature_codec: _field(FeatureCodec, "how device features travel "
                                        "(sign: a binarized trunk, 1 bit a value)") = "int8"
    forward_codec: _field(StreamCodec, "how the gateway forwards to the cloud") = "int8"
    feature_bytes: _field(int, "prune the split layer until one device's feature fits this many bytes",
                          ge=1, le=1 << 20) | None = None
    max_accuracy_drop: _field(float, "accuracy the early exits may cost on validation data", ge=0, le=1) = 0.005
    cache_k: _field(int, "neighbours that vote in the calibrated cache", ge=1, le=64) = 4
    cache_quorum: _field(float, "share of the neighbours that must agree", gt=0, le=1) = 0.5
    cache_max_accuracy_loss: _field(float, "accuracy the cache may cost", ge=0, le=1) = 0.01
    val_fraction: _field(float, "share of the training split held out for validation", ge=0.05, le=0.5) = 0.15
    progress: _field(bool, "show progress bars") = True
    target_flops: _field(float, "prune to cut this fraction of the FLOPs, e.g. 0.8", gt=0, lt=1) | None = None
    target_params: _field(float, "prune to cut this fraction of the parameters, e.g. 0.9",
                          gt=0, lt=1) | None = None
    fog_nodes: _field(int, "split the edge part over this many fog nodes (docs/eddl.md); unset: none",
                      ge=1, le=64) | None = None
    fog_design: _field(Literal["affine:2", "affine:3", "affine:4", "fano"],
                       "the block design of the fog nodes' grouped layer") = "affine:3"

    def check(self) -> None:
        if self.target_flops is not None and self.target_params is not None:
            raise SettingsError("give target_flops or target_params, not both: one rate is searched for")
        if self.epochs is not None and self.steps is not None:
            raise SettingsError("give epochs or steps, not both: they are two ways to set one budget")

    @property
    def prune_target(self) -> tuple[str, float] | None:
        """``("flops", 0.8)`` or ``("params", 0.9)`` when the export prunes, else None."""
        if self.target_flops is not None:
            return "flops", float(self.target_flops)
        if self.target_params is not None:
            return "params", float(self.target_params)
        return None


# -- the role configs: what `fogsplit COMMAND --config FILE` reads -----------------------------

_NAME = dict(pattern=r"^[A-Za-z0-9_.-]{1,64}$")   # as fogsplit.core.topics.check_name
_FLEET = _field(str, "topic namespace of the fleet", **_NAME)
_CELL = _field(str, "cell of co-located devices", **_NAME)
_BUNDLE = _field(str, "bundle directory", min_length=1)
_BROKER = _field(BrokerSettings, "the MQTT broker connection")
_HEALTH = _field(HealthSettings, "the heartbeat for a health check")
_DATA = _field(str, "images, series, or a .npz file", min_length=1)
_TRUSTED = _field(list[_field(str, "a public key file", min_length=1)],
                  "public key files (.pub) whose signature on the bundle is trusted (docs/signing.md)", max_length=64)
_UNSIGNED = _field(bool, "accept a bundle that has no manifest.sig, with a warning (a signed one is always checked)")
_ROLLOUT = _field(RolloutSettings, "over-the-air rollouts (docs/rollout.md)")


class RoleConfig(Settings, frozen=True):
    """Base of the role configs; ``role`` names the command that reads it."""

    role: ClassVar[str] = ""


class DeviceConfig(RoleConfig, frozen=True):
    role: ClassVar[str] = "device"

    bundle: _BUNDLE
    name: _field(str, "this device's sensor in the bundle, e.g. cam0", **_NAME)
    fleet: _FLEET = "demo"
    cell: _CELL = "cell0"
    data: _field(str, "replay file (.npz) of this sensor: fogsplit data replay; or a whole data set .npz",
                 min_length=1) | None = None
    split: _field(Literal["train", "test", "all"], "which part of the data to replay") = "test"
    count: _field(int, "stop after this many captures (default: loop for ever)", ge=1) | None = None
    trusted_keys: _TRUSTED = msgspec.field(default_factory=list)
    allow_unsigned: _UNSIGNED = False
    rollout: _ROLLOUT = msgspec.field(default_factory=RolloutSettings)
    broker: _BROKER = msgspec.field(default_factory=BrokerSettings)
    health: _HEALTH = msgspec.field(default_factory=HealthSettings)
    device: _field(DeviceSettings, "the agent") = msgspec.field(default_factory=DeviceSettings)

    def check(self) -> None:
        if self.data in BUILT_IN_DATA:
            raise SettingsError(f"data: {self.data!r} is built-in data, which a device would generate in full at "
                                f"every start; give it a replay file of its own sensor, made once with: fogsplit "
                                f"data replay --data {self.data} --sensor {self.name} --out {self.name}.npz")


class GatewayConfig(RoleConfig, frozen=True):
    role: ClassVar[str] = "gateway"

    bundle: _BUNDLE
    fleet: _FLEET = "demo"
    cell: _CELL = "cell0"
    name: _field(str, "this gateway's name", **_NAME) = "gw0"
    trusted_keys: _TRUSTED = msgspec.field(default_factory=list)
    allow_unsigned: _UNSIGNED = False
    rollout: _ROLLOUT = msgspec.field(default_factory=RolloutSettings)
    broker: _BROKER = msgspec.field(default_factory=BrokerSettings)
    health: _HEALTH = msgspec.field(default_factory=HealthSettings)
    gateway: _field(GatewaySettings, "the gateway") = msgspec.field(default_factory=GatewaySettings)


class FogConfig(RoleConfig, frozen=True):
    role: ClassVar[str] = "fog"

    bundle: _BUNDLE
    node: _field(int, "which fog node of the bundle this is (0..N-1); its name is fog<node>", ge=0, le=63) = 0
    fleet: _FLEET = "demo"
    cell: _CELL = "cell0"
    trusted_keys: _TRUSTED = msgspec.field(default_factory=list)
    allow_unsigned: _UNSIGNED = False
    broker: _BROKER = msgspec.field(default_factory=BrokerSettings)
    health: _HEALTH = msgspec.field(default_factory=HealthSettings)
    fog: _field(FogSettings, "the fog node") = msgspec.field(default_factory=FogSettings)


class CloudConfig(RoleConfig, frozen=True):
    role: ClassVar[str] = "cloud"

    bundle: _BUNDLE
    fleet: _FLEET = "demo"
    name: _field(str, "this worker's name (its MQTT client id is <fleet>-<name>)", **_NAME) = "cloud0"
    raw: _field(bool, "cloud-only baseline: take raw samples, run everything") = False
    trusted_keys: _TRUSTED = msgspec.field(default_factory=list)
    allow_unsigned: _UNSIGNED = False
    rollout: _ROLLOUT = msgspec.field(default_factory=RolloutSettings)
    broker: _BROKER = msgspec.field(default_factory=BrokerSettings)
    health: _HEALTH = msgspec.field(default_factory=HealthSettings)
    cloud: _field(CloudSettings, "the worker") = msgspec.field(default_factory=CloudSettings)


class ExportConfig(RoleConfig, frozen=True):
    role: ClassVar[str] = "export"

    out: _field(str, "bundle directory to write", min_length=1)
    sign_key: _field(str, "private key file (.key) that signs the bundle once written (docs/signing.md)",
                     min_length=1) | None = None
    data: _DATA = "images"
    events: _field(int, "how many events the built-in generator makes", ge=1) | None = None
    export: _field(ExportOptions, "training, pruning and splitting") = msgspec.field(default_factory=ExportOptions)


class EmbeddedBrokerConfig(RoleConfig, frozen=True):
    role: ClassVar[str] = "broker"

    host: _field(str, "address to listen on", min_length=1) = "127.0.0.1"
    port: _field(int, "port to listen on", ge=1, le=65535) = 1883
    kind: _field(Literal["auto", "mosquitto", "rumqttd"], "auto: Mosquitto if installed, else rumqttd "
                                                          "(docs/broker.md)") = "auto"
    data_dir: _field(str, "Mosquitto only: keep retained messages and sessions here (autosave every 300 s, "
                          "as compose ships it); unset: nothing on disk", min_length=1) | None = None


class WatchConfig(RoleConfig, frozen=True):
    role: ClassVar[str] = "watch"

    fleet: _FLEET = "demo"
    count: _field(int, "stop after this many messages (implies raw)", ge=1) | None = None
    raw: _field(bool, "one line per message instead of the dashboard") = False
    seconds: _field(float, "listen this long, print one screen of the dashboard and exit "
                           "(default: refresh it live)", gt=0, le=86_400) | None = None
    broker: _BROKER = msgspec.field(default_factory=BrokerSettings)



class RolloutCommandConfig(RoleConfig, frozen=True):
    """``fogsplit rollout``: ship a bundle to a cell over MQTT (docs/rollout.md)."""

    role: ClassVar[str] = "rollout"

    bundle: _BUNDLE
    cell: _CELL
    fleet: _FLEET = "demo"
    canary_cell: _field(str, "a cell that takes the bundle first; the others wait for it to be healthy",
                        **_NAME) | None = None
    lead_s: _field(float, "seconds between the activation message and the switch", gt=0, le=3600) = 5.0
    timeout_s: _field(float, "seconds to wait for every tier to report staged, then healthy", gt=0,
                      le=86_400) = 120.0
    chunk_bytes: _field(int, "bytes of one shard chunk", ge=1024, le=1 << 20) = 64 << 10
    broker: _BROKER = msgspec.field(default_factory=BrokerSettings)

ROLES: dict[str, type[RoleConfig]] = {c.role: c for c in (
    DeviceConfig, GatewayConfig, CloudConfig, ExportConfig, EmbeddedBrokerConfig, WatchConfig,
    RolloutCommandConfig, FogConfig)}
