"""Tensor codecs for what crosses the network, each a pair of pure functions.

A codec turns a float32 array into payload bytes plus a few parameters, and back. The
parameters that do not change per frame (the int8 scale and zero point) are calibrated at
export and live in the manifest; the frame carries only what the decoder needs to check.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fogsplit.core.errors import FrameError


@dataclass(frozen=True)
class CodecSpec:
    """A codec as named in the manifest: ``name``, its fixed parameters, an optional lossless stage."""

    name: str = "fp32"
    scale: float = 1.0
    zero_point: int = 0
    k: int = 0
    lossless: str = ""

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; known: {sorted(CODECS)}")
        if self.lossless not in ("", "zlib"):
            raise ValueError(f"unknown lossless stage {self.lossless!r}; known: zlib")
        if self.name == "int8" and not (self.scale > 0 and np.isfinite(self.scale)):
            raise ValueError(f"int8 codec needs a positive finite scale, got {self.scale}")
        if self.name == "topk" and self.k <= 0:
            raise ValueError("topk codec needs k > 0")

    def to_dict(self) -> dict:
        out: dict = {"name": self.name}
        if self.name == "int8":
            out.update(scale=self.scale, zero_point=self.zero_point)
        if self.name == "topk":
            out["k"] = self.k
        if self.lossless:
            out["lossless"] = self.lossless
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CodecSpec":
        allowed = {"name", "scale", "zero_point", "k", "lossless"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown codec keys {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class _Codec:
    encode: Callable[[np.ndarray, CodecSpec], bytes]
    decode: Callable[[bytes, tuple[int, ...], CodecSpec], np.ndarray]
    payload_size: Callable[[int, CodecSpec], int | None] = field(default=lambda n, spec: None)


def _enc_fp32(x: np.ndarray, spec: CodecSpec) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def _dec_fp32(b: bytes, shape: tuple[int, ...], spec: CodecSpec) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4").reshape(shape).astype(np.float32)


def _enc_fp16(x: np.ndarray, spec: CodecSpec) -> bytes:
    return np.ascontiguousarray(np.clip(x, -65504, 65504), dtype="<f2").tobytes()


def _dec_fp16(b: bytes, shape: tuple[int, ...], spec: CodecSpec) -> np.ndarray:
    return np.frombuffer(b, dtype="<f2").reshape(shape).astype(np.float32)


def _enc_int8(x: np.ndarray, spec: CodecSpec) -> bytes:
    q = np.rint(x / spec.scale) + spec.zero_point
    return np.clip(q, -128, 127).astype(np.int8).tobytes()


def _dec_int8(b: bytes, shape: tuple[int, ...], spec: CodecSpec) -> np.ndarray:
    q = np.frombuffer(b, dtype=np.int8).reshape(shape).astype(np.float32)
    return (q - spec.zero_point) * np.float32(spec.scale)


def _enc_sign(x: np.ndarray, spec: CodecSpec) -> bytes:
    return np.packbits((np.asarray(x) > 0).ravel()).tobytes()


def _dec_sign(b: bytes, shape: tuple[int, ...], spec: CodecSpec) -> np.ndarray:
    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(b, dtype=np.uint8), count=n)
    return (bits.astype(np.float32) * 2.0 - 1.0).reshape(shape)


def _enc_topk(x: np.ndarray, spec: CodecSpec) -> bytes:
    flat = np.asarray(x, dtype=np.float32).ravel()
    k = min(spec.k, flat.size)
    idx = np.sort(np.argpartition(-np.abs(flat), k - 1)[:k]).astype("<u4")
    return idx.tobytes() + flat[idx].astype("<f2").tobytes()


def _dec_topk(b: bytes, shape: tuple[int, ...], spec: CodecSpec) -> np.ndarray:
    n = int(np.prod(shape))
    k = min(spec.k, n)
    idx = np.frombuffer(b[: 4 * k], dtype="<u4")
    if idx.size and int(idx.max()) >= n:
        raise FrameError("payload", f"topk index {int(idx.max())} outside a tensor of {n} values")
    out = np.zeros(n, dtype=np.float32)
    out[idx] = np.frombuffer(b[4 * k:], dtype="<f2").astype(np.float32)
    return out.reshape(shape)


CODECS: dict[str, _Codec] = {
    "fp32": _Codec(_enc_fp32, _dec_fp32, lambda n, s: 4 * n),
    "fp16": _Codec(_enc_fp16, _dec_fp16, lambda n, s: 2 * n),
    "int8": _Codec(_enc_int8, _dec_int8, lambda n, s: n),
    "sign": _Codec(_enc_sign, _dec_sign, lambda n, s: (n + 7) // 8),
    "topk": _Codec(_enc_topk, _dec_topk, lambda n, s: 6 * min(s.k, n)),
    # Raw 8-bit sensor samples (camera pixels), sent as they are: the raw-offload baseline.
    "uint8": _Codec(lambda x, s: np.clip(np.rint(x), 0, 255).astype(np.uint8).tobytes(),
                    lambda b, shape, s: np.frombuffer(b, dtype=np.uint8).reshape(shape).astype(np.float32),
                    lambda n, s: n),
}

MAX_DECOMPRESSED = 4 * 1024 * 1024


def payload_bytes(spec: CodecSpec, values: int) -> int:
    """Payload size of a tensor of ``values`` numbers before any lossless stage."""
    return CODECS[spec.name].payload_size(values, spec)


def encode_tensor(x: np.ndarray, spec: CodecSpec) -> bytes:
    """Encode ``x`` with ``spec``; the shape travels separately in the frame."""
    payload = CODECS[spec.name].encode(np.asarray(x, dtype=np.float32), spec)
    return zlib.compress(payload, 6) if spec.lossless == "zlib" else payload


def decode_tensor(payload: bytes, shape: tuple[int, ...], spec: CodecSpec, *,
                  allow_nan: bool = False) -> np.ndarray:
    """Decode and check a payload; raises :class:`FrameError` when it cannot be the tensor.
    Infinite values are always refused; NaN only without ``allow_nan``."""
    if spec.lossless == "zlib":
        try:
            inflater = zlib.decompressobj()
            payload = inflater.decompress(payload, MAX_DECOMPRESSED)
        except zlib.error as exc:
            raise FrameError("payload", f"zlib stage failed: {exc}") from exc
        if inflater.unconsumed_tail:
            raise FrameError("size", f"zlib payload inflates past {MAX_DECOMPRESSED} bytes")
    n = int(np.prod(shape))
    expected = CODECS[spec.name].payload_size(n, spec)
    if expected is not None and len(payload) != expected:
        raise FrameError("payload", f"{spec.name} payload of {len(payload)} bytes does not fit "
                                    f"shape {list(shape)} (expected {expected})")
    x = CODECS[spec.name].decode(payload, shape, spec)
    if not (np.isfinite(x) | (allow_nan & np.isnan(x))).all():
        raise FrameError("finite", "tensor holds infinite values" if allow_nan else "tensor holds NaN or infinite values")
    return x


def calibrate_int8(samples: np.ndarray, percentile: float = 99.9) -> CodecSpec:
    """Affine int8 parameters covering ``samples`` (clipping the extreme tail)."""
    flat = np.asarray(samples, dtype=np.float64).ravel()
    lo = float(np.percentile(flat, 100 - percentile))
    hi = float(np.percentile(flat, percentile))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zero_point = int(np.clip(np.rint(-128 - lo / scale), -128, 127))
    return CodecSpec("int8", scale=scale, zero_point=zero_point)
