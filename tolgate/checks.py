"""Input checks shared by both backends."""

from __future__ import annotations

import math

import torch


def check_times(t: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` is a 1-D tensor of >= 2 finite, strictly monotone times."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"t must be a 1-D tensor of at least two times, got {t!r}")
    # One device-to-host copy, then plain Python: output grids are short, and a handful of tensor
    # reductions here cost more than the copy (this runs on every solve).
    times = t.tolist()
    if not all(map(math.isfinite, times)):
        raise ValueError(f"t must be finite, got {times}")
    pairs = list(zip(times[:-1], times[1:], strict=True))
    if not (all(a < b for a, b in pairs) or all(a > b for a, b in pairs)):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got {times}")
