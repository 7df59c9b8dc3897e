"""How much the local exit trusts each device, learnt on validation data.

A device whose sensor misleads (a loose IMU, a camera that rarely sees the object) should count
less than one that is right. The local exit of such a bundle fuses the device exits as a product
of experts, ``sum_k w_k * log_softmax(logits_k)`` over the devices that answered (the gateway's
``weighted`` fusion in fogsplit.core.fusion), with ``w_k >= 0`` fitted here by minimising the
cross-entropy on validation, pulled gently towards 1 so that a handful of validation samples
cannot silence a device.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fogsplit.core.fusion import log_softmax

PULL = 0.01    # L2 pull of every weight towards 1
STEPS = 100


def fit_fusion_weights(device_logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights ``[K]`` for device logits ``[N, K, C]`` and labels ``[N]``."""
    logp = torch.log_softmax(torch.as_tensor(device_logits, dtype=torch.float64), dim=2)
    target = torch.as_tensor(y, dtype=torch.long)
    theta = torch.full((logp.shape[1],), float(np.log(np.e - 1)), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=STEPS, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        w = F.softplus(theta)
        loss = F.cross_entropy((logp * w[None, :, None]).sum(1), target) + PULL * ((w - 1) ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return F.softplus(theta).detach().numpy().astype(np.float64)


def weighted_local(device_logits: np.ndarray, weights: np.ndarray,
                   present: np.ndarray | None = None) -> np.ndarray:
    """The ``weighted`` local exit ``[N, C]`` of device logits ``[N, K, C]`` (absent devices,
    where ``present`` [N, K] is False, left out): what the gateway computes."""
    logp = log_softmax(np.asarray(device_logits, np.float32), axis=2)
    w = np.asarray(weights, np.float32)[None, :, None]
    if present is not None:
        w = w * np.asarray(present, np.float32)[:, :, None]
    return (logp * w).sum(axis=1)
