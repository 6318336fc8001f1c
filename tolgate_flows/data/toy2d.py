"""FFJORD's 2-D toy densities as seeded samplers (Grathwohl et al. 2019, ``lib/toy_data.py``).

Each sampler is ``sample(n, generator) -> (n, 2)`` float32, drawn from a CPU ``torch.Generator``
(never the global RNG), so a batch is a pure function of the generator's seed. The formulas are
FFJORD's, with one change: the pinwheel draws each sample's arm independently (FFJORD fills the
arms in equal counts and permutes), so any ``n`` works and a sample's label is its arm.

* ``8gaussians``: eight Gaussians of std ``0.5 / 1.414`` on a circle of radius ``4 / 1.414``.
* ``checkerboard``: uniform on the eight dark squares (side 2) of a checkerboard on ``[-4, 4]^2``;
  its density is ``1/32`` there, so its entropy is ``log 32 ~ 3.466`` nats.
* ``pinwheel``: five curved arms; :func:`labelled_pinwheel` returns the arm as a class label.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

PINWHEEL_ARMS = 5
_EIGHT_SCALE = 4.0
_EIGHT_STD = 0.5
_EIGHT_SHRINK = 1.414  # FFJORD divides the whole set by this after placing the blobs
_PINWHEEL_RADIAL_STD = 0.3
_PINWHEEL_TANGENTIAL_STD = 0.1
_PINWHEEL_RATE = 0.25

Sampler = Callable[[int, "torch.Generator | int"], Tensor]


def _generator(n: int, generator: torch.Generator | int) -> torch.Generator:
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


def eight_gaussians(n: int, generator: torch.Generator | int) -> Tensor:
    """``(n, 2)`` float32 samples of FFJORD's ``8gaussians``. ``generator``: a CPU generator
    (advanced by the draw) or an int seed (then the result is a pure function of it)."""
    generator = _generator(n, generator)
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centers = _EIGHT_SCALE * torch.stack([angles.cos(), angles.sin()], dim=1)
    blob = torch.randint(0, 8, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return ((centers[blob] + _EIGHT_STD * noise) / _EIGHT_SHRINK).to(torch.float32)


def checkerboard(n: int, generator: torch.Generator | int) -> Tensor:
    """``(n, 2)`` float32 samples of FFJORD's ``checkerboard`` (uniform on 8 squares of side 2)."""
    generator = _generator(n, generator)
    x1 = torch.rand(n, generator=generator, dtype=torch.float64) * 4 - 2
    x2 = torch.rand(n, generator=generator, dtype=torch.float64)
    x2 = x2 - 2 * torch.randint(0, 2, (n,), generator=generator) + torch.floor(x1) % 2
    return (2 * torch.stack([x1, x2], dim=1)).to(torch.float32)


def labelled_pinwheel(n: int, generator: torch.Generator | int, arms: int = PINWHEEL_ARMS) -> tuple[Tensor, Tensor]:
    """``(x (n, 2) float32, y (n,) int64)``: FFJORD's pinwheel and each sample's arm in ``[0, arms)``."""
    if arms < 2:
        raise ValueError(f"a pinwheel needs at least 2 arms, got {arms}")
    generator = _generator(n, generator)
    labels = torch.randint(0, arms, (n,), generator=generator)
    features = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    features = features * torch.tensor([_PINWHEEL_RADIAL_STD, _PINWHEEL_TANGENTIAL_STD], dtype=torch.float64)
    features[:, 0] += 1.0
    angles = labels.to(torch.float64) * (2 * math.pi / arms) + _PINWHEEL_RATE * features[:, 0].exp()
    cos, sin = angles.cos(), angles.sin()
    # FFJORD's einsum("ti,tij->tj", features, [[cos, -sin], [sin, cos]]): a row vector times R.
    x = torch.stack([features[:, 0] * cos + features[:, 1] * sin, -features[:, 0] * sin + features[:, 1] * cos], 1)
    return (2 * x).to(torch.float32), labels


def pinwheel(n: int, generator: torch.Generator | int) -> Tensor:
    """``(n, 2)`` float32 samples of FFJORD's five-armed ``pinwheel`` (labels dropped)."""
    return labelled_pinwheel(n, generator)[0]


TOY2D: dict[str, Sampler] = {"8gaussians": eight_gaussians, "checkerboard": checkerboard, "pinwheel": pinwheel}
