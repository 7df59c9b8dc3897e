"""The bundle: a directory with manifest.json, its signature manifest.sig, and the ONNX shards
it lists.

A tier loads only a verified bundle: manifest.json must carry a trusted signature
(:mod:`fogsplit.core.signing`, docs/signing.md), every shard it runs must match its sha256, and
the model id must match the manifest's content, so a frame from another model version is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal, Sequence

import msgspec
import numpy as np

from fogsplit.core.codecs import CodecSpec, payload_bytes
from fogsplit.core.errors import BundleError
from fogsplit.core.frames import FEATURE, FOG_ANSWER, FOG_SLICE, FORWARD, RAW, SCORES, Expect
from fogsplit.core.signing import SIGNATURE, PublicKey, verify_manifest
from fogsplit.core.validation import load

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TIERS = ("device", "gateway", "cloud")
FOG_TIER = "fog"          # optional: the edge part split over fog nodes (Manifest.fog, docs/eddl.md)
FUSIONS = ("max", "mean", "concat")
LOCAL_FUSIONS = ("max", "mean", "weighted")
Cut = Annotated[float, msgspec.Meta(ge=0, lt=1, description="a fraction in [0, 1)")]
Distance = Annotated[float, msgspec.Meta(ge=0, le=2, description="an L2 distance between unit vectors")]


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

    threshold: Distance       # between unit-norm keys
    hit_rate: float           # share of held-out events the cache answered
    hit_accuracy: float       # accuracy of those answers
    model_accuracy: float     # the model's accuracy on the same events
    queries: int


@dataclass(frozen=True)
class CacheSpec:
    """The semantic cache's calibration: one threshold per key space (fused gateway feature,
    a device's own feature), the neighbours it votes over and the agreement it needs."""

    k: Annotated[int, msgspec.Meta(ge=1, le=64)]
    min_agreement: Annotated[float, msgspec.Meta(gt=0.5, le=1)]
    quorum: Annotated[float, msgspec.Meta(gt=0, le=1)]   # share of an event's devices whose caches must hit
    max_accuracy_loss: Annotated[float, msgspec.Meta(ge=0, le=1)]
    gateway: CachePoint
    device: CachePoint

    def to_dict(self) -> dict:
        return asdict(self)


class ShardCompression(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    flops: int
    params: int
    flops_dense: int
    params_dense: int
    flops_cut: Cut
    params_cut: Cut


class CompressionReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The shape of ``Manifest.compression`` when pruning cut the network (kept a dict there)."""

    metric: Literal["flops", "params"]
    target: Cut
    flops_cut: Cut
    params_cut: Cut
    shards: dict[str, ShardCompression]


@dataclass(frozen=True)
class FogNodeSpec:
    """One fog node of the edge part (docs/eddl.md): its shard, the fused-feature channels it
    takes (its slice), the edge-feature channels it fills, the design's blocks it holds."""

    name: str
    shard: str
    channels: tuple[int, ...]
    features: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class FogSpec:
    """The edge part split over fog nodes (EDDL); absent: the gateway runs its own shard."""

    design: str
    nodes: tuple[FogNodeSpec, ...]
    slice_codec: CodecSpec     # gateway -> node: the slice of the fused feature
    answer_codec: CodecSpec    # node -> gateway: its part of the edge feature
    dense_flops: int = 0       # the dense edge part of the same widths, for comparison
    dense_params: int = 0

    def node(self, name: str) -> FogNodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise BundleError(f"fog node {name!r} is not in this bundle (it has {[n.name for n in self.nodes]})")


COMPRESSION_KEYS = tuple(CompressionReport.__struct_fields__)
SHARD_COMPRESSION_KEYS = tuple(ShardCompression.__struct_fields__)


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
    compression: dict = field(default_factory=dict)   # empty, or what pruning cut (a CompressionReport)
    schema: int = SCHEMA_VERSION
    cache: CacheSpec | None = None
    fog: FogSpec | None = None   # the edge part split over fog nodes (docs/eddl.md)
    fusion_weights: dict[str, float] = field(default_factory=dict)   # local_fusion "weighted": per sensor

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
        if self.fog is None:
            out.pop("fog")   # so that the ids of bundles without fog nodes stay the same
        else:
            out["fog"]["slice_codec"] = self.fog.slice_codec.to_dict()
            out["fog"]["answer_codec"] = self.fog.answer_codec.to_dict()
        if not self.fusion_weights:
            out.pop("fusion_weights")   # so that the ids of bundles written before it stay the same
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
    """Stamp the model id and write manifest.json (dropping the old manifest.sig, which no longer
    matches); returns the stamped manifest."""
    manifest = replace(manifest, model_id=compute_model_id(manifest))
    (Path(bundle_dir) / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    (Path(bundle_dir) / SIGNATURE).unlink(missing_ok=True)   # it signed the manifest just replaced
    return manifest


def parse_manifest(data: dict, source: str = MANIFEST) -> Manifest:
    """Build a :class:`Manifest` from JSON, refusing unknown or missing keys and bad values."""
    if not isinstance(data, dict):
        raise BundleError(f"{source}: the manifest must be an object")
    if data.get("schema") != SCHEMA_VERSION:
        raise BundleError(f"{source}: schema {data.get('schema')!r}, this version reads {SCHEMA_VERSION}")
    manifest = load(data, Manifest, source, BundleError, top="the manifest")
    if manifest.compression:
        load(manifest.compression, CompressionReport, source, BundleError, top="compression", prefix="compression")
    _check_consistency(manifest, source)
    return manifest


def _check_consistency(m: Manifest, source: str) -> None:
    if not m.sensors:
        raise BundleError(f"{source}: no sensors")
    for tier in TIERS:
        if not any(s.tier == tier for s in m.shards):
            raise BundleError(f"{source}: no {tier} shard")
    for s in m.shards:
        if s.tier not in TIERS and s.tier != FOG_TIER:
            raise BundleError(f"{source}: shard {s.name!r} has unknown tier {s.tier!r}")
        if Path(s.file).name != s.file:
            raise BundleError(f"{source}: shard file {s.file!r} must be a plain file name")
    for sensor in m.sensors:
        if not any(s.tier == "device" and s.sensor == sensor.name for s in m.shards):
            raise BundleError(f"{source}: sensor {sensor.name!r} has no device shard")
    if m.local_fusion not in LOCAL_FUSIONS or m.edge_fusion not in FUSIONS:
        raise BundleError(f"{source}: fusion {m.local_fusion!r}/{m.edge_fusion!r} is not supported")
    _check_fusion_weights(m, source)
    for tier in ("local", "edge"):
        t = m.thresholds.get(tier)
        if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise BundleError(f"{source}: exit threshold {tier!r} must be a number in [0, 1], got {t!r}")
    for stream in ("scores", "feature", "forward"):
        if stream not in m.codecs:
            raise BundleError(f"{source}: no codec for {stream!r}")
    _check_compression(m, source)
    _check_fog(m, source)
    if compute_model_id(m) != m.model_id:
        raise BundleError(f"{source}: model id {m.model_id!r} does not match the manifest's content")


def _check_fusion_weights(m: Manifest, source: str) -> None:
    """``weighted`` local fusion names a finite weight >= 0 for every sensor, not all zero."""
    if m.local_fusion != "weighted":
        if m.fusion_weights:
            raise BundleError(f"{source}: fusion_weights are given but local_fusion is {m.local_fusion!r}")
        return
    w = m.fusion_weights
    if set(w) != set(m.sensor_names):
        raise BundleError(f"{source}: fusion_weights must name every sensor {m.sensor_names}, got {sorted(w)}")
    bad = {k: v for k, v in w.items() if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0}
    if bad or not any(w.values()):
        raise BundleError(f"{source}: fusion_weights must be finite numbers >= 0, not all 0; got {bad or w}")


def _check_compression(m: Manifest, source: str) -> None:
    """Pruning's report (its shape checked by :class:`CompressionReport`) covers every shard."""
    shards = m.compression.get("shards", {})
    if m.compression and set(shards) != {s.name for s in m.shards}:
        raise BundleError(f"{source}: compression must describe every shard, got {sorted(shards)}")


def _check_fog(m: Manifest, source: str) -> None:
    """Every fog node has a fog shard; slices lie in the fused feature; the nodes' features
    fill the edge feature exactly once."""
    if m.fog is None:
        if any(s.tier == FOG_TIER for s in m.shards):
            raise BundleError(f"{source}: fog shards without a fog section")
        return
    fused = m.tier_shard("gateway").inputs["fused"][1]
    edge = m.forward_shape[0]
    filled: list[int] = []
    for node in m.fog.nodes:
        if not any(s.name == node.shard and s.tier == FOG_TIER for s in m.shards):
            raise BundleError(f"{source}: fog node {node.name!r} names shard {node.shard!r}, which is no fog shard")
        if not node.channels or any(not 0 <= c < fused for c in node.channels):
            raise BundleError(f"{source}: fog node {node.name!r} takes channels outside the fused feature's {fused}")
        filled += node.features
    if not m.fog.nodes or sorted(filled) != list(range(edge)):
        raise BundleError(f"{source}: the fog nodes' features must fill the edge feature's {edge} channels once")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk; ``signed_by`` is the id of the key that signed it, or None
    for an unsigned bundle loaded under ``allow_unsigned``."""

    path: Path
    manifest: Manifest
    signed_by: str | None = None

    def shard_path(self, shard: ShardSpec) -> Path:
        return self.path / shard.file


def load_bundle(path: str | Path, *, shards: list[str] | None = None,
                trusted_keys: Sequence[Path | PublicKey] = (), allow_unsigned: bool = False) -> Bundle:
    """Read and verify a bundle: first manifest.json's signature by one of ``trusted_keys``
    (an unsigned bundle only with ``allow_unsigned``; a signed one is always checked), then the
    manifest itself, then each shard in ``shards`` (all by default): it must exist and match its
    sha256. A refused signature raises :class:`~fogsplit.core.signing.SignatureError`."""
    path = Path(path)
    raw = _read_manifest(path)
    unsigned_allowed = allow_unsigned and not (path / SIGNATURE).exists()
    signed_by = None if unsigned_allowed else verify_manifest(path, raw, trusted_keys)
    manifest = _parse_bytes(raw, path / MANIFEST)
    _check_shards(path, manifest, shards)
    return Bundle(path=path, manifest=manifest, signed_by=signed_by)


def check_bundle_contents(path: str | Path) -> Manifest:
    """The manifest of ``path`` with every shard checked against it, its signature left aside:
    what ``fogsplit sign`` checks before it signs. Services take a :class:`Bundle`, which only
    :func:`load_bundle` makes."""
    path = Path(path)
    raw = _read_manifest(path)
    manifest = _parse_bytes(raw, path / MANIFEST)
    _check_shards(path, manifest, None)
    return manifest


def _read_manifest(path: Path) -> bytes:
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise BundleError(f"{path}: no {MANIFEST} (is this a bundle directory written by 'fogsplit export'?)")
    try:
        return manifest_file.read_bytes()
    except OSError as exc:
        raise BundleError(f"{manifest_file}: cannot read it ({exc.strerror or exc})") from None


def _parse_bytes(raw: bytes, manifest_file: Path) -> Manifest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_file}: not valid JSON ({exc})") from exc
    return parse_manifest(data, str(manifest_file))


def _check_shards(path: Path, manifest: Manifest, shards: list[str] | None) -> None:
    wanted = manifest.shards if shards is None else [manifest.shard(n) for n in shards]
    for shard in wanted:
        file = path / shard.file
        if not file.is_file():
            raise BundleError(f"{file}: shard {shard.name!r} is missing")
        digest = sha256_file(file)
        if digest != shard.sha256:
            raise BundleError(f"{file}: sha256 {digest[:12]}... does not match the manifest's "
                              f"{shard.sha256[:12]}...; refusing a tampered or partial bundle")


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
        raw={s.name: (tuple(s.shape), raw_codec(s)) for s in manifest.sensors},
    )


def expect_fog(manifest: Manifest, node: str) -> Expect:
    """What fog node ``node`` accepts (its slice), and what the gateway accepts from it (its answer)."""
    fog = manifest.fog
    if fog is None:
        raise BundleError("this bundle has no fog section")
    spec = fog.node(node)
    fused = manifest.tier_shard("gateway").inputs["fused"]
    return Expect(
        model=manifest.model_id,
        shapes={FOG_SLICE: (len(spec.channels), *fused[2:]),
                FOG_ANSWER: tuple(manifest.shard(spec.shard).outputs["feature"][1:]), SCORES: (manifest.num_classes,)},
        codecs={FOG_SLICE: fog.slice_codec, FOG_ANSWER: fog.answer_codec, SCORES: CodecSpec("fp32")},
    )
