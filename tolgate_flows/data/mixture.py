"""The 1-D mixture of three Gaussians of the paper's Appendix C (Figure 8), with its exact density.

The paper shows the mixture only as a plot; the parameters below are this package's explicit
choice of three well-separated, unequal modes of that shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MIXTURE_WEIGHTS: tuple[float, ...] = (0.3, 0.4, 0.3)
MIXTURE_MEANS: tuple[float, ...] = (-2.0, 0.0, 2.5)
MIXTURE_STDS: tuple[float, ...] = (0.5, 0.4, 0.6)


@dataclass(frozen=True)
class GaussianMixture1D:
    """A 1-D Gaussian mixture: weights (sum to 1), means and standard deviations, one per component."""

    weights: tuple[float, ...] = MIXTURE_WEIGHTS
    means: tuple[float, ...] = MIXTURE_MEANS
    stds: tuple[float, ...] = MIXTURE_STDS

    def __post_init__(self) -> None:
        if not len(self.weights) == len(self.means) == len(self.stds) >= 1:
            raise ValueError(
                f"weights, means and stds need one entry per component, got lengths "
                f"{len(self.weights)}, {len(self.means)}, {len(self.stds)}"
            )
        if min(self.weights) < 0 or abs(sum(self.weights) - 1.0) > 1e-12:
            raise ValueError(f"weights must be non-negative and sum to 1, got {self.weights}")
        if min(self.stds) <= 0:
            raise ValueError(f"standard deviations must be positive, got {self.stds}")

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density in nats at x (any shape; computed in x's floating dtype), same shape."""
        weights, means, stds = (
            torch.tensor(v, dtype=x.dtype, device=x.device) for v in (self.weights, self.means, self.stds)
        )
        z = (x.unsqueeze(-1) - means) / stds
        log_components = -0.5 * z**2 - torch.log(stds) - 0.5 * math.log(2 * math.pi)
        return torch.logsumexp(torch.log(weights) + log_components, dim=-1)

    def density(self, x: Tensor) -> Tensor:
        """Exact density at x, same shape as x."""
        return self.log_prob(x).exp()

    def sample(self, n: int, generator: torch.Generator | int) -> Tensor:
        """(n, 1) float32 samples, shaped as a batch of 1-D vectors for a CNF.

        generator: a CPU torch.Generator (advanced by the draw, for a stream of fresh batches) or an
        int seed (then the result is a pure function of it).
        """
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        component = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=generator)
        noise = torch.randn(n, generator=generator)
        x = torch.tensor(self.means)[component] + torch.tensor(self.stds)[component] * noise
        return x.to(torch.float32).unsqueeze(1)


THREE_GAUSSIANS = GaussianMixture1D()
