"""Semantic cache: answer a repeated scene from the labels of its nearest cached features.

The anchors are CCIED (cache intermediate-layer outputs with their labels, skip the rest of the
network on a similar input) and FoggyCache (k nearest neighbours under a distance threshold,
answered only when the neighbours agree: the homogeneity check). Keys are L2-normalised, so
the distance between two keys is in [0, 2] whatever the feature's scale.

A plain data structure over numpy arrays, with the clock passed in: no threads, no MQTT. It is
bounded three ways: entries, bytes (the arrays it allocates, and the ANN index when there is
one) and age (TTL); when full, the least recently used entry goes. Search is exact numpy while
the cache is small and an HNSW index (hnswlib, an optional extra, imported only when the cache
is configured to grow past ``ann_above`` entries) once it is larger; both sit behind
:class:`KeyIndex`. The device path uses exact search only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgspec
import numpy as np

from fogsplit.core.errors import ConfigError
from fogsplit.core.settings import CacheSettings
from fogsplit.core.validation import check_field

if TYPE_CHECKING:
    from fogsplit.core.manifest import CacheSpec

_GROW_FROM = 64
_HNSW_M = 16
_HNSW_EF_CONSTRUCTION = 100
_HNSW_EF_SEARCH = 64


def resolve(settings: CacheSettings, calibration: "CacheSpec | None", key_space: str) -> CacheSettings:
    """``settings`` with what the operator left unset taken from the bundle's calibration of
    ``key_space`` (``gateway`` or ``device``)."""
    if calibration is None:
        if settings.threshold is None:
            raise ConfigError("the bundle has no cache calibration (exported before the cache existed): "
                              "give the cache a threshold, or re-export")
        return msgspec.structs.replace(settings, k=settings.k or 4, min_agreement=settings.min_agreement or 1.0)
    point = getattr(calibration, key_space)
    return msgspec.structs.replace(settings, k=settings.k or calibration.k,
                   threshold=point.threshold if settings.threshold is None else settings.threshold,
                   min_agreement=settings.min_agreement or calibration.min_agreement)


def normalise(vector: np.ndarray) -> np.ndarray:
    """The cache key of a feature: flattened, float32, unit L2 norm (a zero vector stays zero)."""
    flat = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(flat))
    return flat / norm if norm > 0 else flat


@dataclass(frozen=True)
class Vote:
    """The outcome of one lookup: ``label`` is set on a hit, ``None`` on a miss.

    ``distribution`` is the share of each class among the neighbours within the threshold
    (zeros when there were none); ``nearest`` the distance of the closest key (inf if empty).
    """

    label: int | None
    distribution: np.ndarray
    neighbours: int
    nearest: float

    @property
    def hit(self) -> bool:
        return self.label is not None


def vote(labels: np.ndarray, distances: np.ndarray, *, classes: int, threshold: float,
         min_agreement: float) -> Vote:
    """The homogeneity-checked kNN vote (FoggyCache): neighbours at distance <= ``threshold``
    answer only if at least ``min_agreement`` of them share one label."""
    labels = np.asarray(labels)
    distances = np.asarray(distances, dtype=np.float64)
    near = distances <= threshold
    counts = np.bincount(labels[near].astype(np.int64), minlength=classes)[:classes].astype(np.float32)
    within = int(near.sum())
    nearest = float(distances.min()) if distances.size else math.inf
    if within == 0:
        return Vote(None, counts, 0, nearest)
    distribution = counts / within
    top = int(np.argmax(counts))
    label = top if distribution[top] >= min_agreement else None
    return Vote(label, distribution, within, nearest)


class KeyIndex(Protocol):
    """Nearest-neighbour search over the cache's slots."""

    def add(self, slot: int, key: np.ndarray) -> None: ...
    def remove(self, slot: int) -> None: ...
    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class HnswIndex:
    """hnswlib's HNSW graph; evicted slots are marked deleted and their space reused.

    hnswlib refuses to re-add a deleted label when deleted space is reused, so every insertion
    gets a fresh label and the index keeps the label -> slot map.
    """

    def __init__(self, dim: int, capacity: int) -> None:
        try:
            import hnswlib
        except ImportError:
            raise ConfigError("the cache is configured to grow past ann_above entries, which needs hnswlib: "
                              "pip install 'fogsplit[cache]' (or lower max_entries to ann_above)") from None
        self._index = hnswlib.Index(space="l2", dim=dim)
        self._index.init_index(max_elements=capacity, M=_HNSW_M, ef_construction=_HNSW_EF_CONSTRUCTION,
                               allow_replace_deleted=True)
        self._index.set_num_threads(1)
        self._index.set_ef(_HNSW_EF_SEARCH)
        self._label_of_slot: dict[int, int] = {}
        self._slot_of_label: dict[int, int] = {}
        self._next_label = 0

    @staticmethod
    def bytes_per_entry(dim: int) -> int:
        """hnswlib's memory for one element: the vector, level-0 links, label, and the maps here."""
        return dim * 4 + 2 * _HNSW_M * 4 + 4 + 8 + 2 * 120

    def add(self, slot: int, key: np.ndarray) -> None:
        label = self._next_label
        self._next_label += 1
        self._index.add_items(key[None], np.array([label]), replace_deleted=True)
        self._label_of_slot[slot] = label
        self._slot_of_label[label] = slot

    def remove(self, slot: int) -> None:
        label = self._label_of_slot.pop(slot, None)
        if label is not None:
            self._index.mark_deleted(label)
            del self._slot_of_label[label]

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self._slot_of_label))
        if k == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        labels, squared = self._index.knn_query(query[None], k=k)
        slots = np.array([self._slot_of_label[int(label)] for label in labels[0]], np.int64)
        return slots, np.sqrt(np.maximum(squared[0], 0.0))


def exact_search(keys: np.ndarray, live: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` live slots nearest to ``query`` among unit-norm ``keys``, by brute force.

    One matrix-vector product over every allocated row (no gather of the live ones: copying
    the keys would cost more than the product), dead rows masked out."""
    n_live = int(live.sum())
    if n_live == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    squared = np.maximum(2.0 - 2.0 * (keys @ query), 0.0)
    squared[~live] = np.inf
    k = min(k, n_live)
    best = np.argpartition(squared, k - 1)[:k] if k < squared.size else np.arange(squared.size)
    best = best[np.argsort(squared[best])]
    return best.astype(np.int64), np.sqrt(squared[best])


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of one cache, for the stats topic and the benchmark."""

    entries: int
    capacity: int
    nbytes: int
    max_bytes: int
    lookups: int
    hits: int
    inserts: int
    evicted_lru: int
    evicted_ttl: int
    cleared: int
    search: str
    threshold: float

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class SemanticCache:
    """Feature keys -> class labels, with kNN lookup under a distance threshold."""

    def __init__(self, dim: int, classes: int, settings: CacheSettings | None = None) -> None:
        if dim < 1 or classes < 2:
            raise ConfigError(f"a cache needs a key dimension >= 1 and >= 2 classes, got {dim} and {classes}")
        self.settings = s = settings or CacheSettings()
        if s.threshold is None or s.k is None or s.min_agreement is None:
            raise ConfigError("a cache needs a threshold, k and min_agreement: resolve() them from the bundle")
        self.dim, self.classes = dim, classes
        self.threshold = s.threshold
        self.uses_ann = s.max_entries > s.ann_above
        per_entry = self.bytes_per_entry(dim, self.uses_ann)
        self.capacity = min(s.max_entries, s.max_bytes // per_entry)
        if self.capacity < 1:
            raise ConfigError(f"cache max_bytes={s.max_bytes} holds not even one {dim}-value key "
                              f"({per_entry} bytes an entry)")
        self._keys: np.ndarray | None = None
        self._allocate(min(self.capacity, _GROW_FROM))
        self._ann: HnswIndex | None = None
        self._free: list[int] = []
        self._next = 0
        self.lookups = self.hits = self.inserts = self.evicted_lru = self.evicted_ttl = self.cleared = 0

    @staticmethod
    def bytes_per_entry(dim: int, ann: bool) -> int:
        """What one entry costs: key, label, insertion and last-use times, live flag (and its ANN node)."""
        return dim * 4 + 4 + 8 + 8 + 1 + (HnswIndex.bytes_per_entry(dim) if ann else 0)

    def _allocate(self, size: int, *, keep: bool = True) -> None:
        old = self._keys if keep else None
        keys = np.zeros((size, self.dim), np.float32)
        labels = np.zeros(size, np.int32)
        stored = np.zeros(size, np.float64)
        used = np.zeros(size, np.float64)
        live = np.zeros(size, bool)
        if old is not None:
            n = old.shape[0]
            keys[:n], labels[:n], stored[:n] = old, self._labels, self._stored
            used[:n], live[:n] = self._used, self._live
        self._keys, self._labels, self._stored, self._used, self._live = keys, labels, stored, used, live

    def __len__(self) -> int:
        return int(self._live.sum())

    @property
    def nbytes(self) -> int:
        """Memory held: the arrays allocated so far, and the ANN nodes if the index exists."""
        arrays = sum(a.nbytes for a in (self._keys, self._labels, self._stored, self._used, self._live))
        ann = self.capacity * HnswIndex.bytes_per_entry(self.dim) if self._ann is not None else 0
        return arrays + ann

    def set_threshold(self, threshold: float) -> None:
        if threshold is None:
            raise ConfigError("cache threshold must be a distance in [0, 2], got None")
        check_field(CacheSettings, "threshold", threshold)
        self.threshold = float(threshold)

    # -- lookup and fill ------------------------------------------------------------------
    def lookup(self, feature: np.ndarray, now: float) -> Vote:
        """The vote of the ``k`` nearest live keys; a hit refreshes its neighbours' LRU time."""
        key = self._key(feature)
        self.expire(now)
        self.lookups += 1
        slots, distances = self.nearest(key, self.settings.k)
        result = vote(self._labels[slots], distances, classes=self.classes, threshold=self.threshold,
                      min_agreement=self.settings.min_agreement)
        if result.hit:
            self.hits += 1
            self._used[slots[distances <= self.threshold]] = now
        return result

    def nearest(self, key: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots and distances of the ``k`` nearest live keys to a normalised ``key``."""
        if self._ann is not None and len(self) > self.settings.ann_above:
            return self._ann.search(key, k)
        return exact_search(self._keys, self._live, key, k)

    def put(self, feature: np.ndarray, label: int, now: float) -> None:
        """Store ``feature`` -> ``label``, evicting expired entries, then the least recently used."""
        if not 0 <= int(label) < self.classes:
            raise ValueError(f"label {label} is not a class index below {self.classes}")
        key = self._key(feature)
        self.expire(now)
        slot = self._take_slot()
        self._keys[slot], self._labels[slot] = key, int(label)
        self._stored[slot] = self._used[slot] = now
        self._live[slot] = True
        self.inserts += 1
        if self._ann is None and self.uses_ann and len(self) > self.settings.ann_above:
            self._build_ann()
        elif self._ann is not None:
            self._ann.add(slot, key)

    def _key(self, feature: np.ndarray) -> np.ndarray:
        key = normalise(feature)
        if key.shape != (self.dim,):
            raise ValueError(f"cache key has {key.size} values, this cache holds {self.dim}")
        if not np.all(np.isfinite(key)):
            raise ValueError("cache key is not finite")
        return key

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next < self._keys.shape[0]:
            self._next += 1
            return self._next - 1
        if self._keys.shape[0] < self.capacity:
            self._allocate(min(self.capacity, 2 * self._keys.shape[0]))
            self._next += 1
            return self._next - 1
        live = np.flatnonzero(self._live)
        oldest = int(live[np.argmin(self._used[live])])
        self._drop(oldest)
        self.evicted_lru += 1
        return self._free.pop()

    def _drop(self, slot: int) -> None:
        self._live[slot] = False
        self._free.append(slot)
        if self._ann is not None:
            self._ann.remove(slot)

    def _build_ann(self) -> None:
        self._ann = HnswIndex(self.dim, self.capacity)
        for slot in np.flatnonzero(self._live):
            self._ann.add(int(slot), self._keys[slot])

    def expire(self, now: float) -> int:
        """Drop entries older than the TTL; returns how many went."""
        old = np.flatnonzero(self._live & (self._stored < now - self.settings.ttl_s))
        for slot in old:
            self._drop(int(slot))
        self.evicted_ttl += old.size
        return int(old.size)

    def clear(self) -> None:
        """Forget everything (the model changed: its features mean something else now)."""
        self._free = []
        self._next = 0
        self._ann = None
        self._allocate(min(self.capacity, _GROW_FROM), keep=False)
        self.cleared += 1

    def stats(self) -> CacheStats:
        return CacheStats(entries=len(self), capacity=self.capacity, nbytes=self.nbytes,
                          max_bytes=self.settings.max_bytes, lookups=self.lookups, hits=self.hits,
                          inserts=self.inserts, evicted_lru=self.evicted_lru, evicted_ttl=self.evicted_ttl,
                          cleared=self.cleared, search="ann" if self._ann is not None else "exact",
                          threshold=self.threshold)


def cell_vote(device_labels: dict[str, int | None], quorum: float, devices: int | None = None) -> int | None:
    """The answer of a cell's device caches for one event, or None.

    ``device_labels`` holds, for each device heard from, the label its own cache voted (None on
    a miss). The cell answers when at least ``quorum`` of ``devices`` (default: those heard
    from) hit and every hit names the same label: one camera's cache alone is no better than
    that camera, which often does not see the object at all.
    """
    hits = {label for label in device_labels.values() if label is not None}
    voters = sum(label is not None for label in device_labels.values())
    needed = max(1, math.ceil(quorum * (len(device_labels) if devices is None else devices) - 1e-9))
    if len(hits) != 1 or voters < needed:
        return None
    return hits.pop()


FILL_EXITS = ("edge", "cloud")


class ModelCache:
    """A :class:`SemanticCache` tied to the model whose features are its keys, filled only from
    answers of that model that the cache may learn from (edge and cloud exits: confident, and
    never its own answers, which would only reinforce themselves)."""

    def __init__(self, model: str, dim: int, classes: int, settings: CacheSettings) -> None:
        self.model = model
        self.cache = SemanticCache(dim, classes, settings)
        self.filled = 0

    def learn(self, key: np.ndarray, label: int, exit: str, model: str, now: float) -> bool:
        if exit not in FILL_EXITS or model != self.model or not 0 <= label < self.cache.classes:
            return False
        self.cache.put(key, label, now)
        self.filled += 1
        return True

    def use_model(self, model: str) -> bool:
        """Empty the cache if ``model`` is not the model its keys were made with."""
        if model == self.model:
            return False
        self.model = model
        self.cache.clear()
        return True
