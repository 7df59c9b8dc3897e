"""The bundles a tier has received over the air, on its own disk: one directory per model id,
a staging area, and a pointer to the active one, so that a restarted tier comes back on the
model it was serving (docs/rollout.md).

Layout under the store's root::

    <root>/<model_id>/      a verified bundle: manifest.json, its signature, this tier's shards
    <root>/.staging/<id>/   a bundle being assembled (never loaded from)
    <root>/active           the active model id, replaced atomically

Bound: at most ``keep`` bundles are kept; older ones (by the time they were stored) are deleted,
never the active one nor one the caller still holds.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from fogsplit.core.errors import BundleError
from fogsplit.core.manifest import Bundle, load_bundle

log = logging.getLogger(__name__)

ACTIVE = "active"
STAGING = ".staging"
_MODEL_ID = re.compile(r"^[0-9a-f]{6,64}$")


def check_model_id(model: object) -> str:
    """A model id as the manifest writes it (hex): it names a directory, so nothing else passes."""
    if not isinstance(model, str) or not _MODEL_ID.match(model):
        raise ValueError(f"model id {model!r} is not a hex model id")
    return model


class BundleStore:
    def __init__(self, root: str | Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self.deleted = 0

    def path(self, model: str) -> Path:
        return self.root / check_model_id(model)

    def has(self, model: str) -> bool:
        return (self.path(model) / "manifest.json").is_file()

    def staging(self, model: str) -> Path:
        """A fresh, empty staging directory for ``model``."""
        path = self.root / STAGING / check_model_id(model)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, model: str) -> Path:
        """Move ``model``'s staging directory into place (replacing an older copy)."""
        final = self.path(model)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(self.root / STAGING / model, final)
        return final

    def discard(self, model: str) -> None:
        """Drop ``model``'s staging directory."""
        shutil.rmtree(self.root / STAGING / check_model_id(model), ignore_errors=True)

    def remove(self, model: str) -> None:
        """Drop ``model`` from the store (staged or stored), unless it is the active one."""
        self.discard(model)
        if model != self.active():
            shutil.rmtree(self.path(model), ignore_errors=True)

    def active(self) -> str | None:
        try:
            model = (self.root / ACTIVE).read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return check_model_id(model)
        except ValueError:
            log.warning("%s: ignoring an active pointer that names no model (%r)", self.root, model[:80])
            return None

    def set_active(self, model: str | None) -> None:
        """Point at ``model`` (None: no bundle of the store is active; the tier's own --bundle is)."""
        pointer = self.root / ACTIVE
        if model is None:
            pointer.unlink(missing_ok=True)
            return
        tmp = self.root / f".{ACTIVE}.tmp"
        tmp.write_text(check_model_id(model) + "\n")
        os.replace(tmp, pointer)

    def prune(self, hold: Iterable[str] = ()) -> list[str]:
        """Delete all but the ``keep`` newest bundles; the active one and ``hold`` always stay."""
        keep = {self.active(), *hold}
        stored = sorted((p for p in self.root.iterdir() if p.is_dir() and _MODEL_ID.match(p.name)),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        gone = [p.name for p in stored[self.keep:] if p.name not in keep]
        for name in gone:
            shutil.rmtree(self.root / name, ignore_errors=True)
            self.deleted += 1
            log.info("%s: deleted bundle %s (keeping the %d newest)", self.root, name, self.keep)
        return gone

    def load(self, model: str, *, shards: list[str] | None, trust: Any) -> Bundle:
        """Verify and load a stored bundle (signature and the sha256 of ``shards``)."""
        return load_bundle(self.path(model), shards=shards, trusted_keys=trust.keys,
                           allow_unsigned=trust.allow_unsigned)

    def load_active(self, *, shards: list[str] | None, trust: Any) -> Bundle | None:
        """The active bundle, verified; None when there is none (or it no longer verifies)."""
        model = self.active()
        if model is None or not self.has(model):
            return None
        try:
            return self.load(model, shards=shards, trust=trust)
        except (BundleError, OSError) as exc:   # a damaged store must not keep the tier from starting
            log.error("%s: the active bundle %s does not load (%s); starting on the configured bundle",
                      self.root, model, exc)
            return None
