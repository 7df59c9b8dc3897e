"""The device's own semantic cache, keyed by the feature its shard computes (numpy search only).

On a hit the device tells the gateway which label its cache votes for, in the scores frame;
when enough of the cell's devices agree the gateway answers without asking for any feature,
so the feature uplink is skipped. A device votes only for a label its own exit also predicts:
a camera that does not see the object has a feature that barely changes from one scene to the
next (its view is background), so its cache alone would repeat the last scene's label. The
cache learns from the cell's results: an edge or cloud answer to an event whose feature the
device still holds.
"""
from __future__ import annotations

import numpy as np

from fogsplit.core.cache import CacheSettings, ModelCache, resolve
from fogsplit.core.errors import ConfigError
from fogsplit.core.manifest import Manifest


class DeviceCache(ModelCache):
    def __init__(self, manifest: Manifest, settings: CacheSettings) -> None:
        if settings.max_entries > settings.ann_above:
            raise ConfigError(f"a device cache searches exactly, so max_entries ({settings.max_entries}) "
                              f"may not exceed ann_above ({settings.ann_above})")
        super().__init__(manifest.model_id, int(np.prod(manifest.feature_shape)), manifest.num_classes,
                         resolve(settings, manifest.cache, "device"))

    def vote(self, feature: np.ndarray, scores: np.ndarray, now: float) -> int | None:
        """The cached label near ``feature`` if the device's own exit (``scores``) agrees, else None."""
        label = self.cache.lookup(feature, now).label
        return label if label is not None and label == int(np.argmax(scores)) else None
