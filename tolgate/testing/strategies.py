"""Hypothesis strategies for ODE problems, tolerances and methods (needs ``pip install hypothesis``).

Every problem is float64 and non-stiff, so any explicit adaptive method solves it at any tolerance
in ``[1e-9, 1e-3]`` (dopri5 in a few hundred evaluations; the second-order methods need ~10^4 steps
per unit time at 1e-9, so keep their tolerances looser in quick tests)::

    from hypothesis import given, settings
    from tolgate.testing import compare_with_reference
    from tolgate.testing.strategies import ode_problems, tolerances

    @settings(max_examples=20, deadline=None)
    @given(problem=ode_problems(), rtol=tolerances())
    def test_accuracy(problem, rtol):
        result = compare_with_reference(problem.field, problem.y0, problem.t, "dopri5", rtol)
        assert result.error <= 200.0

The drawn numbers are hypothesis floats (not a random seed), so a failing case shrinks to a small,
readable problem.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ..solver import ADAPTIVE_METHODS  # re-exported: the methods adaptive_methods() draws
from .problems import DampedPendulum, LinearField, LotkaVolterra, ODEProblem, stable_linear_matrix


def tolerances(smallest: float = 1e-9, largest: float = 1e-3) -> st.SearchStrategy[float]:
    """Tolerances log-uniform in ``[smallest, largest]`` (every decade equally likely)."""
    if not 0 < smallest <= largest <= 1:
        raise ValueError(f"need 0 < smallest <= largest <= 1, got {smallest!r}, {largest!r}")
    lo, hi = float(np.log10(smallest)), float(np.log10(largest))
    return st.floats(lo, hi).map(lambda exponent: float(10.0**exponent))


def adaptive_methods() -> st.SearchStrategy[str]:
    """One of torchdiffeq's adaptive Runge-Kutta methods (:data:`tolgate.solver.ADAPTIVE_METHODS`,
    derived from torchdiffeq's solver table, so a method torchdiffeq adds is drawn too)."""
    return st.sampled_from(ADAPTIVE_METHODS)


def _times(max_time: float) -> st.SearchStrategy[torch.Tensor]:
    """Output times ``linspace(0, T, n)``, ``T`` in ``[0.5, max_time]``, ``n`` in 2..5; float64."""
    return st.builds(
        lambda end, n: torch.linspace(0.0, end, n, dtype=torch.float64),
        st.floats(0.5, max_time),
        st.integers(2, 5),
    )


def _unit_arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    return arrays(np.float64, shape, elements=st.floats(-1.0, 1.0))


@st.composite
def stable_linear_systems(draw: st.DrawFn, min_dim: int = 1, max_dim: int = 8, max_time: float = 2.0) -> ODEProblem:
    """``dy/dt = A y`` with every eigenvalue of ``A`` in ``Re <= -decay`` (``decay`` in [0.1, 1]).

    ``A`` is :func:`~tolgate.testing.problems.stable_linear_matrix` of entries in ``[-1, 1]``: a
    rotation, a negative semi-definite part and a shift, so solutions decay and may oscillate.
    The spectral radius stays below about ``2 * dim``, so the systems are not stiff.
    """
    dim = draw(st.integers(min_dim, max_dim))
    rotation = torch.from_numpy(draw(_unit_arrays((dim, dim))))
    damping = torch.from_numpy(draw(_unit_arrays((dim, dim))))
    matrix = stable_linear_matrix(rotation, damping, draw(st.floats(0.1, 1.0)))
    # A zero initial state stays zero; keep the problem non-trivial.
    y0 = draw(arrays(np.float64, (dim,), elements=st.floats(-2.0, 2.0)).filter(lambda y: np.abs(y).max() >= 0.1))
    return ODEProblem(
        name=f"linear{dim}",
        field=LinearField(matrix),
        y0=torch.from_numpy(y0),
        t=draw(_times(max_time)),
    )


@st.composite
def lotka_volterra_problems(draw: st.DrawFn, max_time: float = 2.0) -> ODEProblem:
    """Predator-prey with rates in ``[0.5, 2]`` and populations in ``[0.5, 2]``: periodic orbits."""
    rates = [draw(st.floats(0.5, 2.0)) for _ in range(4)]
    y0 = torch.tensor([draw(st.floats(0.5, 2.0)), draw(st.floats(0.5, 2.0))], dtype=torch.float64)
    return ODEProblem(name="lotka_volterra", field=LotkaVolterra(*rates), y0=y0, t=draw(_times(max_time)))


@st.composite
def damped_pendulum_problems(draw: st.DrawFn, max_time: float = 2.0) -> ODEProblem:
    """A pendulum released at up to 3 rad with up to 2 rad/s, ``g/L`` in [1, 10], damping in [0.05, 1]."""
    field = DampedPendulum(g_over_length=draw(st.floats(1.0, 10.0)), damping=draw(st.floats(0.05, 1.0)))
    y0 = torch.tensor([draw(st.floats(-3.0, 3.0)), draw(st.floats(-2.0, 2.0))], dtype=torch.float64)
    return ODEProblem(name="damped_pendulum", field=field, y0=y0, t=draw(_times(max_time)))


def nonlinear_problems(max_time: float = 2.0) -> st.SearchStrategy[ODEProblem]:
    """Lotka-Volterra or damped pendulum."""
    return st.one_of(lotka_volterra_problems(max_time=max_time), damped_pendulum_problems(max_time=max_time))


def ode_problems(max_time: float = 2.0) -> st.SearchStrategy[ODEProblem]:
    """Any of the above: stable linear (dims 1-8), Lotka-Volterra, damped pendulum."""
    return st.one_of(stable_linear_systems(max_time=max_time), nonlinear_problems(max_time=max_time))
