"""The exceptions users catch.

torchdiffeq reports solver failures with bare ``assert`` statements, which ``python -O`` strips:
a step budget is then ignored and a NaN or a blow-up loops for ever. :class:`~tolgate.GatedSolver`
therefore checks the step budget, the step size and non-finite values itself, from torchdiffeq's
step callbacks (and the per-sample backend in its own step loop), and raises the typed exceptions
below, each carrying the :class:`~tolgate.records.SolveRecord` of the failed solve so far, with
or without ``-O``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import SolveRecord


class SolveError(RuntimeError):
    """Base class: an ODE solve could not finish. ``record`` holds the statistics so far."""

    def __init__(self, message: str, record: SolveRecord | None = None) -> None:
        super().__init__(message)
        self.record = record


class StepBudgetExceeded(SolveError):
    """The solver needed more steps (accepted and rejected) than ``max_num_steps`` allowed."""


class StepSizeUnderflow(SolveError):
    """The adaptive step size became too small to advance time (a few ulps of ``t``)."""


class NonFiniteStateError(SolveError):
    """NaN or inf in the solve: in the initial state, in the vector field's output, or in the
    solver's own arithmetic (an overflow of the state's dtype); the message says which."""


class NonFiniteToleranceError(ValueError):
    """A tolerance policy (for example a gate network) produced a NaN or infinite tolerance."""


class AdjointParamsError(TypeError, ValueError):
    """``adjoint=True`` with a field that is not an ``nn.Module`` and no ``adjoint_params``.

    Both a ``TypeError`` (the field's type is the problem; what :class:`~tolgate.GatedSolver`
    always raised) and a ``ValueError`` (what ``torchdiffeq.odeint_adjoint`` raises), so code
    written for either catches it.
    """
