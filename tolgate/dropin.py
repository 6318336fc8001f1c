"""``tolgate.odeint`` / ``tolgate.odeint_adjoint``: torchdiffeq's functions, through a GatedSolver.

Same signatures as ``torchdiffeq.odeint`` and ``torchdiffeq.odeint_adjoint``, plus ``policy``, so
``from tolgate import odeint`` replaces ``from torchdiffeq import odeint``. Without a policy the
caller's ``rtol``/``atol`` are used as given and the result is bitwise torchdiffeq's. Failures are
the typed :mod:`tolgate.errors` (each with ``exc.record``), also under ``python -O``.

A new GatedSolver per call (tens of microseconds): a call carries no state from the last one, and
its record is not kept; build a :class:`~tolgate.GatedSolver` to read records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .policies import Progress, ToleranceChoice, TolerancePolicy
from .solver import GatedSolver, State


class GivenTolerance(TolerancePolicy):
    """The caller's torchdiffeq tolerances, unchanged: floats, tensors broadcastable to the
    state, or one per tensor of a tuple state (``ToleranceChoice.per_element`` for the last two,
    and for floats outside ``(0, 1]``, such as ``rtol=0``)."""

    def __init__(self, rtol: Any, atol: Any) -> None:
        super().__init__()
        self.rtol, self.atol = rtol, atol
        self.per_element = not (_ordinary(rtol) and _ordinary(atol))

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        return ToleranceChoice(self.rtol, self.atol, per_element=self.per_element)


def _ordinary(tol: Any) -> bool:
    """A float in ``(0, 1]``: what a GatedSolver's own tolerance checks accept."""
    return isinstance(tol, (int, float)) and not isinstance(tol, bool) and math.isfinite(tol) and 0 < tol <= 1


def odeint(
    func: Callable[..., State],
    y0: State,
    t: torch.Tensor,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Callable[[torch.Tensor, State], torch.Tensor] | None = None,
    policy: TolerancePolicy | None = None,
) -> Any:
    """``torchdiffeq.odeint(func, y0, t, ...)`` through a :class:`~tolgate.GatedSolver`.

    ``y0``: tensor ``(*state)`` or tuple; ``t``: ``(n_times,)``, ``n_times >= 1``. Returns
    ``(n_times, *state)`` (``(event_t, ys)`` with ``event_fn``). ``policy`` (optional) chooses the
    tolerance or step size instead of ``rtol``/``atol``.
    """
    solver = _solver(policy, rtol, atol, method, options, adjoint=False)
    return solver(func, y0, t, event_fn=event_fn)


def odeint_adjoint(
    func: Callable[..., State],
    y0: State,
    t: torch.Tensor,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Callable[[torch.Tensor, State], torch.Tensor] | None = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_method: str | None = None,
    adjoint_options: dict[str, Any] | None = None,
    adjoint_params: Any = None,
    policy: TolerancePolicy | None = None,
) -> Any:
    """``torchdiffeq.odeint_adjoint(...)`` through a :class:`~tolgate.GatedSolver` (see :func:`odeint`).

    ``adjoint_rtol``/``adjoint_atol`` default to the forward solve's tolerances, as in torchdiffeq.
    """
    adjoint_tolerance = None
    if adjoint_rtol is not None or adjoint_atol is not None:
        adjoint_tolerance = (
            rtol if adjoint_rtol is None else adjoint_rtol,
            atol if adjoint_atol is None else adjoint_atol,
        )
    solver = _solver(
        policy,
        rtol,
        atol,
        method,
        options,
        adjoint=True,
        adjoint_tolerance=adjoint_tolerance,
        adjoint_method=adjoint_method,
        adjoint_options=adjoint_options,
    )
    params = None if adjoint_params is None else tuple(adjoint_params)
    return solver(func, y0, t, adjoint_params=params, event_fn=event_fn)


def _solver(
    policy: TolerancePolicy | None,
    rtol: Any,
    atol: Any,
    method: str | None,
    options: dict[str, Any] | None,
    **settings: Any,
) -> GatedSolver:
    given = GivenTolerance(rtol, atol) if policy is None else policy
    return GatedSolver(given, method=method or "dopri5", options=options, eval_policy=None, max_records=1, **settings)
