"""Gate networks: map a solve's context to the ``(batch, 2)`` raw output a GaussianGate reads.

Networks only; the distribution lives in :class:`~tolgate.policies.GaussianGate`. The heads are
initialised small (weights scaled by 0.1, zero bias) so an untrained gate starts near the gate's
``initial_log10`` tolerance while still varying with its input (a frozen random gate is a real
ablation, not a constant).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _small_head(in_features: int) -> nn.Linear:
    head = nn.Linear(in_features, 2)
    with torch.no_grad():
        head.weight.mul_(0.1)
        head.bias.zero_()
    return head


class ConvGate(nn.Module):
    """Small CNN gate (Figure 1): max-pool 2, two 3x3 convs (the second with stride 2), global
    average pool, linear head. Input ``(batch, in_channels, H, W)``; output ``(batch, 2)``."""

    def __init__(self, in_channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.GroupNorm(1, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.GroupNorm(1, hidden),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = _small_head(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked here: a wrong context would otherwise surface as a convolution's weight-shape error.
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ConvGate expects a context of shape (batch, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.head(self.features(x))


class MLPGate(nn.Module):
    """MLP gate for vector states. Input ``(batch, in_features)`` (extra dims are flattened)."""

    def __init__(self, in_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.in_features = in_features
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh())
        self.head = _small_head(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked here: a wrong context would otherwise surface as a raw matmul shape error.
        features = math.prod(x.shape[1:]) if x.dim() >= 2 else None
        if features != self.in_features:
            raise ValueError(
                f"MLPGate expects a context of shape (batch, {self.in_features}) (or (batch, *dims) with "
                f"prod(dims) == {self.in_features}), got {tuple(x.shape)}"
            )
        return self.head(self.body(x))
