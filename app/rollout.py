"""``fogsplit rollout``: ship a bundle to the tiers of a cell over MQTT, in two phases.

Phase 1 publishes the offer (retained: manifest.json, its signature, the chunk counts) and the
shards in chunks, and waits until every component of the cell reports ``staged``. Phase 2
republishes the offer with an activation time ``lead_s`` ahead and waits until every one reports
``active`` with a healthy check. A ``refused``, a ``rolled-back`` or a timeout stops it: the
offer is then marked aborted, so that no tier adopts it later. docs/rollout.md.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fogsplit.core.manifest import check_bundle_contents, load_bundle
from fogsplit.core.rollout import MAX_OFFER_BYTES, Offer, Trust
from fogsplit.core.store import BundleStore
from fogsplit.core.topics import Topics
from fogsplit.core.transport import Message, Transport

log = logging.getLogger(__name__)

SETTLE_S = 1.0


@dataclass
class CellOutcome:
    cell: str
    ok: bool
    reason: str = ""
    statuses: dict[str, dict] = field(default_factory=dict)   # "tier/name" -> last status


def build_offer(bundle_dir: Path, rollout: str, chunk_bytes: int) -> tuple[Offer, dict[str, bytes]]:
    """The offer of a bundle directory and its shards' bytes; the shards are checked first."""
    manifest = check_bundle_contents(bundle_dir)
    shard_files = {s.file for s in manifest.shards}
    files = {p.name: p.read_bytes() for p in sorted(Path(bundle_dir).iterdir())
             if p.is_file() and p.name not in shard_files and not p.name.startswith(".")}
    if sum(map(len, files.values())) * 4 // 3 > MAX_OFFER_BYTES // 2:
        raise ValueError(f"{bundle_dir}: the files beside the shards ({sorted(files)}) are too large for an offer")
    shards = {s.name: (Path(bundle_dir) / s.file).read_bytes() for s in manifest.shards}
    chunks = {name: max(1, math.ceil(len(data) / chunk_bytes)) for name, data in shards.items()}
    return Offer(rollout, manifest.model_id, files, chunks, chunk_bytes), shards


class Rollout:
    """One rollout of one bundle, cell by cell, over ``transport`` (connected)."""

    def __init__(self, transport: Transport, topics: Topics, bundle_dir: Path, *, lead_s: float = 5.0,
                 timeout_s: float = 120.0, chunk_bytes: int = 64 << 10) -> None:
        self.transport, self.topics = transport, topics
        self.lead_s, self.timeout_s = lead_s, timeout_s
        self.offer, self.shards = build_offer(Path(bundle_dir), f"r{time.time_ns() // 1_000_000}", chunk_bytes)
        self.lock = threading.Condition()
        self.online: dict[str, set[str]] = {}       # "cell:<c>/device" ... -> names online
        self.status: dict[str, dict[str, dict]] = {}
        transport.subscribe(topics.device_status("+", "+"), self._on_presence)
        transport.subscribe(topics.gateway_status("+", "+"), self._on_presence)
        transport.subscribe(topics.cloud_status("+"), self._on_presence)
        transport.subscribe(topics.rollout_status("+", "+", "+"), self._on_status)

    @property
    def model(self) -> str:
        return self.offer.model

    def _on_presence(self, msg: Message) -> None:
        parts = msg.topic.split("/")
        try:
            state = json.loads(msg.payload).get("state")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return
        if parts[-3] == "cloud":
            key, name = "cloud", parts[-2]
        else:
            key, name = f"{parts[parts.index('cell') + 1]}/{parts[-3]}", parts[-2]
        with self.lock:
            names = self.online.setdefault(key, set())
            (names.add if state == "online" else names.discard)(name)

    def _on_status(self, msg: Message) -> None:
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(body, dict) or body.get("rollout") != self.offer.rollout:
            return
        with self.lock:
            self.status.setdefault(str(body.get("cell")), {})[f"{body.get('tier')}/{body.get('name')}"] = body
            self.lock.notify_all()

    def expected(self, cell: str) -> set[str]:
        """The components that must report: the cell's online devices and gateways, the online cloud workers."""
        with self.lock:
            return ({f"device/{n}" for n in self.online.get(f"{cell}/device", ())}
                    | {f"gateway/{n}" for n in self.online.get(f"{cell}/gateway", ())}
                    | {f"cloud/{n}" for n in self.online.get("cloud", ())})

    def run(self, cells: list[str]) -> list[CellOutcome]:
        """Each cell in turn (the canary first); stops at the first cell that fails."""
        time.sleep(SETTLE_S)          # the retained statuses arrive just after the subscriptions
        outcomes = []
        for cell in cells:
            outcome = self.run_cell(cell)
            outcomes.append(outcome)
            if not outcome.ok:
                break
        return outcomes

    def run_cell(self, cell: str) -> CellOutcome:
        expected = self.expected(cell)
        if not expected:
            return CellOutcome(cell, False, f"nothing of cell {cell!r} is online")
        log.info("rollout %s of model %s to cell %s: %s", self.offer.rollout, self.model, cell, sorted(expected))
        self._publish_offer(cell, self.offer)
        for shard, data in self.shards.items():
            n = self.offer.chunks[shard]
            for i in range(n):
                piece = data[i * self.offer.chunk_bytes:(i + 1) * self.offer.chunk_bytes]
                self.transport.publish(self.topics.rollout_chunk(self.model, shard, i), piece, qos=1)
        outcome = self._wait(cell, expected, lambda b: b["state"] == "staged" or _healthy(b), "staged")
        if outcome.ok:
            at = time.time() + self.lead_s
            log.info("rollout %s: every tier of %s staged %s; activating at %.3f", self.offer.rollout, cell,
                     self.model, at)
            self._publish_offer(cell, _with(self.offer, activate_at=at))
            outcome = self._wait(cell, expected, _healthy, "active and healthy")
        if not outcome.ok:
            self._publish_offer(cell, _with(self.offer, abort=outcome.reason))
        return outcome

    def _publish_offer(self, cell: str, offer: Offer) -> None:
        self.transport.publish(self.topics.rollout(cell), offer.to_json(), qos=1, retain=True)

    def _wait(self, cell: str, expected: set[str], done, what: str) -> CellOutcome:
        deadline = time.monotonic() + self.timeout_s
        with self.lock:
            while True:
                seen = dict(self.status.get(cell, {}))
                bad = [f"{k} {b['state']}: {b.get('reason')}" for k, b in seen.items()
                       if b["state"] in ("refused", "rolled-back")]
                if bad:
                    return CellOutcome(cell, False, "; ".join(bad), seen)
                waiting = sorted(k for k in expected if k not in seen or not done(seen[k]))
                if not waiting:
                    return CellOutcome(cell, True, "", seen)
                left = deadline - time.monotonic()
                if left <= 0:
                    return CellOutcome(cell, False, f"timed out after {self.timeout_s:g} s waiting for "
                                                    f"{', '.join(waiting)} to be {what}", seen)
                self.lock.wait(min(left, 0.5))


def _healthy(body: dict) -> bool:
    return body["state"] == "active" and body.get("health") == "ok"


def _with(offer: Offer, **change: object) -> Offer:
    return replace(offer, **change)


# -- what the tier commands take from their config (app/cli.py) --------------------------------

def stored_bundle(config, shards: list[str] | None, trust: dict):
    """The active bundle of the tier's store (``rollout.store``), if there is one."""
    r = config.rollout
    if r.store is None:
        return None
    store = BundleStore(r.store, keep=r.keep)
    bundle = store.load_active(shards=shards, trust=Trust(trust["trusted_keys"], trust["allow_unsigned"]))
    if bundle is not None:
        log.info("starting on model %s from the bundle store %s", bundle.manifest.model_id, r.store)
    return bundle


def rollout_kwargs(config, trust: dict) -> dict:
    """The ``rollout`` and ``trust`` arguments of a tier's service."""
    return {"rollout": config.rollout, "trust": Trust(trust["trusted_keys"], trust["allow_unsigned"])}


def load_or_stored(config, shards: list[str] | None, trust: dict):
    return stored_bundle(config, shards, trust) or load_bundle(config.bundle, shards=shards, **trust)


def run(transport: Transport, config) -> int:
    """``fogsplit rollout`` with its loaded config; 0 when every cell is on the new model, healthy."""
    rollout = Rollout(transport, Topics(config.fleet), Path(config.bundle), lead_s=config.lead_s,
                      timeout_s=config.timeout_s, chunk_bytes=config.chunk_bytes)
    cells = [config.canary_cell, config.cell] if config.canary_cell not in (None, config.cell) else [config.cell]
    outcomes = rollout.run(cells)
    for outcome in outcomes:
        print(f"cell {outcome.cell}: {'ok' if outcome.ok else 'FAILED: ' + outcome.reason}")
        for who, body in sorted(outcome.statuses.items()):
            print(f"  {who:<20} {body['state']:<12} health {body.get('health') or '-':<8} "
                  f"{body.get('reason') or ''}")
    ok = len(outcomes) == len(cells) and all(o.ok for o in outcomes)
    print(f"rollout {rollout.offer.rollout} of model {rollout.model}: {'done' if ok else 'stopped'}")
    return 0 if ok else 1
