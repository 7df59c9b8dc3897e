"""Signed bundles: Ed25519 (RFC 8032) over the exact bytes of manifest.json.

The manifest holds every shard's sha256, so one 64-byte signature covers the whole bundle:
:func:`fogsplit.core.manifest.load_bundle` checks the signature, then the shards' digests.
``manifest.sig`` beside the manifest is a small JSON document::

    {"algorithm": "ed25519", "key_id": "3f1c...", "signature": "<base64, 64 bytes>"}

Key files are one line each, so that a public key can be pasted and read::

    <name>.pub   fogsplit-ed25519-public <base64 of the 32-byte key> <name>
    <name>.key   fogsplit-ed25519-private <base64 of the 32-byte seed> <name>   (mode 0600)

A refusal is a :class:`SignatureError` (a ``BundleError``) whose message starts with its
reason: ``unsigned``, ``tampered``, ``unknown key`` or ``malformed`` (manifest.sig unreadable).
Why PyNaCl: docs/signing.md (4 ms and 1 MB on the device, against 10 ms and 10 MB).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nacl.exceptions
import nacl.signing

from fogsplit.core.errors import BundleError, ConfigError

__all__ = ["ALGORITHM", "REASONS", "SIGNATURE", "KeyFileError", "PrivateKey", "PublicKey", "SignatureError",
           "key_id", "load_private_key", "load_public_key", "new_key_pair", "sign_bundle", "sign_ephemeral",
           "verify_bundle", "verify_manifest"]

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PUBLIC_TAG = "fogsplit-ed25519-public"
PRIVATE_TAG = "fogsplit-ed25519-private"
REASONS = ("unsigned", "tampered", "unknown key", "malformed")
MAX_SIG_BYTES = 4096
KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


class SignatureError(BundleError):
    """A bundle refused for its signature; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, bundle: Path, detail: str) -> None:
        super().__init__(f"{reason}: bundle {bundle}: {detail}")
        self.reason = reason
        self.bundle = bundle
        self.detail = detail


class KeyFileError(ConfigError):
    """A key file that cannot be read or is not a fogsplit Ed25519 key."""


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (32 bytes) and the name it was made under."""

    raw: bytes
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise KeyFileError(f"an Ed25519 public key is 32 bytes, got {self.raw!r:.40}")

    @property
    def id(self) -> str:
        return key_id(self)

    def verifies(self, message: bytes, signature: bytes) -> bool:
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def line(self) -> str:
        return f"{PUBLIC_TAG} {base64.b64encode(self.raw).decode()} {self.name}".rstrip() + "\n"


@dataclass(frozen=True)
class PrivateKey:
    """An Ed25519 signing key; never printed (``repr`` shows the key id only)."""

    _key: nacl.signing.SigningKey = field(repr=False)
    name: str = ""

    @classmethod
    def generate(cls, name: str = "") -> "PrivateKey":
        return cls(nacl.signing.SigningKey.generate(), name)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(bytes(self._key.verify_key), self.name)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature

    def __repr__(self) -> str:
        return f"PrivateKey(name={self.name!r}, id={self.public_key.id!r})"


def key_id(public_key: PublicKey) -> str:
    """Short hex of the key's sha256: what manifest.sig names and the logs show."""
    return hashlib.sha256(public_key.raw).hexdigest()[:16]


# -- key files ---------------------------------------------------------------------------------

def new_key_pair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (mode 0600, created so: never readable by others, even briefly)
    and ``<name>.pub`` into ``out_dir``; an existing file is never overwritten."""
    if not KEY_NAME.fullmatch(name):
        raise KeyFileError(f"key name {name!r}: letters, digits, '_', '.', '-' (1-64, not starting with '.'), "
                           "e.g. bundle-signing")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} exists: refusing to overwrite a key (remove it or choose another --name)")
    key = PrivateKey.generate(name)
    seed = base64.b64encode(bytes(key._key)).decode()
    _write_new(private_path, f"{PRIVATE_TAG} {seed} {name}\n", 0o600)
    _write_new(public_path, key.public_key.line(), 0o644)
    log.info("new signing key %s: %s (private), %s (public)", key.public_key.id, private_path, public_path)
    return private_path, public_path


def _write_new(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create the key file ({exc.strerror or exc})") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)


def load_public_key(path: str | os.PathLike) -> PublicKey:
    """A public key from its ``.pub`` file; a private key or anything else is refused."""
    _, raw, name = _read_key_file(Path(path), PUBLIC_TAG)
    return PublicKey(raw, name)


def load_private_key(path: str | os.PathLike) -> PrivateKey:
    """A signing key from its ``.key`` file. A file others may read is used, with a warning."""
    path = Path(path)
    _, seed, name = _read_key_file(path, PRIVATE_TAG)
    if os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s: the private signing key is readable by other users; chmod 600 it", path)
    return PrivateKey(nacl.signing.SigningKey(seed), name)


def _read_key_file(path: Path, want: str) -> tuple[str, bytes, str]:
    try:
        if path.stat().st_size > 1024:
            raise KeyFileError(f"{path}: not a fogsplit key file (larger than 1 KiB)")
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a fogsplit key file (not ASCII text)") from None
    words = text.split()
    if len(words) not in (2, 3) or words[0] not in (PUBLIC_TAG, PRIVATE_TAG):
        raise KeyFileError(f"{path}: not a fogsplit key file (expected one line '{want} <base64> [name]'; "
                           "make one with 'fogsplit keys new')")
    if words[0] != want:
        hint = "trust its .pub file instead" if want == PUBLIC_TAG else "sign with the .key file, not the .pub"
        raise KeyFileError(f"{path}: is a {'private' if words[0] == PRIVATE_TAG else 'public'} key; {hint}")
    try:
        raw = base64.b64decode(words[1], validate=True)
    except binascii.Error:
        raise KeyFileError(f"{path}: the key is not valid base64") from None
    if len(raw) != 32:
        raise KeyFileError(f"{path}: an Ed25519 key is 32 bytes, this one is {len(raw)}")
    return words[0], raw, words[2] if len(words) == 3 else ""


# -- signing and verifying ---------------------------------------------------------------------

def sign_bundle(bundle_dir: Path, private_key_path: Path | PrivateKey) -> Path:
    """Sign the exact bytes of ``bundle_dir/manifest.json``; write ``manifest.sig`` beside it
    (atomically: a reader sees the old signature or the new one). Returns its path."""
    bundle_dir = Path(bundle_dir)
    key = private_key_path if isinstance(private_key_path, PrivateKey) else load_private_key(private_key_path)
    try:
        manifest = (bundle_dir / MANIFEST).read_bytes()
    except OSError as exc:
        raise BundleError(f"{bundle_dir}: cannot read {MANIFEST} to sign it ({exc.strerror or exc})") from None
    body = {"algorithm": ALGORITHM, "key_id": key.public_key.id,
            "signature": base64.b64encode(key.sign(manifest)).decode()}
    out = bundle_dir / SIGNATURE
    tmp = out.with_name(f".{SIGNATURE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, out)
    log.info("signed %s with key %s", bundle_dir, key.public_key.id)
    return out


def sign_ephemeral(bundle_dir: Path) -> PublicKey:
    """Sign a bundle this process has just written with a one-off key kept only in memory, and
    return the public key to trust: how the demo and the benchmarks load what they trained."""
    key = PrivateKey.generate("ephemeral")
    sign_bundle(bundle_dir, key)
    return key.public_key


def verify_bundle(bundle_dir: Path, trusted_keys: Sequence[Path | PublicKey]) -> str:
    """The id of the trusted key that signed ``bundle_dir``'s manifest.json; else raises
    :class:`SignatureError` (``unsigned``, ``tampered``, ``unknown key``, ``malformed``)."""
    bundle_dir = Path(bundle_dir)
    try:
        manifest = (bundle_dir / MANIFEST).read_bytes()
    except OSError as exc:
        raise BundleError(f"{bundle_dir}: cannot read {MANIFEST} ({exc.strerror or exc})") from None
    return verify_manifest(bundle_dir, manifest, trusted_keys)


def verify_manifest(bundle_dir: Path, manifest: bytes, trusted_keys: Sequence[Path | PublicKey]) -> str:
    """As :func:`verify_bundle`, for manifest bytes already read (so that exactly the bytes
    verified are the bytes parsed)."""
    keys = {k.id: k for k in (k if isinstance(k, PublicKey) else load_public_key(k) for k in trusted_keys)}
    sig_path = Path(bundle_dir) / SIGNATURE
    if not sig_path.exists():
        raise SignatureError("unsigned", bundle_dir, f"no {SIGNATURE} (sign it with 'fogsplit sign', or allow "
                                                     "unsigned bundles with allow_unsigned)")
    key_name, signature = _read_signature(bundle_dir, sig_path)
    key = keys.get(key_name)
    if key is None:
        trusted = ", ".join(sorted(keys)) or "none"
        raise SignatureError("unknown key", bundle_dir, f"signed by key {key_name}, which is not trusted "
                                                        f"(trusted: {trusted})")
    if not key.verifies(manifest, signature):
        raise SignatureError("tampered", bundle_dir, f"{MANIFEST} does not match its signature by key {key_name}")
    return key_name


def _read_signature(bundle_dir: Path, sig_path: Path) -> tuple[str, bytes]:
    def malformed(problem: str) -> SignatureError:
        return SignatureError("malformed", bundle_dir, f"{SIGNATURE}: {problem}")

    try:
        if sig_path.stat().st_size > MAX_SIG_BYTES:
            raise malformed(f"larger than {MAX_SIG_BYTES} bytes")
        body = json.loads(sig_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise malformed(f"cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise malformed(f"not valid JSON ({exc})") from None
    if not isinstance(body, dict) or set(body) != {"algorithm", "key_id", "signature"}:
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise malformed(f"expected the keys ['algorithm', 'key_id', 'signature'], got {got}")
    if body["algorithm"] != ALGORITHM:
        raise malformed(f"algorithm {body['algorithm']!r}, this version verifies {ALGORITHM!r}")
    name = body["key_id"]
    if not isinstance(name, str) or len(name) != 16 or any(c not in "0123456789abcdef" for c in name):
        raise malformed(f"key_id {name!r} is not 16 hex digits")
    try:
        signature = base64.b64decode(body["signature"], validate=True) if isinstance(body["signature"], str) else b""
    except binascii.Error:
        signature = b""
    if len(signature) != 64:
        raise malformed("signature is not 64 bytes of base64")
    return name, signature
