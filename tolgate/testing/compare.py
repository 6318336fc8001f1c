"""Compare a tolgate solve with a tight scipy reference, in units of the requested tolerance.

The reference is ``scipy.integrate.solve_ivp(method="DOP853", rtol=1e-13, atol=1e-13)``, whose own
error is three to four orders of magnitude below the tightest tolerance tested (1e-9). The error is
reported the way scipy's own tests report it: divided elementwise by ``atol + rtol * |y_ref|``, so
1.0 means "off by exactly the tolerance" at that time and component.

Example (a property test of your own vector field)::

    from hypothesis import given
    from tolgate.testing import compare_with_reference
    from tolgate.testing.strategies import tolerances

    @given(rtol=tolerances())
    def test_my_field(rtol):
        result = compare_with_reference(my_field, y0, t, "dopri5", rtol)
        assert result.error <= 200.0

Global error is a multiple of the tolerance that depends on the method (dopri5 stayed within 39
on tolgate's benchmark problems; bosh3 and fehlberg2 need far larger bounds): see
``docs/tolgate.md`` and ``tests/test_accuracy.py`` for measured values and their reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..policies import FixedTolerance
from ..records import SolveRecord
from ..solver import GatedSolver
from .problems import VectorField

REFERENCE_TOLERANCE = 1e-13


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare_with_reference`.

    ``error``: max over times and components of ``|y - y_ref| / (atol + rtol * |y_ref|)``.
    ``solution``, ``reference``: ``(len(t), *y0.shape)``, float64. ``record``: the solve's record.
    """

    error: float
    solution: torch.Tensor
    reference: torch.Tensor
    record: SolveRecord

    @property
    def nfe(self) -> int:
        """Forward evaluations of the tolgate solve."""
        return self.record.nfe_forward


def reference_solution(field: VectorField, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``field``'s solution at times ``t: (n,)`` from ``y0: (*state)`` by scipy's DOP853 at 1e-13.

    Returns ``(n, *state)`` float64 on the CPU. Raises ``RuntimeError`` if scipy fails.
    """
    shape = tuple(y0.shape)
    times = t.detach().to(torch.float64).cpu().numpy()

    def rhs(time: float, y: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(y).reshape(shape)
        with torch.no_grad():
            out = field(torch.tensor(time, dtype=torch.float64), state)
        return out.detach().to(torch.float64).reshape(-1).numpy()

    solution = solve_ivp(
        rhs,
        (float(times[0]), float(times[-1])),
        y0.detach().to(torch.float64).cpu().reshape(-1).numpy(),
        method="DOP853",
        t_eval=times,
        rtol=REFERENCE_TOLERANCE,
        atol=REFERENCE_TOLERANCE,
    )
    if not solution.success:
        raise RuntimeError(f"scipy reference solve failed: {solution.message}")
    return torch.from_numpy(solution.y.T.copy()).reshape(len(times), *shape)


def normalized_error(solution: torch.Tensor, reference: torch.Tensor, rtol: float, atol: float) -> float:
    """``max |solution - reference| / (atol + rtol * |reference|)`` over all elements (same shapes)."""
    if solution.shape != reference.shape:
        raise ValueError(f"shapes differ: solution {tuple(solution.shape)}, reference {tuple(reference.shape)}")
    reference = reference.to(torch.float64)
    scale = atol + rtol * reference.abs()
    return float(((solution.detach().to(torch.float64).cpu() - reference) / scale).abs().max())


def compare_with_reference(
    field: VectorField,
    y0: torch.Tensor,
    t: torch.Tensor,
    method: str,
    rtol: float,
    atol: float | None = None,
    options: dict[str, Any] | None = None,
) -> Comparison:
    """Solve with ``GatedSolver(FixedTolerance(rtol, atol), method)`` and measure it against scipy.

    ``y0: (*state)`` and ``t: (n,)``, float64 recommended (float32 round-off is ~1e-7, larger
    than tight tolerances). ``atol`` defaults to ``rtol``.
    """
    atol = rtol if atol is None else atol
    solver = GatedSolver(FixedTolerance(rtol, atol), method=method, options=options)
    with torch.no_grad():
        solution = solver(field, y0, t)
    reference = reference_solution(field, y0, t)
    error = normalized_error(solution, reference, rtol, atol)
    return Comparison(error=error, solution=solution, reference=reference, record=solver.records[-1])
