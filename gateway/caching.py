"""The gateway's semantic cache, as plain objects over arrays (no MQTT, clock passed in).

Two ways an event is answered from cache (exit tier ``cache``), both only for events the local
exit could not answer:

- the devices' own caches: each device looks its feature up and says in its scores frame which
  label its cache votes for; when a quorum of the cell's devices agree, the gateway answers at
  once, with no feature round trip, no gateway shard and no cloud hop;
- the gateway's cache, keyed by the fused feature (so a scene any camera set has seen before is
  reused across devices): looked up after the features arrive, before the gateway shard.

The gateway's cache is filled from its confident edge exits at once and from the cloud's
answers to the forwards it holds; both caches are emptied when the model changes.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from fogsplit.core.cache import CacheSettings, ModelCache, Vote, cell_vote, resolve
from fogsplit.core.manifest import Manifest


def vote_logits(label: int, share: float, classes: int) -> np.ndarray:
    """Logits whose softmax gives ``label`` the probability ``share`` and splits the rest evenly,
    so a cache answer's confidence is the share of the vote it won."""
    rest = (1.0 - share) / (classes - 1) if classes > 1 else 0.0
    p = np.full(classes, max(rest, 1e-6))
    p[label] = max(share, 1e-6)
    return np.log(p / p.sum())


class GatewayCache(ModelCache):
    """The fused-feature cache of one gateway, the forwards awaiting the cloud's answer, and the
    rule over the devices' cache votes."""

    def __init__(self, manifest: Manifest, settings: CacheSettings, *, hold_s: float = 30.0,
                 max_held: int = 256) -> None:
        dim = int(np.prod(manifest.tier_shard("gateway").inputs["fused"][1:]))
        super().__init__(manifest.model_id, dim, manifest.num_classes, resolve(settings, manifest.cache, "gateway"))
        self.quorum = manifest.cache.quorum if manifest.cache is not None else 0.5
        self.hold_s, self.max_held = hold_s, max_held
        self._held: OrderedDict[int, tuple[float, np.ndarray]] = OrderedDict()
        self.device_hits = 0

    def devices_agree(self, votes: dict[str, int | None], expected: int) -> int | None:
        """The label a quorum of the ``expected`` devices' caches agree on, else None."""
        label = cell_vote(votes, self.quorum, devices=expected)
        if label is not None:
            self.device_hits += 1
        return label

    def lookup(self, fused: np.ndarray, now: float) -> Vote:
        return self.cache.lookup(fused, now)

    def hold(self, event: int, fused: np.ndarray, now: float) -> None:
        """Keep the fused feature of a forwarded event until the cloud answers (bounded)."""
        self._held[event] = (now, fused)
        while self._held and (len(self._held) > self.max_held or next(iter(self._held.values()))[0] < now - self.hold_s):
            self._held.popitem(last=False)

    def on_result(self, event: int, label: int, exit: str, model: str, now: float) -> bool:
        """A result on the cell's topic: cache the cloud's answer to a forward held here."""
        held = self._held.pop(event, None) if model == self.model else None
        return held is not None and self.learn(held[1], label, exit, model, now)

    def use_model(self, model: str) -> bool:
        changed = super().use_model(model)
        if changed:
            self._held.clear()
        return changed

    def snapshot(self) -> dict:
        stats = self.cache.stats()
        return {"entries": stats.entries, "nbytes": stats.nbytes, "lookups": stats.lookups,
                "gateway_hits": stats.hits, "device_hits": self.device_hits, "filled": self.filled,
                "evicted": stats.evicted_lru + stats.evicted_ttl, "threshold": stats.threshold,
                "search": stats.search, "held": len(self._held)}
