"""``tolgate.odeint`` / ``tolgate.odeint_adjoint``: torchdiffeq's functions, through a GatedSolver.

Same signatures as ``torchdiffeq.odeint`` and ``torchdiffeq.odeint_adjoint``, plus ``policy``, so
``from tolgate import odeint`` replaces ``from torchdiffeq import odeint``. Without a policy the
caller's ``rtol``/``atol`` are used as given and the result is bitwise torchdiffeq's. Failures are
the typed :mod:`tolgate.errors` (each with ``exc.record``), also under ``python -O``.

The signatures are not typed out here: each is read from the installed torchdiffeq function it
replaces (names, order, defaults), so the two cannot drift apart, and both share one
implementation, :class:`OdeintCall`. A keyword a newer torchdiffeq adds that tolgate does not know
is refused with a ``TypeError`` when a caller passes it, never silently dropped.

A new GatedSolver per call (tens of microseconds): a call carries no state from the last one, and
its record is not kept; build a :class:`~tolgate.GatedSolver` to read records.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchdiffeq

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


@dataclass(frozen=True)
class OdeintCall:
    """One ``odeint``/``odeint_adjoint`` call, by torchdiffeq's argument names (defaults: torchdiffeq's).

    ``func(t, y) -> dy/dt``; ``y0``: tensor ``(*state)`` or tuple of tensors; ``t``: ``(n_times,)``,
    ``n_times >= 1``, monotonic; ``rtol``/``atol``: floats, tensors broadcastable to the state, or
    one per tensor of a tuple state; ``event_fn(t, y) -> ()``. The ``adjoint_*`` fields are read by
    ``odeint_adjoint`` only; ``adjoint_rtol``/``adjoint_atol`` default to the forward solve's, as
    in torchdiffeq. ``policy`` (tolgate's addition) chooses the tolerance or step size instead of
    ``rtol``/``atol``.
    """

    func: Callable[..., State]
    y0: State
    t: torch.Tensor
    rtol: Any
    atol: Any
    method: str | None
    options: dict[str, Any] | None
    event_fn: Callable[[torch.Tensor, State], torch.Tensor] | None
    policy: TolerancePolicy | None
    adjoint_rtol: Any = None
    adjoint_atol: Any = None
    adjoint_method: str | None = None
    adjoint_options: dict[str, Any] | None = None
    adjoint_params: Any = None

    def solve(self, adjoint: bool) -> Any:
        """Run the call: ``(n_times, *state)`` (a tuple of those for a tuple state), or
        ``(event_t, ys)`` with ``event_fn``."""
        settings: dict[str, Any] = {"adjoint": adjoint}
        if adjoint:
            settings.update(
                adjoint_tolerance=self._adjoint_tolerance(),
                adjoint_method=self.adjoint_method,
                adjoint_options=self.adjoint_options,
            )
        policy = GivenTolerance(self.rtol, self.atol) if self.policy is None else self.policy
        solver = GatedSolver(
            policy, method=self.method or "dopri5", options=self.options, eval_policy=None, max_records=1, **settings
        )
        params = None if self.adjoint_params is None else tuple(self.adjoint_params)
        return solver(self.func, self.y0, self.t, adjoint_params=params, event_fn=self.event_fn)

    def _adjoint_tolerance(self) -> tuple[Any, Any] | None:
        """``None`` (the forward tolerances) unless the caller set one of ``adjoint_rtol``/``adjoint_atol``."""
        if self.adjoint_rtol is None and self.adjoint_atol is None:
            return None
        rtol = self.rtol if self.adjoint_rtol is None else self.adjoint_rtol
        atol = self.atol if self.adjoint_atol is None else self.adjoint_atol
        return rtol, atol


_POLICY = inspect.Parameter("policy", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="TolerancePolicy | None")
_KNOWN = frozenset(field.name for field in dataclasses.fields(OdeintCall))


def _drop_in(original: Callable[..., Any], adjoint: bool, doc: str) -> Callable[..., Any]:
    """A function with ``original``'s signature plus a keyword-only ``policy`` that runs
    :class:`OdeintCall`. Arguments are bound as Python binds them for ``original`` (the same
    ``TypeError`` for a missing or unknown one), then torchdiffeq's defaults are filled in."""
    signature = inspect.signature(original)
    signature = signature.replace(parameters=[*signature.parameters.values(), _POLICY])

    def drop_in(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        unknown = sorted(set(call.arguments) - _KNOWN)
        if unknown:
            raise TypeError(f"tolgate.{original.__name__} does not support torchdiffeq's argument(s) {unknown}")
        call.apply_defaults()
        return OdeintCall(**{name: value for name, value in call.arguments.items() if name in _KNOWN}).solve(adjoint)

    drop_in.__signature__ = signature  # what help() and inspect show
    drop_in.__name__ = drop_in.__qualname__ = original.__name__
    drop_in.__doc__ = doc
    return drop_in


odeint: Callable[..., Any] = _drop_in(
    torchdiffeq.odeint,
    adjoint=False,
    doc="""``torchdiffeq.odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None,
    event_fn=None)`` through a :class:`~tolgate.GatedSolver`, plus ``policy``.

    Arguments and result as :class:`OdeintCall` describes them.""",
)

odeint_adjoint: Callable[..., Any] = _drop_in(
    torchdiffeq.odeint_adjoint,
    adjoint=True,
    doc="""``torchdiffeq.odeint_adjoint(func, y0, t, *, ..., adjoint_rtol=None, adjoint_atol=None,
    adjoint_method=None, adjoint_options=None, adjoint_params=None)`` through a
    :class:`~tolgate.GatedSolver`, plus ``policy``.

    Arguments and result as :class:`OdeintCall` describes them; gradients by the adjoint method.""",
)
