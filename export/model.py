"""The multi-exit DDNN (Teerapittayanon et al., 2017) split into the shards that fogsplit deploys.

::

    device k:  x_k --DeviceShard_k--> (device exit logits, feature_k)    # both sent up
    gateway:   fuse_scores(device logits) -> local exit
               fuse_features(feature_1..K) --GatewayShard--> (edge exit logits, edge feature)
    cloud:     edge feature --CloudShard--> cloud exit logits

Every shard is a plain feed-forward module without data-dependent control flow, so that it
exports to ONNX (opset 17) as is. The fusion steps are not inside any shard: the gateway runs
them in numpy with exactly the semantics of :func:`fuse_scores` and :func:`fuse_features`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from fogsplit.core.dataset import Dataset

KINDS = ("image", "series")
SCORE_FUSIONS = ("max", "mean")
FEATURE_FUSIONS = ("max", "mean", "concat")

TRUNK_CHANNELS = 16         # width of the first device conv block
HIDDEN_CHANNELS = 32        # width of the second device conv block
EDGE_CHANNELS = 8           # edge-feature channels per device (concat) ...
EDGE_CHANNELS_POOLED = 16   # ... or in all (max/mean fusion)
CLOUD_CHANNELS = 16         # cloud conv channels per device (concat) ...
CLOUD_CHANNELS_POOLED = 32  # ... or in all (max/mean fusion)


MIN_SIZE = 4                           # the shortest series, the smallest image side
MAX_FEATURE_GRID = {"series": 32, "image": 8}   # the feature's spatial size, at most, per axis


def _down4(size: int) -> int:
    """Size after the device trunk: a stride-2 conv, then a 2x max pooling (ceil mode)."""
    return -(-(-(-size // 2)) // 2)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the architecture (and so the shapes of the exported shards).

    ``sample_shape`` is one shape ``(C, T)`` / ``(C, H, W)`` that all sensors share, or one per
    sensor (their channels and sizes may differ; their kind may not). The device trunk divides
    each size by 4 (rounding up); where the sensors' trunk outputs differ, or exceed
    :data:`MAX_FEATURE_GRID`, a fixed averaging map inside the device shard brings every device
    to one feature grid, the smallest of them (``feature_shape``): the pooling plan, decided
    here at export and visible in the shards' shapes in the manifest.
    """

    sensors: tuple[str, ...]
    kind: str
    sample_shape: tuple
    num_classes: int
    feature_channels: int = 4
    local_fusion: str = "max"
    edge_fusion: str = "concat"
    binary_feature: bool = False   # the device sends sign(feature): DDNN's binarized trunk
    shapes: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.sensors:
            raise ValueError("at least one sensor is needed")
        per_sensor = bool(self.sample_shape) and isinstance(self.sample_shape[0], (tuple, list))
        shapes = tuple(tuple(int(d) for d in s) for s in self.sample_shape) if per_sensor \
            else (tuple(int(d) for d in self.sample_shape),) * len(self.sensors)
        if len(shapes) != len(self.sensors):
            raise ValueError(f"{len(shapes)} sample shapes for {len(self.sensors)} sensors")
        dims = 3 if self.kind == "image" else 2
        for name, shape in zip(self.sensors, shapes):
            if len(shape) != dims:
                raise ValueError(f"a {self.kind} sample is {dims}-dimensional ([C, ...]), "
                                 f"sensor {name!r} has {shape}")
            if shape[0] < 1 or any(d < MIN_SIZE for d in shape[1:]):
                raise ValueError(f"sensor {name!r}: sample shape {shape} needs >= 1 channel and sizes "
                                 f">= {MIN_SIZE}")
        object.__setattr__(self, "shapes", shapes)
        if self.num_classes < 2 or self.feature_channels < 1:
            raise ValueError("num_classes must be >= 2 and feature_channels >= 1")
        if self.local_fusion not in SCORE_FUSIONS:
            raise ValueError(f"local_fusion must be one of {SCORE_FUSIONS}, "
                             f"got {self.local_fusion!r}")
        if self.edge_fusion not in FEATURE_FUSIONS:
            raise ValueError(f"edge_fusion must be one of {FEATURE_FUSIONS}, "
                             f"got {self.edge_fusion!r}")

    @classmethod
    def for_dataset(cls, ds: Dataset, **overrides) -> "ModelSpec":
        values = dict(sensors=tuple(ds.sensor_names), kind=ds.kind,
                      sample_shape=tuple(ds.shapes.values()), num_classes=ds.num_classes)
        values.update(overrides)
        return cls(**values)

    def shape_of(self, sensor: str) -> tuple[int, ...]:
        return self.shapes[self.sensors.index(sensor)]

    def trunk_grid(self, sensor: str) -> tuple[int, ...]:
        """Spatial size of ``sensor``'s trunk output (its size / 4, rounded up)."""
        return tuple(_down4(d) for d in self.shape_of(sensor)[1:])

    @property
    def feature_grid(self) -> tuple[int, ...]:
        """The spatial size every device's feature is brought to: the smallest trunk output,
        capped at :data:`MAX_FEATURE_GRID`."""
        grids = [self.trunk_grid(s) for s in self.sensors]
        return tuple(min(min(axis), MAX_FEATURE_GRID[self.kind]) for axis in zip(*grids))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one device's feature (what a device sends)."""
        return (self.feature_channels, *self.feature_grid)

    @property
    def fused_channels(self) -> int:
        k = len(self.sensors) if self.edge_fusion == "concat" else 1
        return k * self.feature_channels

    @property
    def groups(self) -> int:
        """Convolution groups of the gateway and the cloud: one per device for ``concat``.

        The devices' views are not spatially aligned (the object sits anywhere in each image),
        so mixing devices position by position means nothing: with ``concat`` each device's
        channels are processed on their own and devices meet only in the pooled classifiers.
        """
        return len(self.sensors) if self.edge_fusion == "concat" else 1

    @property
    def edge_channels(self) -> int:
        return EDGE_CHANNELS * self.groups if self.groups > 1 else EDGE_CHANNELS_POOLED

    @property
    def cloud_channels(self) -> int:
        return CLOUD_CHANNELS * self.groups if self.groups > 1 else CLOUD_CHANNELS_POOLED

    @property
    def edge_feature_shape(self) -> tuple[int, ...]:
        """Shape of the edge feature (what the gateway sends to the cloud): the feature grid
        halved, rounding up."""
        return (self.edge_channels, *(-(-g // 2) for g in self.feature_grid))


def _layers(kind: str) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if kind == "image":
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d
    return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d


def _conv_block(kind: str, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1,
                groups: int = 1, pool: bool = False) -> nn.Sequential:
    """Conv, optional 2x max pooling, BatchNorm, ReLU (pooling first: 4x less normalising)."""
    conv, norm, maxpool = _layers(kind)
    layers = [conv(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups,
                   bias=False)]
    if pool:
        layers.append(maxpool(2, ceil_mode=True))
    return nn.Sequential(*layers, norm(c_out), nn.ReLU())


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.where(x > 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class BinarizeSTE(nn.Module):
    """+1 where x > 0, else -1; trained through with the straight-through estimator (the
    gradient of hardtanh), as in DDNN's binarized device trunk. The 1-bit ``sign`` codec then
    carries exactly what the gateway was trained on."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return _SignSTE.apply(x)
        return torch.where(x > 0, 1.0, -1.0).to(x.dtype)


def _global_pool(x: Tensor) -> Tensor:
    """``[B, C, ...]`` -> ``[B, 2C]``: max and mean over all positions (position-invariant)."""
    flat = x.flatten(2)
    return torch.cat([flat.amax(dim=2), flat.mean(dim=2)], dim=1)


def bin_average(size_in: int, size_out: int) -> Tensor:
    """``[size_in, size_out]``: column j averages the inputs of bin j (adaptive average pooling
    as a matrix, so that it exports to ONNX as a MatMul for any two sizes)."""
    matrix = torch.zeros(size_in, size_out)
    for j in range(size_out):
        lo, hi = (j * size_in) // size_out, -(-((j + 1) * size_in) // size_out)
        matrix[lo:hi, j] = 1.0 / (hi - lo)
    return matrix


class Regrid(nn.Module):
    """Average-pools the spatial axes of ``[B, C, ...]`` from one size to another by fixed bins."""

    def __init__(self, size_in: tuple[int, ...], size_out: tuple[int, ...]) -> None:
        super().__init__()
        self.axes = len(size_in)
        for axis, (a, b) in enumerate(zip(size_in, size_out)):
            self.register_buffer(f"bins{axis}", bin_average(a, b))

    def forward(self, x: Tensor) -> Tensor:
        x = x @ getattr(self, f"bins{self.axes - 1}")
        if self.axes == 2:
            x = (x.transpose(-1, -2) @ self.bins0).transpose(-1, -2)
        return x


class DeviceShard(nn.Module):
    """What one sensor device runs: normalise, two conv blocks, a projection to the feature.

    The trunk downsamples by 4: a strided conv block, then a conv block with max pooling. The
    device exit classifies the globally pooled trunk output (objects may be anywhere in the
    view); the feature sent upstream is a conv projection of the same map to
    ``feature_channels``, on the spec's common feature grid (``spec.feature_shape``; a
    :class:`Regrid` brings the trunk output there when this sensor's size differs).

    Takes raw sensor values as float32 ``[B, C, ...]`` (uint8 images just cast); the
    per-channel ``mean``/``std`` buffers hold the training-data statistics (set by ``train``),
    so no device can forget or misapply them. A NaN (a missing value, or the end of a shorter
    series) becomes 0 after normalising: the channel's training mean.
    """

    def __init__(self, spec: ModelSpec, sensor: str) -> None:
        super().__init__()
        shape = spec.shape_of(sensor)
        stats_shape = (1, shape[0], *([1] * (len(shape) - 1)))
        self.register_buffer("mean", torch.zeros(stats_shape))
        self.register_buffer("std", torch.ones(stats_shape))
        kernel = 3 if spec.kind == "image" else 5
        self.trunk = nn.Sequential(
            _conv_block(spec.kind, shape[0], TRUNK_CHANNELS, kernel=kernel, stride=2),
            _conv_block(spec.kind, TRUNK_CHANNELS, HIDDEN_CHANNELS, kernel=kernel, pool=True))
        grid = tuple(_down4(d) for d in shape[1:])
        self.regrid = Regrid(grid, spec.feature_grid) if grid != spec.feature_grid else nn.Identity()
        self.project = _conv_block(spec.kind, HIDDEN_CHANNELS, spec.feature_channels, kernel=kernel)
        if spec.binary_feature:
            self.project[-1] = BinarizeSTE()
        self.exit = nn.Linear(2 * HIDDEN_CHANNELS, spec.num_classes)

    def set_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-channel statistics ``[C]`` of the raw input."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).reshape(self.mean.shape))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).reshape(self.std.shape))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        normalized = (x - self.mean) / self.std
        hidden = self.trunk(torch.where(torch.isnan(x), torch.zeros_like(x), normalized))
        return self.exit(_global_pool(hidden)), self.project(self.regrid(hidden))


class GatewayShard(nn.Module):
    """Conv block on the fused device features; edge exit plus the edge feature for the cloud."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.block = _conv_block(spec.kind, spec.fused_channels, spec.edge_channels,
                                 groups=spec.groups, pool=True)
        self.exit = nn.Linear(2 * spec.edge_channels, spec.num_classes)

    def forward(self, fused_feature: Tensor) -> tuple[Tensor, Tensor]:
        edge_feature = self.block(fused_feature)
        return self.exit(_global_pool(edge_feature)), edge_feature


class CloudShard(nn.Module):
    """Conv block, global pooling, linear classifier."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.block = _conv_block(spec.kind, spec.edge_channels, spec.cloud_channels,
                                 groups=spec.groups)
        self.exit = nn.Linear(2 * spec.cloud_channels, spec.num_classes)

    def forward(self, edge_feature: Tensor) -> Tensor:
        return self.exit(_global_pool(self.block(edge_feature)))


@dataclass
class Exits:
    """Logits of every exit. ``device[:, k]`` is meaningless where device k is absent."""

    device: Tensor   # [B, K, classes]
    local: Tensor    # [B, classes]
    edge: Tensor     # [B, classes]
    cloud: Tensor    # [B, classes]


def _mask_like(present: Tensor, values: Tensor) -> Tensor:
    """``present`` [B, K] broadcastable against ``values`` [B, K, ...]."""
    return present.reshape(*present.shape, *([1] * (values.dim() - 2)))


def fuse_scores(scores: Tensor, present: Tensor, mode: str) -> Tensor:
    """Fuse device exit logits ``[B, K, C]`` into local exit logits ``[B, C]``.

    ``max``: element-wise maximum over the present devices; ``mean``: average over the present
    devices. Absent devices never contribute. Every sample must have a present device.
    """
    return _fuse_present(scores, present, mode)


def fuse_features(features: Tensor, present: Tensor, mode: str) -> Tensor:
    """Fuse device features ``[B, K, F, ...]`` into the gateway input.

    ``max`` / ``mean``: over the present devices only, giving ``[B, F, ...]``. ``concat``:
    ``[B, K*F, ...]`` with the devices' channels in sensor order and zeros for absent devices.
    """
    if mode == "concat":
        kept = features * _mask_like(present, features).to(features.dtype)
        return kept.flatten(1, 2)
    return _fuse_present(features, present, mode)


def _fuse_present(values: Tensor, present: Tensor, mode: str) -> Tensor:
    mask = _mask_like(present, values)
    if mode == "max":
        return values.masked_fill(~mask, float("-inf")).amax(dim=1)
    if mode == "mean":
        weights = mask.to(values.dtype)
        return (values * weights).sum(dim=1) / weights.sum(dim=1)
    raise ValueError(f"unknown fusion mode {mode!r}")


class DDNN(nn.Module):
    """All shards together, for training and evaluation in one process.

    Weights are initialised from torch's global RNG: call ``torch.manual_seed`` first for a
    reproducible model.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.devices = nn.ModuleDict({name: DeviceShard(spec, name) for name in spec.sensors})
        self.gateway = GatewayShard(spec)
        self.cloud = CloudShard(spec)

    def forward(self, x: Tensor | Sequence[Tensor], present: Tensor) -> Exits:
        """``x``: each sensor's float32 ``[B, C, ...]`` in sensor order (or, when they share one
        shape, all of them stacked ``[B, K, C, ...]``); ``present`` bool ``[B, K]``."""
        xs = x.unbind(1) if isinstance(x, Tensor) else x
        outputs = [shard(xk) for xk, shard in zip(xs, self.devices.values())]
        scores = torch.stack([s for s, _ in outputs], dim=1)
        features = torch.stack([f for _, f in outputs], dim=1)
        present = present.to(torch.bool)
        edge, edge_feature = self.gateway(fuse_features(features, present, self.spec.edge_fusion))
        return Exits(device=scores, local=fuse_scores(scores, present, self.spec.local_fusion),
                     edge=edge, cloud=self.cloud(edge_feature))
