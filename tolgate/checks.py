"""Input checks shared by both backends, and the precision rules for 16-bit states.

Low precision (``float16``, ``bfloat16``). Below about ten units of roundoff the error estimate of
an embedded Runge-Kutta pair is roundoff noise: the controller shrinks the step until ``h * f``
is below half an ulp of ``y``, and the state stops moving while every step is accepted
(bfloat16 at rtol 1e-7 "succeeds" with an error of order one). So a 16-bit state needs
``rtol >= MIN_RTOL_IN_EPS * eps(dtype)`` (bfloat16: 0.078, float16: 0.0098), and both backends
compute the error control (tolerance scale, error ratio, norm) in float32, where the scaled
error cannot overflow: in float16, ``f / (atol + rtol |y|)`` overflows as soon as
``rtol |y|`` is small, which made the solver's own norm NaN. 32- and 64-bit states are not
limited: their roundoff degrades accuracy gracefully below ``rtol ~ eps`` and stagnation needs
``rtol`` near ``eps**2``, far below any tolerance in use.
"""

from __future__ import annotations

import math

import torch

LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)
#: a 16-bit state's smallest rtol, in units of its dtype's machine epsilon
MIN_RTOL_IN_EPS = 10.0


def check_times(t: torch.Tensor, min_times: int = 2) -> list[float]:
    """Raise ``ValueError`` unless ``t`` is a 1-D tensor of >= ``min_times`` finite, strictly
    monotone times (a single time: torchdiffeq returns ``y0`` stacked, a GatedSolver too).

    Returns the times as Python floats (``t.tolist()``).
    """
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < min_times:
        count = "one time" if min_times == 1 else f"at least {('one', 'two')[min_times - 1]} times"
        raise ValueError(f"t must be a 1-D tensor of {count}, got {t!r}")
    # One device-to-host copy, then plain Python: output grids are short, and a handful of tensor
    # reductions here cost more than the copy (this runs on every solve).
    times = t.tolist()
    if not all(map(math.isfinite, times)):
        raise ValueError(f"t must be finite, got {times}")
    pairs = list(zip(times[:-1], times[1:], strict=True))
    if not (all(a < b for a, b in pairs) or all(a > b for a, b in pairs)):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got {times}")
    return times


def control_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the error control for a state of ``state_dtype``: float32 for 16-bit states,
    the state's own dtype otherwise."""
    return torch.float32 if state_dtype in LOW_PRECISION_DTYPES else state_dtype


def check_rtol_for_dtype(rtol: float | torch.Tensor, state_dtype: torch.dtype, name: str = "rtol") -> None:
    """Raise ``ValueError`` when a 16-bit state is asked for an ``rtol`` below
    ``MIN_RTOL_IN_EPS * eps(state_dtype)``; ``rtol`` is a float or a tensor (its smallest entry
    counts). No check, and no device sync, for other dtypes."""
    if state_dtype not in LOW_PRECISION_DTYPES:
        return
    eps = torch.finfo(state_dtype).eps
    smallest = float(rtol.min()) if isinstance(rtol, torch.Tensor) else float(rtol)
    if smallest < MIN_RTOL_IN_EPS * eps:
        raise ValueError(
            f"{name}={smallest:.3g} is below what a {state_dtype} state can meet: its machine epsilon is "
            f"eps={eps:.3g}, and below {MIN_RTOL_IN_EPS:g} * eps = {MIN_RTOL_IN_EPS * eps:.3g} the error estimate is "
            f"roundoff (the state stops moving while steps are accepted); use {name} >= "
            f"{MIN_RTOL_IN_EPS * eps:.3g} or a float32 state"
        )


def state_dtype_of(y0: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.dtype:
    """The least precise dtype among the state's tensors (the one that limits the tolerance)."""
    tensors = y0 if isinstance(y0, tuple) else (y0,)
    return max((tensor.dtype for tensor in tensors), key=lambda dtype: torch.finfo(dtype).eps)
