"""Vector fields ``f(t, z)`` of the CNF blocks: a conv net for images, an MLP for vectors.

Both are stacks of time-aware layers with softplus between them (Appendix B: FFJORD's ODE net,
``c+1 -> 64 -> 64 -> 64 -> c`` with 3x3 convs). softplus rather than ReLU because the flow's
Jacobian trace must be smooth in ``z`` for the adaptive solver and for Eq. 2's integral.

Time embeddings:

* ``"concat"``: ``t`` enters every layer as one extra input channel (feature), FFJORD's
  ``ConcatConv2d``; the original InfoCNF runs used this.
* ``"concatsquash"``: ``layer(x) * sigmoid(W_g t + b_g) + W_b t`` per output channel, FFJORD's
  ``ConcatSquash``; ``t`` gates and shifts every channel instead of adding one input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

TimeEmbedding = Literal["concat", "concatsquash"]
TIME_EMBEDDINGS = ("concat", "concatsquash")

LayerFactory = Callable[[int, int], nn.Module]


class TimeLayer(nn.Module):
    """One linear or conv layer that also sees the scalar time ``t``.

    ``x``: ``(batch, dim_in, *spatial)``; returns ``(batch, dim_out, *spatial)``.
    """

    def __init__(self, make_layer: LayerFactory, dim_in: int, dim_out: int, time: TimeEmbedding) -> None:
        super().__init__()
        if time not in TIME_EMBEDDINGS:
            raise ValueError(f"time embedding must be one of {TIME_EMBEDDINGS}, got {time!r}")
        self.time = time
        if time == "concat":
            self.layer = make_layer(dim_in + 1, dim_out)
        else:
            self.layer = make_layer(dim_in, dim_out)
            self.time_gate = nn.Linear(1, dim_out)
            self.time_shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype=x.dtype)
        if self.time == "concat":
            return self.layer(torch.cat([x, torch.ones_like(x[:, :1]) * t], dim=1))
        out = self.layer(x)
        # t: a scalar, or per-sample times (batch, 1, ...) under the per-sample backend
        per_channel = (-1, out.shape[1]) + (1,) * (out.dim() - 2)
        t_in = t.reshape(-1, 1)
        gate = torch.sigmoid(self.time_gate(t_in)).view(per_channel)
        return out * gate + self.time_shift(t_in).view(per_channel)


class TimeDependentNet(nn.Module):
    """``dims[0] -> dims[1] -> ... -> dims[-1]`` time-aware layers, softplus between (not after the last)."""

    def __init__(self, make_layer: LayerFactory, dims: list[int], time: TimeEmbedding) -> None:
        super().__init__()
        pairs = zip(dims[:-1], dims[1:], strict=True)
        self.layers = nn.ModuleList(TimeLayer(make_layer, a, b, time) for a, b in pairs)
        self.activation = nn.Softplus()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``t``: scalar tensor; ``z``: ``(batch, dims[0], *spatial)``. Returns ``dz/dt``, same shape."""
        h = z
        for k, layer in enumerate(self.layers):
            h = layer(t, h)
            if k < len(self.layers) - 1:
                h = self.activation(h)
        return h


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ConvODENet(TimeDependentNet):
    """Image field: ``n_layers`` hidden 3x3 convs of width ``hidden`` and a 3x3 conv back to
    ``channels``. ``z``: ``(batch, channels, H, W)``; ``H, W`` are preserved (padding 1)."""

    def __init__(self, channels: int, hidden: int = 64, n_layers: int = 3, time: TimeEmbedding = "concat") -> None:
        _check_sizes(channels=channels, hidden=hidden, n_layers=n_layers)
        super().__init__(_conv3x3, [channels] + [hidden] * n_layers + [channels], time)


class MLPODENet(TimeDependentNet):
    """Vector field: ``n_layers`` hidden linear layers of width ``hidden``. ``z``: ``(batch, dim)``."""

    def __init__(self, dim: int, hidden: int = 64, n_layers: int = 2, time: TimeEmbedding = "concat") -> None:
        _check_sizes(dim=dim, hidden=hidden, n_layers=n_layers)
        super().__init__(nn.Linear, [dim] + [hidden] * n_layers + [dim], time)


def _conv3x3(dim_in: int, dim_out: int) -> nn.Module:
    return nn.Conv2d(dim_in, dim_out, kernel_size=3, padding=1)
