"""Training-time augmentation by sensor kind, on raw sensor values (before the device shard
normalises them), so that a small set covers more of what a sensor may produce.

- series: a small time warp and shift (a resampling by nearest index, so NaN that marks the end
  of a shorter series stays NaN and moves with it), per-channel scaling around the channel's
  mean, and jitter of a few hundredths of the channel's spread;
- images: a random crop of a border-padded view, and (only when ``flips``: a mirrored view must
  keep its label) a horizontal flip.

docs/training.md gives what it bought on each data set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WARP = 0.1      # time stretched by a factor in [1 - WARP, 1 + WARP] ...
SHIFT = 0.1     # ... and shifted by up to this share of the length
SCALE = 0.1     # per-channel amplitude factor: 1 +- this (one standard deviation)
JITTER = 0.03   # noise, in channel standard deviations
CROP = 0.125    # images: shifted by up to this share of the side (at least one pixel)


class Augmenter:
    """Augments each sensor's batch ``[B, C, ...]``; deterministic for a given seed."""

    def __init__(self, kind: str, stats: list[tuple], *, seed: int = 0, flips: bool = False) -> None:
        """``stats``: each sensor's per-channel ``(mean, std)`` of the raw values."""
        self.kind, self.flips = kind, flips
        self.stats = [(torch.as_tensor(m, dtype=torch.float32), torch.as_tensor(s, dtype=torch.float32))
                      for m, s in stats]
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, xs: list[Tensor]) -> list[Tensor]:
        if self.kind == "series":
            return [self._series(x, *stats) for x, stats in zip(xs, self.stats)]
        return [self._image(x) for x in xs]

    def _uniform(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.gen)

    def _series(self, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        b, c, t = x.shape
        stretch = 1 + WARP * (2 * self._uniform(b, 1) - 1)
        shift = SHIFT * t * (2 * self._uniform(b, 1) - 1)
        index = (torch.arange(t, dtype=torch.float32)[None] * stretch + shift).round().clamp(0, t - 1).long()
        x = torch.gather(x, 2, index[:, None, :].expand(b, c, t))
        mean, std = mean.reshape(1, c, 1), std.reshape(1, c, 1)
        factor = 1 + SCALE * torch.randn(b, c, 1, generator=self.gen)
        noise = JITTER * std * torch.randn(b, c, t, generator=self.gen)
        return mean + (x - mean) * factor + noise

    def _image(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        pad = max(1, round(CROP * min(h, w)))
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        dy = (self._uniform(b) * (2 * pad + 1)).long().clamp(max=2 * pad)
        dx = (self._uniform(b) * (2 * pad + 1)).long().clamp(max=2 * pad)
        rows = (dy[:, None] + torch.arange(h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
        cols = (dx[:, None] + torch.arange(w)).view(b, 1, 1, w).expand(b, c, h, w)
        out = torch.gather(torch.gather(padded, 2, rows), 3, cols)
        if self.flips:
            mirror = self._uniform(b) < 0.5
            out[mirror] = out[mirror].flip(-1)
        return out
