"""The bi-directional spiral set of the paper's Appendix E (after the Latent ODE spiral example [6]).

Ground truth: `n` 2-D spirals sampled at `length` equally spaced times t in [0, t_max]; half run
clockwise, half counter-clockwise (Eqs. 8-9):

    clockwise:          R = a + b * 50 / theta,  x = R cos(theta) - 5,  y = R sin(theta),
                        theta = t_max + 1 - t  (in [1, t_max + 1])
    counter-clockwise:  R = a + b * theta,       x = R cos(theta) + 5,  y = R sin(theta),
                        theta = t              (in [0, t_max])

Choices the paper leaves open, made as the Latent ODE reference code makes them:
  - The clockwise angle runs backwards in time, theta = t_max + 1 - t. Time reversal is what makes
    the curve turn clockwise (with theta = t both curves would turn counter-clockwise), and the
    shift by `CLOCKWISE_ANGLE_SHIFT` = 1 keeps theta >= 1, so 50 / theta never divides by zero
    and R stays below a + 50 b.
  - t_max = 6 pi (three turns).
  - N(1.0, 0.08) and N(0.25, 0.03) are read as (mean, standard deviation), numpy's `normal(loc,
    scale)` convention; for the variance reading pass a_std=0.08 ** 0.5, b_std=0.03 ** 0.5.

From each spiral one window of `window` consecutive ground-truth steps starts at a uniformly random
offset in [0, length - 2 * window], so that the following `window` steps (the extrapolation
target) also exist; the observations are that window plus N(0, noise_std^2) noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

CLOCKWISE = 0
COUNTER_CLOCKWISE = 1
CLOCKWISE_ANGLE_SHIFT = 1.0
CENTRE_OFFSET = 5.0  # clockwise spirals are centred at x = -5, counter-clockwise ones at x = +5
CLOCKWISE_RADIUS_SCALE = 50.0
SPIRAL_TRAIN_SEED = 0
SPIRAL_TEST_SEED = 1


@dataclass(frozen=True)
class SpiralData:
    """Windows of noisy spirals with their ground truth and parameters (float32 unless stated).

    observations: (n, window, 2) noisy (x, y) on the observed window.
    truth: (n, window, 2) noise-free (x, y) on the same window (interpolation target).
    truth_next: (n, window, 2) noise-free (x, y) on the following window (extrapolation target).
    times: (2 * window,) time stamps relative to the window's start, shared by every spiral:
        times[:window] belong to `observations`, times[window:] to `truth_next`.
    start_times: (n,) absolute ground-truth time of each window's first step.
    a, b: (n,) spiral parameters; direction: (n,) int64, CLOCKWISE (0) or COUNTER_CLOCKWISE (1).
    """

    observations: Tensor
    truth: Tensor
    truth_next: Tensor
    times: Tensor
    start_times: Tensor
    a: Tensor
    b: Tensor
    direction: Tensor

    def __len__(self) -> int:
        return int(self.a.shape[0])

    @property
    def labels(self) -> Tensor:
        """(n, 3) float32 supervision targets (a, b, direction)."""
        return torch.stack([self.a, self.b, self.direction.to(torch.float32)], dim=1)


def spiral_points(t: np.ndarray, a: np.ndarray, b: np.ndarray, direction: np.ndarray, t_max: float) -> np.ndarray:
    """Ground-truth (x, y) at absolute times `t` ((n, k)) for per-spiral a, b, direction ((n,)); (n, k, 2)."""
    clockwise = (direction == CLOCKWISE)[:, None]
    theta_clockwise = t_max + CLOCKWISE_ANGLE_SHIFT - t  # >= 1 for t <= t_max
    theta = np.where(clockwise, theta_clockwise, t)
    radius = a[:, None] + b[:, None] * np.where(clockwise, CLOCKWISE_RADIUS_SCALE / theta_clockwise, t)
    centre = np.where(clockwise, -CENTRE_OFFSET, CENTRE_OFFSET)
    return np.stack([radius * np.cos(theta) + centre, radius * np.sin(theta)], axis=-1)


def make_spirals(
    n: int = 5000,
    length: int = 1000,
    window: int = 200,
    noise_std: float = 0.3,
    a_mean: float = 1.0,
    a_std: float = 0.08,
    b_mean: float = 0.25,
    b_std: float = 0.03,
    t_max: float = 6 * math.pi,
    *,
    seed: int = SPIRAL_TRAIN_SEED,
) -> SpiralData:
    """Generate the spiral set (module docstring); a pure function of its arguments.

    n // 2 spirals are clockwise and the rest counter-clockwise, in a seeded random order.
    """
    if n < 1 or window < 1 or length < 2 * window:
        raise ValueError(
            f"need n >= 1, window >= 1 and length >= 2 * window, got n={n}, window={window}, length={length}"
        )
    if noise_std < 0 or a_std < 0 or b_std < 0 or t_max <= 0:
        raise ValueError(
            f"standard deviations must be >= 0 and t_max > 0, got noise_std={noise_std}, "
            f"a_std={a_std}, b_std={b_std}, t_max={t_max}"
        )
    rng = np.random.default_rng(seed)
    direction = rng.permutation(np.repeat([CLOCKWISE, COUNTER_CLOCKWISE], [n // 2, n - n // 2]))
    a = rng.normal(a_mean, a_std, size=n)
    b = rng.normal(b_mean, b_std, size=n)
    step = t_max / (length - 1)
    offset = rng.integers(0, length - 2 * window, size=n, endpoint=True)
    start = offset * step
    relative = np.arange(2 * window) * step
    both_windows = spiral_points(start[:, None] + relative[None, :], a, b, direction, t_max)
    truth = both_windows[:, :window]
    observations = truth + rng.normal(0.0, noise_std, size=truth.shape)

    def as_float(values: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(torch.float32)

    return SpiralData(
        observations=as_float(observations),
        truth=as_float(truth),
        truth_next=as_float(both_windows[:, window:]),
        times=as_float(relative),
        start_times=as_float(start),
        a=as_float(a),
        b=as_float(b),
        direction=torch.from_numpy(direction.astype(np.int64)),
    )


def make_spiral_splits(
    train_seed: int = SPIRAL_TRAIN_SEED, test_seed: int = SPIRAL_TEST_SEED, **kwargs: Any
) -> tuple[SpiralData, SpiralData]:
    """(train, test) spiral sets made the same way from two different seeds; kwargs go to `make_spirals`."""
    if train_seed == test_seed:
        raise ValueError(f"train and test seeds must differ, both are {train_seed}")
    return make_spirals(seed=train_seed, **kwargs), make_spirals(seed=test_seed, **kwargs)
