"""Over-the-air rollout, the tier's side, as a plain object: offers and chunks in, outcomes out.

A :class:`RolloutAgent` runs in every component (a device agent, a gateway, a cloud worker for
each cell it serves). It takes the cell's retained rollout offer (:class:`Offer`), the chunks of
this component's shards, the statuses of its peers and the outcome of the events the new model
decided, with the clock injected, and returns what the service must do (:class:`Report`,
:class:`Prepare`, :class:`Schedule`, :class:`Forget`). No MQTT, no threads: the service in
core/rollout_link.py wires it. The protocol, the states and the bounds: docs/rollout.md.

States of a model in one component: ``staging`` -> ``staged`` -> ``active`` (health
``checking``, then ``ok``) or ``rolled-back``; ``refused`` at staging. A refused or rolled-back
model is never staged again by this process.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fogsplit.core.clock import Clock
from fogsplit.core.errors import BundleError, FogsplitError
from fogsplit.core.manifest import MANIFEST, Bundle, parse_manifest
from fogsplit.core.settings import RolloutSettings
from fogsplit.core.store import BundleStore, check_model_id

log = logging.getLogger(__name__)

MAX_OFFER_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 20
STATES = ("staged", "active", "rolled-back", "refused")


class RolloutError(FogsplitError):
    """A rollout message that cannot be read (malformed offer, chunk or status)."""


@dataclass(frozen=True)
class Trust:
    """What a tier trusts: public key files (or keys) and whether unsigned bundles pass."""

    keys: Sequence[Any] = ()
    allow_unsigned: bool = False


# -- what travels -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Offer:
    """The cell's rollout message (retained): the model, its small files (manifest.json and its
    signature), how many chunks each shard has, and, in phase 2, when it serves."""

    rollout: str
    model: str
    files: dict[str, bytes]
    chunks: dict[str, int]
    chunk_bytes: int
    activate_at: float | None = None
    abort: str | None = None

    def to_json(self) -> bytes:
        return json.dumps({"rollout": self.rollout, "model": self.model, "chunk_bytes": self.chunk_bytes,
                           "files": {n: base64.b64encode(b).decode() for n, b in self.files.items()},
                           "chunks": self.chunks, "activate_at": self.activate_at, "abort": self.abort}).encode()


def parse_offer(payload: bytes) -> Offer:
    """An offer from its JSON; raises :class:`RolloutError` naming what is wrong."""
    if len(payload) > MAX_OFFER_BYTES:
        raise RolloutError(f"offer of {len(payload)} bytes exceeds the {MAX_OFFER_BYTES} byte cap")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RolloutError(f"offer is not JSON ({exc})") from None
    need = {"rollout", "model", "files", "chunks", "chunk_bytes", "activate_at", "abort"}
    if not isinstance(body, dict) or set(body) != need:
        raise RolloutError(f"offer must have exactly the keys {sorted(need)}")
    try:
        model = check_model_id(body["model"])
    except ValueError as exc:
        raise RolloutError(f"offer: {exc}") from None
    files, chunks, size, at = body["files"], body["chunks"], body["chunk_bytes"], body["activate_at"]
    if not isinstance(body["rollout"], str) or not 0 < len(body["rollout"]) <= 64:
        raise RolloutError("offer: 'rollout' must be a name of 1-64 characters")
    if not isinstance(files, dict) or MANIFEST not in files or not all(
            isinstance(n, str) and Path(n).name == n and not n.startswith(".") and isinstance(b, str)
            for n, b in files.items()):
        raise RolloutError(f"offer: 'files' must map plain file names (with {MANIFEST}) to base64")
    if not isinstance(chunks, dict) or not all(isinstance(n, str) and isinstance(c, int) and not isinstance(c, bool)
                                               and 1 <= c <= 1 << 20 for n, c in chunks.items()):
        raise RolloutError("offer: 'chunks' must map shard names to a count of 1 or more")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_CHUNK_BYTES:
        raise RolloutError(f"offer: 'chunk_bytes' must be an integer in 1..{MAX_CHUNK_BYTES}")
    if at is not None and (not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at)):
        raise RolloutError("offer: 'activate_at' must be epoch seconds or null")
    if body["abort"] is not None and not isinstance(body["abort"], str):
        raise RolloutError("offer: 'abort' must be a reason or null")
    try:
        decoded = {n: base64.b64decode(b, validate=True) for n, b in files.items()}
    except binascii.Error:
        raise RolloutError("offer: a file is not valid base64") from None
    return Offer(body["rollout"], model, decoded, dict(chunks), size,
                 None if at is None else float(at), body["abort"])


def chunk_topic_parts(topic: str) -> tuple[str, str, int]:
    """``(model, shard, index)`` of a ``.../model/{model}/shard/{shard}/{index}`` topic."""
    parts = topic.split("/")
    try:
        i = parts.index("shard")
        return check_model_id(parts[i - 1]), parts[i + 1], int(parts[i + 2])
    except (ValueError, IndexError):
        raise RolloutError(f"chunk topic {topic!r} is not model/<id>/shard/<shard>/<index>") from None


# -- what the agent asks of its service -------------------------------------------------------

@dataclass(frozen=True)
class Report:
    """Publish this component's rollout status (retained); ``refused`` also goes to the error topic."""

    body: dict


@dataclass(frozen=True)
class Prepare:
    """Build the tier's logic for this verified bundle, beside the running one."""

    bundle: Bundle


@dataclass(frozen=True)
class Schedule:
    """Events captured at or after ``at`` (epoch seconds) belong to ``model``."""

    model: str
    at: float


@dataclass(frozen=True)
class Forget:
    """Drop ``model``'s logic: no event of it is open any more."""

    model: str


Out = Report | Prepare | Schedule | Forget


@dataclass
class _Staging:
    offer: Offer
    started: float
    chunks: dict[tuple[str, int], bytes] = field(default_factory=dict)

    def missing(self, shards: Sequence[str]) -> list[str]:
        return [f"{s}[{i}]" for s in shards for i in range(self.offer.chunks[s]) if (s, i) not in self.chunks]


@dataclass
class _Health:
    model: str
    since: float           # monotonic time of the switch
    at: float              # epoch seconds: events captured from then on are the model's
    events: int = 0
    degraded: int = 0


class RolloutAgent:
    """One component's rollout state. ``shards`` are the names of the shards it runs."""

    def __init__(self, *, tier: str, name: str, cell: str, shards: Sequence[str], running: str,
                 store: BundleStore, trust: Trust, settings: RolloutSettings, clock: Clock) -> None:
        self.tier, self.name, self.cell, self.shards = tier, name, cell, tuple(shards)
        self.store, self.trust, self.settings, self.clock = store, trust, settings, clock
        self.running = running
        self.previous: str | None = None
        self.rollout = ""
        self.staging: _Staging | None = None
        self.staged: Offer | None = None
        self.switch_at: float | None = None       # epoch seconds: the staged model's activation
        self.health: _Health | None = None
        self.forget_at: tuple[str, float] | None = None
        self.rejected: set[str] = set()
        self.early: dict[tuple[str, str, int], tuple[float, bytes]] = {}
        self.counters = {"chunks": 0, "duplicates": 0, "chunks_dropped": 0}

    # -- inputs -------------------------------------------------------------------------------
    def on_offer(self, offer: Offer) -> list[Out]:
        if offer.abort is not None:
            return self._abort(offer)
        if offer.model == self.running:
            if self.rollout != offer.rollout and self.health is None:
                self.rollout = offer.rollout
                return [self._report("active", offer.model, health="ok")]
            return []
        if offer.model in self.rejected:
            return []
        if self.staged is not None and self.staged.model == offer.model:
            self.staged = offer
            return self._plan_switch(offer)
        if self.staging is not None and self.staging.offer.model == offer.model:
            self.staging.offer = offer
            return self._try_finish()
        if self.health is not None:
            return [self._report("refused", offer.model, reason="busy: still checking the health of "
                                 f"{self.health.model}", rollout=offer.rollout)]
        return self._begin(offer)

    def on_chunk(self, model: str, shard: str, index: int, data: bytes) -> list[Out]:
        self.counters["chunks"] += 1
        if model == self.running or model in self.rejected or (self.staged and self.staged.model == model) \
                or shard not in self.shards:
            return []
        if len(data) > MAX_CHUNK_BYTES:
            self.counters["chunks_dropped"] += 1
            return []
        st = self.staging
        if st is None or st.offer.model != model:
            return self._hold_early(model, shard, index, data)
        if index >= st.offer.chunks.get(shard, 0) or len(data) > st.offer.chunk_bytes:
            self.counters["chunks_dropped"] += 1
            return []
        if (shard, index) in st.chunks:
            self.counters["duplicates"] += 1
            return []
        st.chunks[(shard, index)] = data
        return self._try_finish()

    def on_peer_status(self, body: dict) -> list[Out]:
        """A peer of the cell rolled the model back: follow it (the cell serves one model)."""
        model, state = body.get("model"), body.get("state")
        if state != "rolled-back" or (body.get("tier"), body.get("name")) == (self.tier, self.name):
            return []
        reason = f"{body.get('tier')} {body.get('name')} rolled back: {body.get('reason')}"
        if model == self.running and self.previous is not None:
            at = body.get("revert_at")
            return self._roll_back(reason, at if isinstance(at, (int, float)) else None)
        if self.staged is not None and self.staged.model == model:
            self.rejected.add(model)
            self.staged, self.switch_at = None, None
            return [self._report("rolled-back", model, reason=reason), Forget(model)]
        return []

    def on_events(self, model: str, events: int, *, degraded: int = 0, failure: str | None = None) -> list[Out]:
        """The outcome of ``events`` decided by ``model`` (``failure``: a non-finite output, a
        shard error): feeds the health check of a freshly switched model."""
        out = self.on_timer()
        h = self.health
        if h is None or h.model != model:
            return out
        if failure is not None:
            return out + self._roll_back(f"health check failed: {failure}")
        h.events += events
        h.degraded += degraded
        n = self.settings.health_events
        if h.events >= n:
            if h.degraded >= h.events:
                return out + self._roll_back(f"health check failed: all of the first {h.events} events degraded")
            return out + self._healthy()
        return out

    def refuse(self, model: str, reason: str) -> list[Out]:
        """The service could not build the staged model's logic."""
        self.rejected.add(model)
        if self.staged is not None and self.staged.model == model:
            self.staged, self.switch_at = None, None
        return [self._report("refused", model, reason=reason), Forget(model)]

    def next_deadline(self) -> float | None:
        """Monotonic time of the next thing :meth:`on_timer` has to do."""
        now_mono, now = self.clock.monotonic(), self.clock.time()
        times = []
        if self.staging is not None:
            times.append(self.staging.started + self.settings.stage_timeout_s)
        if self.switch_at is not None:
            times.append(now_mono + max(0.0, self.switch_at - now))
        if self.health is not None:
            times.append(self.health.since + self.settings.health_s)
        if self.forget_at is not None:
            times.append(self.forget_at[1])
        if self.early:
            times.append(min(t for t, _ in self.early.values()) + self.settings.stage_timeout_s)
        return min(times, default=None)

    def on_timer(self) -> list[Out]:
        mono, now = self.clock.monotonic(), self.clock.time()
        out: list[Out] = []
        st = self.staging
        if st is not None and mono >= st.started + self.settings.stage_timeout_s:
            missing = st.missing([s for s in self.shards if s in st.offer.chunks])
            out += self._refuse_staging(f"missing chunks after {self.settings.stage_timeout_s:g} s: "
                                        f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if self.switch_at is not None and now >= self.switch_at:
            out += self._switch()
        h = self.health
        if h is not None and mono >= h.since + self.settings.health_s:
            out += self._healthy()
        if self.forget_at is not None and mono >= self.forget_at[1]:
            out.append(Forget(self.forget_at[0]))
            if self.forget_at[0] == self.previous:
                self.previous = None
            self.forget_at = None
        for key, (t, _) in list(self.early.items()):
            if mono >= t + self.settings.stage_timeout_s:
                del self.early[key]
                self.counters["chunks_dropped"] += 1
        return out

    # -- staging ------------------------------------------------------------------------------
    def _begin(self, offer: Offer) -> list[Out]:
        self.rollout = offer.rollout
        if self.staging is not None:
            self.store.discard(self.staging.offer.model)
            self.staging = None
        if self.store.has(offer.model):
            return self._verify(offer, self.store.path(offer.model), stored=True)
        missing = [s for s in self.shards if s not in offer.chunks]
        if missing:
            return self._refuse(offer, f"the bundle has no shard {', '.join(missing)} for this {self.tier}")
        size = sum(offer.chunks[s] for s in self.shards) * offer.chunk_bytes + sum(map(len, offer.files.values()))
        if size > self.settings.max_bytes:
            return self._refuse(offer, f"up to {size} bytes to stage, above the bound of {self.settings.max_bytes} "
                                       "(rollout.max_bytes)")
        self.staging = _Staging(offer, self.clock.monotonic())
        for (model, shard, index), (_, data) in list(self.early.items()):
            if model == offer.model:
                del self.early[(model, shard, index)]
                if index < offer.chunks.get(shard, 0):
                    self.staging.chunks[(shard, index)] = data
        log.info("%s: staging model %s (rollout %s)", self._who(), offer.model, offer.rollout)
        return self._try_finish()

    def _hold_early(self, model: str, shard: str, index: int, data: bytes) -> list[Out]:
        """A chunk ahead of its offer (topics are not ordered against each other): held, bounded."""
        held = sum(len(d) for _, d in self.early.values())
        if held + len(data) > self.settings.max_bytes:
            self.counters["chunks_dropped"] += 1
        elif (model, shard, index) in self.early:
            self.counters["duplicates"] += 1
        else:
            self.early[(model, shard, index)] = (self.clock.monotonic(), data)
        return []

    def _try_finish(self) -> list[Out]:
        st = self.staging
        if st is None or st.missing(self.shards):
            return []
        offer = st.offer
        try:
            manifest = parse_manifest(json.loads(offer.files[MANIFEST]), f"offer {offer.model}")
            path = self.store.staging(offer.model)
            for name, data in offer.files.items():
                (path / name).write_bytes(data)
            for shard in self.shards:
                data = b"".join(st.chunks[(shard, i)] for i in range(offer.chunks[shard]))
                (path / manifest.shard(shard).file).write_bytes(data)
        except (BundleError, ValueError, UnicodeDecodeError, OSError) as exc:
            return self._refuse_staging(f"cannot stage: {exc}")
        self.staging = None
        return self._verify(offer, path, stored=False)

    def _verify(self, offer: Offer, path: Path, *, stored: bool) -> list[Out]:
        try:
            if not stored:
                path = self.store.commit(offer.model)
            bundle = self.store.load(offer.model, shards=list(self.shards), trust=self.trust)
            if bundle.manifest.model_id != offer.model:
                raise BundleError(f"the offer names model {offer.model}, the manifest is {bundle.manifest.model_id}")
        except (BundleError, OSError) as exc:
            self.store.remove(offer.model)
            return self._refuse(offer, str(exc))
        self.staged = offer
        self.store.prune(hold=[self.running, offer.model, *([self.previous] if self.previous else [])])
        log.info("%s: staged model %s, signed by %s", self._who(), offer.model, bundle.signed_by)
        return [Prepare(bundle), self._report("staged", offer.model), *self._plan_switch(offer)]

    def _refuse_staging(self, reason: str) -> list[Out]:
        st, self.staging = self.staging, None
        assert st is not None
        self.store.discard(st.offer.model)
        return self._refuse(st.offer, reason)

    def _refuse(self, offer: Offer, reason: str) -> list[Out]:
        self.rejected.add(offer.model)
        log.warning("%s: refused model %s (rollout %s): %s", self._who(), offer.model, offer.rollout, reason)
        return [self._report("refused", offer.model, reason=reason, rollout=offer.rollout)]

    def _abort(self, offer: Offer) -> list[Out]:
        out: list[Out] = []
        if self.staging is not None and self.staging.offer.model == offer.model:
            self.store.discard(offer.model)
            self.staging = None
        if self.staged is not None and self.staged.model == offer.model:
            self.staged, self.switch_at = None, None
            out.append(Forget(offer.model))
        return out

    # -- switching ----------------------------------------------------------------------------
    def _plan_switch(self, offer: Offer) -> list[Out]:
        if offer.activate_at is None or self.switch_at == offer.activate_at:
            return []
        self.switch_at = offer.activate_at
        late = self.clock.time() - offer.activate_at
        if late > 0:
            log.warning("%s: activation of %s came %.3f s late: switching at once", self._who(), offer.model, late)
        return [Schedule(offer.model, offer.activate_at), *self.on_timer()]

    def _switch(self) -> list[Out]:
        offer, at = self.staged, self.switch_at
        assert offer is not None and at is not None
        self.previous, self.running = self.running, offer.model
        self.staged, self.switch_at = None, None
        self.health = _Health(offer.model, self.clock.monotonic(), at)
        self.store.set_active(offer.model)
        log.info("%s: model %s active from %.3f (was %s); checking its health", self._who(), offer.model, at,
                 self.previous)
        return [self._report("active", offer.model, health="checking", active_from=at)]

    def _healthy(self) -> list[Out]:
        h, self.health = self.health, None
        assert h is not None
        # The old model stays for drain_s: its open events finish, and a peer's failure can still
        # take the cell back to it.
        self.forget_at = (self.previous, self.clock.monotonic() + self.settings.drain_s) if self.previous else None
        log.info("%s: model %s healthy after %d events", self._who(), h.model, h.events)
        return [self._report("active", h.model, health="ok", checked=h.events, degraded=h.degraded, active_from=h.at)]

    def _roll_back(self, reason: str, revert_at: float | None = None) -> list[Out]:
        bad, back = self.running, self.previous
        assert back is not None
        now = self.clock.time()
        at = max(now, revert_at) if revert_at is not None else now + self.settings.revert_lead_s
        self.running, self.previous, self.health = back, None, None
        self.rejected.add(bad)
        self.store.set_active(back if self.store.has(back) else None)
        self.forget_at = (bad, self.clock.monotonic() + (at - now) + self.settings.drain_s)
        log.warning("%s: rolling %s back to %s from %.3f: %s", self._who(), bad, back, at, reason)
        return [Schedule(back, at), self._report("rolled-back", bad, reason=reason, revert_at=at)]

    # -- reports ------------------------------------------------------------------------------
    def _report(self, state: str, model: str, *, reason: str | None = None, rollout: str | None = None,
                **extra: object) -> Report:
        body = {"rollout": rollout or self.rollout, "model": model, "state": state, "reason": reason,
                "active": self.running, "tier": self.tier, "name": self.name, "cell": self.cell,
                "time": round(self.clock.time(), 3), "counters": dict(self.counters), **extra}
        return Report(body)

    def _who(self) -> str:
        return f"{self.cell}/{self.tier}/{self.name}"
