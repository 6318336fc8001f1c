"""The exceptions users catch.

torchdiffeq reports solver failures with bare ``assert`` statements (stripped under ``python -O``).
:class:`~tolgate.GatedSolver` translates them into the typed exceptions below, each carrying the
:class:`~tolgate.records.SolveRecord` of the failed solve so far.
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
    """The solver took more steps than ``max_num_steps`` allowed."""


class StepSizeUnderflow(SolveError):
    """The adaptive step size became too small to advance time."""


class NonFiniteStateError(SolveError):
    """NaN or inf appeared in the initial state or was produced by the vector field."""


class NonFiniteToleranceError(ValueError):
    """A tolerance policy (for example a gate network) produced a NaN or infinite tolerance."""
