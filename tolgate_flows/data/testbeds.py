"""The low-dimensional testbeds by name: the 1-D mixture, FFJORD's 2-D densities, a labelled pinwheel.

``TESTBEDS`` is the one list of names (CLIs derive their choices from it); :func:`toy_data`
returns what a run needs to know about one: its dimension, its number of classes (0: unlabelled)
and a box that holds its mass, for integrating a learned density over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .mixture import THREE_GAUSSIANS
from .toy2d import PINWHEEL_ARMS, TOY2D, labelled_pinwheel

TESTBEDS = ("1d", "8gaussians", "checkerboard", "pinwheel", "pinwheel-classes")

Draw = Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class ToyData:
    """One testbed's data.

    ``dim``: features per sample. ``n_classes``: 0 for unlabelled data. ``box``: ``(low, high)``
    per axis, the domain over which a fitted density is integrated. The data lie within about
    ``[-5, 5]``; the box is twice as wide, because a model early in training spreads its mass
    wider than the data (a flow that shrinks the data onto a standard normal is broad in ``x``).
    """

    name: str
    dim: int
    n_classes: int
    box: tuple[float, float]
    draw: Draw

    def sample(self, n: int, generator: torch.Generator | int) -> tuple[Tensor, Tensor | None]:
        """``(x (n, dim) float32, y (n,) int64 or None)``; ``generator``: a CPU generator or an int
        seed (then the result is a pure function of it)."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        return self.draw(n, generator)

    @property
    def labelled(self) -> bool:
        return self.n_classes > 0


def _unlabelled(sampler: Callable[[int, torch.Generator], Tensor]) -> Draw:
    return lambda n, generator: (sampler(n, generator), None)


_DATA = {
    "1d": ToyData("1d", 1, 0, (-10.0, 10.0), _unlabelled(THREE_GAUSSIANS.sample)),
    **{name: ToyData(name, 2, 0, (-10.0, 10.0), _unlabelled(sampler)) for name, sampler in TOY2D.items()},
    "pinwheel-classes": ToyData("pinwheel-classes", 2, PINWHEEL_ARMS, (-10.0, 10.0), labelled_pinwheel),
}


def toy_data(name: str) -> ToyData:
    """The testbed called ``name`` (one of ``TESTBEDS``)."""
    if name not in TESTBEDS:
        raise ValueError(f"testbed must be one of {TESTBEDS}, got {name!r}")
    return _DATA[name]
