"""Test problems: vector fields with known good behaviour, as torch callables ``field(t, y)``.

Each field maps ``t: ()`` and ``y: (..., dim)`` to ``dy/dt: (..., dim)``, so it works on a single
state or a batch, and with any floating dtype. :class:`ODEProblem` bundles a field with an
initial state and output times; :mod:`tolgate.testing.strategies` generates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def stable_linear_matrix(rotation: torch.Tensor, damping: torch.Tensor, decay: float) -> torch.Tensor:
    """``A = (R - R^T) - D D^T / dim - decay * I``: every eigenvalue has ``Re <= -decay``.

    ``rotation``, ``damping``: ``(dim, dim)`` (entries in [-1, 1] keep ``A`` non-stiff). The
    skew part rotates, ``-D D^T`` is negative semi-definite, and the shift makes solutions decay.
    """
    dim = rotation.shape[0]
    return (rotation - rotation.T) - damping @ damping.T / dim - decay * torch.eye(dim, dtype=rotation.dtype)


@dataclass(frozen=True)
class LinearField:
    """``dy/dt = y @ matrix.T``; ``matrix: (dim, dim)``."""

    matrix: torch.Tensor

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix.to(y.dtype).T


@dataclass(frozen=True)
class LotkaVolterra:
    """Predator-prey: ``x' = a x - b x y``, ``y' = d x y - c y``; state ``(..., 2)`` = (prey, predator)."""

    a: float = 1.5
    b: float = 1.0
    c: float = 3.0
    d: float = 1.0

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        prey, predator = y[..., 0], y[..., 1]
        return torch.stack(
            [self.a * prey - self.b * prey * predator, self.d * prey * predator - self.c * predator], dim=-1
        )


@dataclass(frozen=True)
class DampedPendulum:
    """``theta'' = -(g / length) sin(theta) - damping * theta'``; state ``(..., 2)`` = (angle rad, rad/s)."""

    g_over_length: float = 9.81
    damping: float = 0.5

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        angle, velocity = y[..., 0], y[..., 1]
        return torch.stack([velocity, -self.g_over_length * torch.sin(angle) - self.damping * velocity], dim=-1)


@dataclass(frozen=True)
class ODEProblem:
    """An initial value problem: ``field``, ``y0: (dim,)`` and output times ``t: (n,)``, float64."""

    name: str
    field: VectorField
    y0: torch.Tensor
    t: torch.Tensor
