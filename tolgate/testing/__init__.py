"""Tools to property-test ODE solves: test problems and a scipy comparison helper.

:func:`compare_with_reference` solves a vector field with a :class:`~tolgate.GatedSolver` at a
fixed tolerance and returns its error against scipy's DOP853 at 1e-13, divided by
``atol + rtol * |y|``. The hypothesis strategies that generate problems, tolerances and methods
live in :mod:`tolgate.testing.strategies` (it needs ``hypothesis``, the ``test`` extra).
"""

from .compare import Comparison, compare_with_reference, normalized_error, reference_solution
from .problems import DampedPendulum, LinearField, LotkaVolterra, ODEProblem, VectorField, stable_linear_matrix

__all__ = [
    "Comparison",
    "DampedPendulum",
    "LinearField",
    "LotkaVolterra",
    "ODEProblem",
    "VectorField",
    "compare_with_reference",
    "normalized_error",
    "reference_solution",
    "stable_linear_matrix",
]
