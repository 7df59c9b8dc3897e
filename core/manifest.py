"""The bundle: a directory with manifest.json and the ONNX shards it lists.

A tier loads only a verified bundle: every shard it runs must match its sha256, and the
model id must match the manifest's content, so a frame from another model version is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fogsplit.core.codecs import CodecSpec, payload_bytes
from fogsplit.core.errors import BundleError
from fogsplit.core.frames import FEATURE, FORWARD, RAW, SCORES, Expect

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TIERS = ("device", "gateway", "cloud")
FUSIONS = ("max", "mean", "concat")
COMPRESSION_KEYS = ("metric", "target", "flops_cut", "params_cut", "shards")
SHARD_COMPRESSION_KEYS = ("flops", "params", "flops_dense", "params_dense", "flops_cut", "params_cut")


@dataclass(frozen=True)
class SensorSpec:
    name: str
    kind: str            # "image" | "series"
    shape: tuple[int, ...]
    dtype: str           # dtype of the raw sample: "uint8" or "float32"


@dataclass(frozen=True)
class ShardSpec:
    name: str
    tier: str
    file: str
    sha256: str
    inputs: dict[str, list]      # input name -> shape (first dim "batch")
    outputs: dict[str, list]
    sensor: str = ""             # device shards: the sensor they run on
    flops: int = 0
    params: int = 0


@dataclass(frozen=True)
class CachePoint:
    """A calibrated cache threshold and what it gave on held-out data (leave-one-out)."""

    threshold: float          # L2 distance between unit-norm keys, in [0, 2]
    hit_rate: float           # share of held-out events the cache answered
    hit_accuracy: float       # accuracy of those answers
    model_accuracy: float     # the model's accuracy on the same events
    queries: int


@dataclass(frozen=True)
class CacheSpec:
    """The semantic cache's calibration: one threshold per key space (fused gateway feature,
    a device's own feature), the neighbours it votes over and the agreement it needs."""

    k: int
    min_agreement: float
    quorum: float             # share of an event's devices whose own caches must hit, all agreeing
    max_accuracy_loss: float
    gateway: CachePoint
    device: CachePoint

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    model_id: str
    classes: tuple[str, ...]
    sensors: tuple[SensorSpec, ...]
    shards: tuple[ShardSpec, ...]
    local_fusion: str
    edge_fusion: str
    thresholds: dict[str, float]
    codecs: dict[str, CodecSpec]
    dataset: str = ""
    metrics: dict = field(default_factory=dict)
    compression: dict = field(default_factory=dict)   # empty, or what pruning cut (see COMPRESSION_KEYS)
    schema: int = SCHEMA_VERSION
    cache: CacheSpec | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sensor_names(self) -> list[str]:
        return [s.name for s in self.sensors]

    def sensor(self, name: str) -> SensorSpec:
        for s in self.sensors:
            if s.name == name:
                return s
        raise BundleError(f"sensor {name!r} is not in this bundle (it has {self.sensor_names})")

    def shard(self, name: str) -> ShardSpec:
        for s in self.shards:
            if s.name == name:
                return s
        raise BundleError(f"shard {name!r} is not in this bundle")

    def device_shard(self, sensor: str) -> ShardSpec:
        self.sensor(sensor)
        return next(s for s in self.shards if s.tier == "device" and s.sensor == sensor)

    def tier_shard(self, tier: str) -> ShardSpec:
        return next(s for s in self.shards if s.tier == tier)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.device_shard(self.sensors[0].name).outputs["feature"][1:])

    @property
    def feature_payload_bytes(self) -> int:
        """Bytes of one device's encoded feature, before any lossless stage."""
        return payload_bytes(self.codecs["feature"], int(np.prod(self.feature_shape)))

    @property
    def forward_shape(self) -> tuple[int, ...]:
        return tuple(self.tier_shard("gateway").outputs["edge_feature"][1:])

    def to_dict(self) -> dict:
        out = asdict(self)
        out["codecs"] = {k: v.to_dict() for k, v in self.codecs.items()}
        if self.cache is None:
            out.pop("cache")
        return out


def compute_model_id(manifest: Manifest) -> str:
    """A short id that changes whenever any shard or any setting of the manifest changes."""
    body = manifest.to_dict()
    body.pop("model_id")
    body.pop("metrics")
    body.pop("thresholds")  # run-time settings; the same weights stay the same model
    body.pop("compression")  # a report on the shards, whose sha256 is already in the body
    body.pop("cache", None)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(manifest: Manifest, bundle_dir: Path) -> Manifest:
    """Stamp the model id and write manifest.json; returns the stamped manifest."""
    manifest = replace(manifest, model_id=compute_model_id(manifest))
    (Path(bundle_dir) / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def parse_manifest(data: dict, source: str = MANIFEST) -> Manifest:
    """Build a :class:`Manifest` from JSON, refusing unknown or missing keys."""
    def need(obj: dict, cls: type, where: str) -> dict:
        if not isinstance(obj, dict):
            raise BundleError(f"{source}: {where} must be an object")
        names = set(cls.__dataclass_fields__)
        unknown = set(obj) - names
        if unknown:
            raise BundleError(f"{source}: unknown keys {sorted(unknown)} in {where}")
        required = {n for n, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(obj)
        if missing:
            raise BundleError(f"{source}: missing keys {sorted(missing)} in {where}")
        return obj

    need(data, Manifest, "the manifest")
    if data.get("schema") != SCHEMA_VERSION:
        raise BundleError(f"{source}: schema {data.get('schema')!r}, this version reads {SCHEMA_VERSION}")
    try:
        sensors = tuple(SensorSpec(**{**need(s, SensorSpec, "a sensor"), "shape": tuple(s["shape"])})
                        for s in data["sensors"])
        shards = tuple(ShardSpec(**need(s, ShardSpec, "a shard")) for s in data["shards"])
        codecs = {k: CodecSpec.from_dict(v) for k, v in data["codecs"].items()}
        cache = None
        if "cache" in data:
            body = need(data["cache"], CacheSpec, "cache")
            cache = CacheSpec(**{**body, **{key: CachePoint(**need(body[key], CachePoint, f"cache.{key}"))
                                            for key in ("gateway", "device")}})
        manifest = Manifest(**{**data, "classes": tuple(data["classes"]), "sensors": sensors,
                               "shards": shards, "codecs": codecs, "cache": cache})
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"{source}: {exc}") from exc
    _check_consistency(manifest, source)
    return manifest


def _check_consistency(m: Manifest, source: str) -> None:
    if not m.sensors:
        raise BundleError(f"{source}: no sensors")
    for tier in TIERS:
        if not any(s.tier == tier for s in m.shards):
            raise BundleError(f"{source}: no {tier} shard")
    for s in m.shards:
        if s.tier not in TIERS:
            raise BundleError(f"{source}: shard {s.name!r} has unknown tier {s.tier!r}")
        if Path(s.file).name != s.file:
            raise BundleError(f"{source}: shard file {s.file!r} must be a plain file name")
    for sensor in m.sensors:
        if not any(s.tier == "device" and s.sensor == sensor.name for s in m.shards):
            raise BundleError(f"{source}: sensor {sensor.name!r} has no device shard")
    if m.local_fusion not in ("max", "mean") or m.edge_fusion not in FUSIONS:
        raise BundleError(f"{source}: fusion {m.local_fusion!r}/{m.edge_fusion!r} is not supported")
    for tier in ("local", "edge"):
        t = m.thresholds.get(tier)
        if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise BundleError(f"{source}: exit threshold {tier!r} must be a number in [0, 1], got {t!r}")
    if m.cache is not None:
        _check_cache(m.cache, source)
    for stream in ("scores", "feature", "forward"):
        if stream not in m.codecs:
            raise BundleError(f"{source}: no codec for {stream!r}")
    _check_compression(m, source)
    if compute_model_id(m) != m.model_id:
        raise BundleError(f"{source}: model id {m.model_id!r} does not match the manifest's content")


def _check_compression(m: Manifest, source: str) -> None:
    """Empty, or exactly :data:`COMPRESSION_KEYS` with cuts in [0, 1) and one entry per shard."""
    c = m.compression
    if not c:
        return
    if set(c) != set(COMPRESSION_KEYS):
        raise BundleError(f"{source}: compression must have the keys {list(COMPRESSION_KEYS)}, got {sorted(c)}")
    if c["metric"] not in ("flops", "params"):
        raise BundleError(f"{source}: compression metric must be flops or params, got {c['metric']!r}")
    fractions = [("target", c["target"]), ("flops_cut", c["flops_cut"]), ("params_cut", c["params_cut"])]
    shards = c["shards"]
    if not isinstance(shards, dict) or set(shards) != {s.name for s in m.shards}:
        raise BundleError(f"{source}: compression must describe every shard, got {shards!r:.80}")
    for name, entry in shards.items():
        if not isinstance(entry, dict) or set(entry) != set(SHARD_COMPRESSION_KEYS):
            raise BundleError(f"{source}: compression of shard {name!r} must have the keys "
                              f"{list(SHARD_COMPRESSION_KEYS)}")
        fractions += [(f"{name}.flops_cut", entry["flops_cut"]), (f"{name}.params_cut", entry["params_cut"])]
    for key, value in fractions:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise BundleError(f"{source}: compression {key} must be a fraction in [0, 1), got {value!r}")


def _check_cache(cache: CacheSpec, source: str) -> None:
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(cache.k, int) or isinstance(cache.k, bool) or not 1 <= cache.k <= 64:
        raise BundleError(f"{source}: cache.k must be an integer 1..64, got {cache.k!r}")
    if not number(cache.min_agreement) or not 0.5 < cache.min_agreement <= 1:
        raise BundleError(f"{source}: cache.min_agreement must be in (0.5, 1], got {cache.min_agreement!r}")
    if not number(cache.quorum) or not 0 < cache.quorum <= 1:
        raise BundleError(f"{source}: cache.quorum must be in (0, 1], got {cache.quorum!r}")
    if not number(cache.max_accuracy_loss) or not 0 <= cache.max_accuracy_loss <= 1:
        raise BundleError(f"{source}: cache.max_accuracy_loss must be in [0, 1], got {cache.max_accuracy_loss!r}")
    for key in ("gateway", "device"):
        point = getattr(cache, key)
        if not number(point.threshold) or not 0 <= point.threshold <= 2:
            raise BundleError(f"{source}: cache.{key}.threshold must be a distance in [0, 2], "
                              f"got {point.threshold!r}")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    def shard_path(self, shard: ShardSpec) -> Path:
        return self.path / shard.file


def load_bundle(path: str | Path, *, shards: list[str] | None = None) -> Bundle:
    """Read and verify a bundle. ``shards`` names the shards this tier will run (all by default);
    each must exist and match its sha256."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise BundleError(f"{path}: no {MANIFEST} (is this a bundle directory written by 'fogsplit export'?)")
    try:
        data = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_file}: not valid JSON ({exc})") from exc
    manifest = parse_manifest(data, str(manifest_file))
    wanted = manifest.shards if shards is None else [manifest.shard(n) for n in shards]
    for shard in wanted:
        file = path / shard.file
        if not file.is_file():
            raise BundleError(f"{file}: shard {shard.name!r} is missing")
        digest = sha256_file(file)
        if digest != shard.sha256:
            raise BundleError(f"{file}: sha256 {digest[:12]}... does not match the manifest's "
                              f"{shard.sha256[:12]}...; refusing a tampered or partial bundle")
    return Bundle(path=path, manifest=manifest)


def raw_codec(sensor: SensorSpec) -> CodecSpec:
    """How a raw sample of ``sensor`` travels in raw offload: as it is, in its own dtype."""
    return CodecSpec("uint8") if sensor.dtype == "uint8" else CodecSpec("fp32")


def expect_frames(manifest: Manifest) -> Expect:
    """What a tier running ``manifest`` accepts from the wire."""
    first = manifest.sensors[0]
    return Expect(
        model=manifest.model_id,
        sensors=tuple(manifest.sensor_names),
        shapes={SCORES: (manifest.num_classes,), FEATURE: manifest.feature_shape,
                FORWARD: manifest.forward_shape, RAW: tuple(first.shape)},
        codecs={SCORES: manifest.codecs["scores"], FEATURE: manifest.codecs["feature"],
                FORWARD: manifest.codecs["forward"], RAW: raw_codec(first)},
    )
