"""Built-in, procedurally generated multi-sensor data sets (numpy only).

Both generators model the DDNN setting (Teerapittayanon et al., 2017): several cheap sensors
observe the same event, each one is often uninformative on its own (the object is out of its
view, the device is loose), and only the fused evidence is reliable. They are tuned (with
``fogsplit.export.model.DDNN`` trained 8-12 epochs) so that the best single sensor stays at
about 0.75-0.78 test accuracy while all sensors fused reach about 0.98. The single-sensor
ceiling is set mostly by ``CameraRig.visibility`` and ``ImuRig.idle``: raise those with care.

Everything is drawn from one ``numpy.random.Generator`` seeded by ``seed``: the same arguments
always give the same arrays.

Difficulty comes from per-sensor causes that fusion can undo (visibility, scale, squash,
lighting, noise, idle devices), never from per-event ambiguity that no amount of fusion could
resolve. Keep it that way when changing the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from fogsplit.core.dataset import Dataset, load_npz, make_dataset
from fogsplit.core.errors import DataError
from fogsplit.export.uea import is_uea, load_uea

IMAGE_SIZE = 32
SHAPES = ("disc", "triangle", "cross", "ring", "crescent",
          "tee", "square", "bar", "star", "frame")
ACTIVITIES = ("walk", "run", "stairs", "cycle", "jump", "wave")

_RENDER_CHUNK = 1024


# --------------------------------------------------------------------------- images: shapes

def shape_distance(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance-like field of ``SHAPES[shape]`` in object coordinates (negative inside).

    Every shape fits in the unit circle, so its on-screen size is set by the view's ``scale``.
    """
    name = SHAPES[shape]
    r = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    if name == "disc":
        return r - 1.0
    if name == "square":
        return np.maximum(au, av) - 0.75
    if name == "triangle":
        edges = [np.cos(a) * u + np.sin(a) * v for a in (np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6)]
        return np.maximum.reduce(edges) - 0.5
    if name == "cross":
        return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    if name == "ring":
        return np.abs(r - 0.72) - 0.28
    if name == "crescent":
        return np.maximum(r - 1.0, 0.8 - np.hypot(u - 0.5, v))
    if name == "bar":
        return np.maximum(au - 1.0, av - 0.32)
    if name == "tee":
        top = np.maximum(au - 0.9, np.abs(v + 0.6) - 0.25)
        stem = np.maximum(au - 0.25, np.abs(v - 0.2) - 0.75)
        return np.minimum(top, stem)
    if name == "star":
        return r - (0.62 + 0.38 * np.cos(5 * np.arctan2(v, u)))
    if name == "frame":
        return np.abs(np.maximum(au, av) - 0.6) - 0.18
    raise ValueError(f"unknown shape {name!r}")


@dataclass
class ViewParams:
    """Everything that decides one rendered view, one row per view (arrays of length M).

    Rendering is a pure function of these plus the pixel noise, so a sequence of frames of the
    same object is made by sampling once and perturbing ``center``/``rotation``/``light``.
    Coordinates are in the image's [-1, 1] square, y pointing down.
    """

    shape: np.ndarray          # [M] int, index into SHAPES
    center: np.ndarray         # [M, 2]; far outside [-1, 1] means the object is out of view
    scale: np.ndarray          # [M] object radius
    rotation: np.ndarray       # [M] radians
    squash: np.ndarray         # [M] in (0, 1]: foreshortening of an oblique view
    squash_axis: np.ndarray    # [M] radians
    color: np.ndarray          # [M, 3] object albedo in [0, 1]
    shading: np.ndarray        # [M, 2] light gradient across the object
    background: np.ndarray     # [M, 3] background base colour
    gradient: np.ndarray       # [M, 2] background illumination gradient
    blobs: np.ndarray          # [M, B, 6] clutter blobs: x, y, sigma, r, g, b offsets
    parts: np.ndarray          # [M, D, 8] distractor parts: x0, y0, x1, y1, width, r, g, b
    exposure: np.ndarray       # [M] global brightness factor
    noise: np.ndarray          # [M] pixel noise std in [0, 1] units

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    def take(self, index: np.ndarray | slice) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _grid() -> tuple[np.ndarray, np.ndarray]:
    ticks = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE * 2 - 1
    yy, xx = np.meshgrid(ticks, ticks, indexing="ij")
    return xx[None], yy[None]


def _object_coords(p: ViewParams, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map image coordinates into each view's object frame (inverse of the view's affine map)."""
    def rot(a: np.ndarray) -> np.ndarray:
        c, s = np.cos(a), np.sin(a)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)

    unsquash = np.zeros((len(p), 2, 2))
    unsquash[:, 0, 0] = 1.0
    unsquash[:, 1, 1] = 1.0 / p.squash
    inv = rot(-p.rotation) @ rot(p.squash_axis) @ unsquash @ rot(-p.squash_axis)
    inv = (inv / p.scale[:, None, None]).astype(np.float32)
    dx = xx - p.center[:, 0, None, None].astype(np.float32)
    dy = yy - p.center[:, 1, None, None].astype(np.float32)
    u = inv[:, 0, 0, None, None] * dx + inv[:, 0, 1, None, None] * dy
    v = inv[:, 1, 0, None, None] * dx + inv[:, 1, 1, None, None] * dy
    return u, v


def _coverage(distance_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a pixel from a signed distance in pixels."""
    return np.clip(0.5 - distance_px, 0.0, 1.0)


def _render_chunk(p: ViewParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Clutter, the object over it, then exposure and sensor noise."""
    p = ViewParams(**{f.name: (getattr(p, f.name) if f.name == "shape" else
                               getattr(p, f.name).astype(np.float32)) for f in fields(p)})
    xx, yy = _grid()
    image = _clutter(p, xx, yy)
    alpha, lit = _object(p, xx, yy)
    image += alpha[:, None] * (lit - image)
    image *= (p.exposure * 255)[:, None, None, None]
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += noise * (p.noise * 255)[:, None, None, None]
    pixels = np.clip(image, 0, 255, out=image).round(out=image).astype(np.uint8)
    return pixels, alpha.mean(axis=(1, 2))


def _clutter(p: ViewParams, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Background ``[M, 3, H, W]``: lit base colour, soft blobs, distractor parts (capsules)."""
    light = 1 + p.gradient[:, 0, None, None] * xx + p.gradient[:, 1, None, None] * yy
    image = p.background[:, :, None, None] * light[:, None]
    image += _blobs(p.blobs, xx[0, 0])
    for d in range(p.parts.shape[1]):
        rows = np.flatnonzero(p.parts[:, d, 4] > 0)
        dist = _segment_distance(p.parts[rows, d, :4], xx, yy) - p.parts[rows, d, 4, None, None]
        alpha = _coverage(dist * IMAGE_SIZE / 2)[:, None]
        image[rows] += alpha * (p.parts[rows, d, 5:, None, None] - image[rows])
    return image


def _object(p: ViewParams, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object's coverage ``[M, H, W]`` and its shaded colour ``[M, 3, H, W]``."""
    u, v = _object_coords(p, xx, yy)
    sd = np.empty((len(p), IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for shape in np.unique(p.shape):
        rows = p.shape == shape
        sd[rows] = shape_distance(int(shape), u[rows], v[rows])
    alpha = _coverage(sd * (p.scale * IMAGE_SIZE / 2)[:, None, None])
    shade = 1 + p.shading[:, 0, None, None] * u + p.shading[:, 1, None, None] * v
    return alpha, p.color[:, :, None, None] * shade[:, None]


def _blobs(blobs: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """Colour blobs ``[M, 3, H, W]`` from ``[M, B, (x, y, sigma, r, g, b)]``, separably."""
    m, b = blobs.shape[:2]
    scale = 1 / (2 * blobs[:, :, 2, None] ** 2)
    gx = np.exp(-(ticks - blobs[:, :, 0, None]) ** 2 * scale)
    gy = np.exp(-(ticks - blobs[:, :, 1, None]) ** 2 * scale)
    bumps = (gy[:, :, :, None] * gx[:, :, None, :]).reshape(m, b, -1)
    return (blobs[:, :, 3:].transpose(0, 2, 1) @ bumps).reshape(m, 3, IMAGE_SIZE, IMAGE_SIZE)


def _segment_distance(seg: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the segments ``[M, (x0, y0, x1, y1)]``."""
    dx = xx - seg[:, 0, None, None]
    dy = yy - seg[:, 1, None, None]
    sx = (seg[:, 2] - seg[:, 0])[:, None, None]
    sy = (seg[:, 3] - seg[:, 1])[:, None, None]
    t = np.clip((dx * sx + dy * sy) / (sx ** 2 + sy ** 2), 0, 1)
    ex, ey = dx - t * sx, dy - t * sy
    return np.sqrt(ex * ex + ey * ey)


def render_views(params: ViewParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render views as uint8 ``[M, 3, 32, 32]``; also return the object's pixel coverage ``[M]``.

    A coverage of 0 means the object is entirely out of view: that image carries no information
    about the class, only clutter.
    """
    images, coverage = [], []
    for start in range(0, len(params), _RENDER_CHUNK):
        img, cov = _render_chunk(params.take(slice(start, start + _RENDER_CHUNK)), rng)
        images.append(img)
        coverage.append(cov)
    return np.concatenate(images), np.concatenate(coverage)


def render_view(shape: int, rng: np.random.Generator, **params: float | np.ndarray) -> np.ndarray:
    """One view ``[3, 32, 32]`` of ``SHAPES[shape]``; ``params`` override its ViewParams fields.

    E.g. ``render_view(2, rng, center=(0.1, -0.2), rotation=0.5, exposure=1.0)``.
    """
    view = sample_views(np.array([shape]), np.ones(1, bool), np.array([0.42]), rng)
    for name, value in params.items():
        current = getattr(view, name)
        setattr(view, name, np.asarray(value, dtype=current.dtype).reshape(current.shape))
    return render_views(view, rng)[0][0]


def sample_views(shape: np.ndarray, visible: np.ndarray, scale: np.ndarray,
                 rng: np.random.Generator, *, max_parts: int = 2,
                 noise: tuple[float, float] = (0.02, 0.06),
                 squash: tuple[float, float] = (0.8, 1.0), reach: float = 0.75) -> ViewParams:
    """Draw pose, lighting and clutter for views of objects of class ``shape``.

    ``visible`` (bool [M]) decides whether the object is in the frame: a visible object's
    centre may sit near the border (so it can be cut), an invisible one is placed well outside.
    ``scale`` [M] is the nominal object radius (camera distance); it is jittered here.
    """
    m = shape.shape[0]
    scale = scale * rng.uniform(0.8, 1.2, m)
    center = rng.uniform(-reach, reach, (m, 2))
    away = rng.uniform(0, 2 * np.pi, m)
    outside = np.stack([np.cos(away), np.sin(away)], 1) * (2.0 + scale[:, None] * 2)
    center = np.where(visible[:, None], center, outside)
    blobs = np.concatenate([rng.uniform(-1, 1, (m, 3, 2)), rng.uniform(0.15, 0.5, (m, 3, 1)),
                            rng.uniform(-0.15, 0.15, (m, 3, 3))], axis=2)
    start = rng.uniform(-1, 1, (m, max_parts, 2))
    angle = rng.uniform(0, 2 * np.pi, (m, max_parts))
    length = rng.uniform(0.2, 0.7, (m, max_parts, 1))
    end = start + length * np.stack([np.cos(angle), np.sin(angle)], -1)
    width = rng.uniform(0.04, 0.12, (m, max_parts, 1))
    width = np.where(rng.random((m, max_parts, 1)) < 0.5, width, -1.0)   # negative: no part
    parts = np.concatenate([start, end, width, rng.uniform(0.2, 0.8, (m, max_parts, 3))], 2)
    return ViewParams(
        shape=shape.astype(np.int64),
        center=center,
        scale=scale,
        rotation=rng.uniform(0, 2 * np.pi, m),
        squash=rng.uniform(*squash, m),
        squash_axis=rng.uniform(0, np.pi, m),
        color=rng.uniform(0.45, 1.0, (m, 3)),
        shading=rng.uniform(-0.3, 0.3, (m, 2)),
        background=rng.uniform(0.05, 0.4, (m, 1)) + rng.uniform(-0.08, 0.08, (m, 3)),
        gradient=rng.uniform(-0.3, 0.3, (m, 2)),
        blobs=blobs,
        parts=parts,
        exposure=rng.uniform(0.6, 1.3, m),
        noise=rng.uniform(*noise, m).astype(np.float32),
    )


@dataclass(frozen=True)
class CameraRig:
    """Fixed per-camera properties of the multi-view scene (near cameras see less of the area)."""

    scale: np.ndarray        # [K] nominal object radius in each camera
    visibility: np.ndarray   # [K] probability that the object is in each camera's frame

    @classmethod
    def default(cls, cameras: int) -> "CameraRig":
        return cls(scale=np.linspace(0.5, 0.36, cameras),
                   visibility=np.linspace(0.7, 0.78, cameras))


def multiview_scene(labels: np.ndarray, rig: CameraRig,
                    rng: np.random.Generator) -> list[ViewParams]:
    """Views of one object per event from every camera of ``rig``, one :class:`ViewParams` each.

    The object's colour is a property of the object, so it is shared by all cameras; everything
    else (visibility, position, pose, light, clutter, noise) is drawn per camera.
    """
    n, k = labels.shape[0], rig.scale.shape[0]
    color = rng.uniform(0.45, 1.0, (n, 3))
    visible = rng.random((n, k)) < rig.visibility
    views = []
    for cam in range(k):
        view = sample_views(labels, visible[:, cam], np.full(n, rig.scale[cam]), rng)
        views.append(replace(view, color=color))
    return views


def multiview_images(n_events: int = 4000, cameras: int = 6, num_classes: int = 6, seed: int = 0,
                     test_fraction: float = 0.2, rig: CameraRig | None = None) -> Dataset:
    """The DDNN multi-view scenario: ``cameras`` cameras (``cam0``...) look at one object.

    Each camera sees the object from its own distance and angle, with its own lighting, clutter
    and noise; with probability ``1 - rig.visibility[k]`` the object is outside camera k's frame
    and it sees only clutter (which includes bar-like distractor parts). Images are uint8
    ``[N, 3, 32, 32]``; classes are the first ``num_classes`` of :data:`SHAPES`.
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 2..{len(SHAPES)}, got {num_classes}")
    if cameras < 1:
        raise ValueError(f"cameras must be >= 1, got {cameras}")
    rig = rig or CameraRig.default(cameras)
    if rig.scale.shape != (cameras,) or rig.visibility.shape != (cameras,):
        raise ValueError(f"the camera rig does not describe {cameras} cameras")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n_events)
    views = multiview_scene(labels, rig, rng)
    sensors = {f"cam{k}": render_views(view, rng)[0] for k, view in enumerate(views)}
    return make_dataset(sensors, labels, split=_split(n_events, test_fraction, rng),
                        classes=list(SHAPES[:num_classes]), name="multiview_images",
                        source="multiview_images")


# --------------------------------------------------------------------------- IMU time series

SAMPLE_RATE = 32.0   # Hz
# Cadence range (Hz) of each activity; it belongs to the event, so all devices agree on it.
CADENCE = {"walk": (1.6, 2.0), "run": (2.5, 3.0), "stairs": (1.1, 1.4), "cycle": (0.9, 1.3),
           "jump": (1.0, 1.3), "wave": (2.0, 2.8)}


def _walk(w: np.ndarray, a: np.ndarray) -> tuple:
    up = 0.35 * a * np.sin(w) + 0.12 * np.sin(2 * w)
    return 0.25 * a * np.sin(w + 1.2), 0.12 * a * np.sin(w / 2), up, 0.0


def _run(w: np.ndarray, a: np.ndarray) -> tuple:
    impact = np.abs(np.sin(w / 2)) ** 4
    return 0.4 * a * np.sin(w), 0.2 * a * np.sin(w / 2), a * (2.2 * impact - 0.8), 0.15


def _stairs(w: np.ndarray, a: np.ndarray) -> tuple:
    up = 0.3 * a * (np.sin(w) + 0.6 * np.sin(3 * w))
    return 0.2 * a * np.sin(w + 2.0), 0.1 * a * np.sin(w / 2), up, 0.45


def _cycle(w: np.ndarray, a: np.ndarray) -> tuple:
    return 0.35 * a * np.cos(w), 0.05 * np.sin(w), 0.35 * a * np.sin(w), 0.6


def _jump(w: np.ndarray, a: np.ndarray) -> tuple:
    cycle = (w / (2 * np.pi)) % 1.0
    landing = np.exp(-((cycle - 0.15) / 0.05) ** 2)
    flight = (cycle > 0.45) & (cycle < 0.85)        # free fall: the accelerometer reads ~0 g
    return 0.1 * a * landing, np.zeros_like(w), a * 2.5 * landing - 1.0 * flight, 0.0


def _wave(w: np.ndarray, a: np.ndarray) -> tuple:
    return 0.3 * a * np.sin(w + 1.0), 0.9 * a * np.sin(w), 0.1 * a * np.sin(2 * w), -0.2


# Each returns forward, lateral and up acceleration (g, without gravity) and the body's lean.
_MOTIONS = {"walk": _walk, "run": _run, "stairs": _stairs, "cycle": _cycle,
            "jump": _jump, "wave": _wave}


def body_motion(activity: int, t: np.ndarray, freq: np.ndarray, phase: np.ndarray,
                amp: np.ndarray) -> np.ndarray:
    """Acceleration in g of a body doing ``ACTIVITIES[activity]``, gravity included: ``[n, 3, T]``.

    Axes are forward, lateral, up. ``t`` [T] is in seconds; ``freq``, ``phase``, ``amp`` [n]
    are the event's cadence (Hz), phase (radians) and intensity (around 1). A ``t`` that goes
    on across windows gives a continuous recording.
    """
    w = 2 * np.pi * freq[:, None] * t[None] + phase[:, None]
    fwd, lat, up, lean = _MOTIONS[ACTIVITIES[activity]](w, amp[:, None])
    return np.stack([fwd + np.sin(lean), lat + np.zeros_like(w), up + np.cos(lean)], axis=1)


def random_rotations(n: int, rng: np.random.Generator, max_angle: float = np.pi) -> np.ndarray:
    """``[n, 3, 3]`` rotations about random axes by angles up to ``max_angle`` (Rodrigues)."""
    axis = rng.standard_normal((n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = rng.uniform(0, max_angle, n)[:, None, None]
    cross = np.zeros((n, 3, 3))
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    cross -= cross.transpose(0, 2, 1)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


@dataclass(frozen=True)
class ImuRig:
    """Fixed per-device properties: where each device sits on the body and how often it is loose."""

    mount: np.ndarray      # [K, 3, 3] rotation from body axes to device axes
    gain: np.ndarray       # [K] how much of the body motion reaches the device
    idle: np.ndarray       # [K] probability that the device is loose / idle during an event

    @classmethod
    def default(cls, devices: int) -> "ImuRig":
        rng = np.random.default_rng(1234)   # a fixed layout, independent of the data seed
        return cls(mount=random_rotations(devices, rng, max_angle=np.pi / 2),
                   gain=np.linspace(1.1, 0.75, devices),
                   idle=np.linspace(0.29, 0.27, devices))


def imu_readings(labels: np.ndarray, rig: ImuRig, rng: np.random.Generator, window: int,
                 noise: tuple[float, float] = (0.1, 0.45)) -> list[np.ndarray]:
    """One float32 ``[N, 3, window]`` array per device of ``rig``.

    Cadence, phase and intensity belong to the event (all devices share them); orientation
    jitter, time lag, gain, bias and noise belong to each device. An idle device lies still in
    a random orientation, sometimes jostled by an unrelated short vibration (a distractor).
    """
    n, k = labels.shape[0], rig.gain.shape[0]
    t = np.arange(window) / SAMPLE_RATE
    low = np.array([CADENCE[a][0] for a in ACTIVITIES])[labels]
    high = np.array([CADENCE[a][1] for a in ACTIVITIES])[labels]
    freq = rng.uniform(low, high)
    phase = rng.uniform(0, 2 * np.pi, n)
    amp = rng.uniform(0.8, 1.2, n)
    idle = rng.random((n, k)) < rig.idle
    readings = []
    for dev in range(k):
        lag = rng.uniform(-0.3, 0.3, n) * 2 * np.pi
        motion = np.empty((n, 3, window))
        for activity in np.unique(labels):
            rows = labels == activity
            motion[rows] = body_motion(int(activity), t, freq[rows], phase[rows] + lag[rows],
                                       amp[rows])
        gravity = motion.mean(axis=2, keepdims=True)
        motion = gravity + (motion - gravity) * rig.gain[dev] * rng.uniform(0.8, 1.2, (n, 1, 1))
        rotation = random_rotations(n, rng, max_angle=0.5) @ rig.mount[dev]
        device = rotation @ motion
        device[idle[:, dev]] = _idle_motion(int(idle[:, dev].sum()), t, rng)
        device += rng.uniform(-0.05, 0.05, (n, 3, 1))
        device += rng.standard_normal(device.shape) * rng.uniform(*noise, (n, 1, 1))
        readings.append(device.astype(np.float32))
    return readings


def _idle_motion(n: int, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A loose device: gravity in a random orientation, sometimes a short unrelated vibration."""
    down = rng.standard_normal((n, 3, 1))
    down /= np.linalg.norm(down, axis=1, keepdims=True)
    direction = rng.standard_normal((n, 3, 1))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    freq = rng.uniform(0.5, 4.0, (n, 1, 1))
    centre = rng.uniform(t[0], t[-1], (n, 1, 1))
    envelope = np.exp(-((t - centre) / rng.uniform(0.1, 0.5, (n, 1, 1))) ** 2)
    strength = rng.uniform(0.0, 0.6, (n, 1, 1)) * (rng.random((n, 1, 1)) < 0.5)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    return down + direction * strength * envelope * np.sin(2 * np.pi * freq * t + phase)


def imu_series(n_events: int = 4000, devices: int = 4, num_classes: int = 6, window: int = 64,
               seed: int = 0, test_fraction: float = 0.2, rig: ImuRig | None = None) -> Dataset:
    """Body-worn IMUs (``imu0``...) recording one activity: float32 ``[N, 3, window]`` in g.

    Classes are the first ``num_classes`` of :data:`ACTIVITIES`, each with its own cadence and
    waveform. Devices differ by mounting orientation and by how much motion reaches them; with
    probability ``rig.idle[k]`` device k is loose during an event and records nothing useful.
    """
    if not 2 <= num_classes <= len(ACTIVITIES):
        raise ValueError(f"num_classes must be in 2..{len(ACTIVITIES)}, got {num_classes}")
    if devices < 1 or window < 8:
        raise ValueError(f"need devices >= 1 and window >= 8, got {devices} and {window}")
    rig = rig or ImuRig.default(devices)
    shapes = (rig.gain.shape, rig.idle.shape, rig.mount.shape)
    if shapes != ((devices,), (devices,), (devices, 3, 3)):
        raise ValueError(f"the IMU rig does not describe {devices} devices")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n_events)
    readings = imu_readings(labels, rig, rng, window)
    sensors = {f"imu{k}": values for k, values in enumerate(readings)}
    return make_dataset(sensors, labels, split=_split(n_events, test_fraction, rng),
                        classes=list(ACTIVITIES[:num_classes]), name="imu_series",
                        source="imu_series")


def _split(n: int, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    split = np.zeros(n, np.int8)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    split[rng.permutation(n)[:n_test]] = 1
    return split


BUILTIN = ("images", "series")


def load_data(spec: str, *, seed: int = 0, events: int | None = None) -> Dataset:
    """``images`` or ``series`` (built-in generators, deterministic from ``seed``), a path to a ``.npz``,
    or a UEA/UCR archive set: ``uea:BasicMotions`` or a path to ``<Name>_TRAIN.ts`` (export/uea.py)."""
    if spec in BUILTIN:
        make = multiview_images if spec == "images" else imu_series
        return make(seed=seed) if events is None else make(n_events=events, seed=seed)
    if is_uea(spec):
        return load_uea(spec)
    if not spec.endswith(".npz"):
        raise DataError(spec, f"expected one of {BUILTIN}, a path to a .npz file, uea:<Name> "
                              "(e.g. uea:BasicMotions) or a path to a <Name>_TRAIN.ts file")
    return load_npz(spec)
