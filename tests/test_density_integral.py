"""The 1-D density check of benchmarks/density_integral.py on a flow whose density is known exactly.

Field ``dz/dt = A z + c`` (constant in t) maps ``x`` to ``z(1) = e^A x + c (e^A - 1) / A`` with
``log|dz(1)/dx| = A``, so with ``z(1) ~ N(0, 1)`` the model density of ``x`` is the Gaussian
``N(-c (1 - e^-A) / A, e^-2A)``.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tolgate import FixedTolerance, GatedSolver
from tolgate_flows.cnf import CNFBlock

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "density_integral.py"
_SPEC = importlib.util.spec_from_file_location("density_integral", _PATH)
density_integral = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(density_integral)


class AffineField(nn.Module):
    def __init__(self, rate: float, shift: float) -> None:
        super().__init__()
        self.rate, self.shift = rate, shift

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.rate * z + self.shift


def affine_flow(rate: float, shift: float) -> CNFBlock:
    solver = GatedSolver(FixedTolerance(1e-7), eval_policy=FixedTolerance(1e-7))
    return CNFBlock(AffineField(rate, shift), solver, divergence="exact")


def closed_form(rate: float, shift: float) -> tuple[float, float]:
    """Mean and standard deviation of the model's Gaussian density of x."""
    return -shift * (1 - math.exp(-rate)) / rate, math.exp(-rate)


@settings(max_examples=15)
@given(rate=st.floats(-0.8, 0.8).filter(lambda r: abs(r) > 0.05), shift=st.floats(-1.0, 1.0))
def test_density_matches_closed_form_pointwise(rate: float, shift: float):
    block = affine_flow(rate, shift)
    mean, std = closed_form(rate, shift)
    x = torch.linspace(mean - 4 * std, mean + 4 * std, 9, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        got = density_integral.log_density(block, x)
    expected = torch.distributions.Normal(mean, std).log_prob(x.squeeze(1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # tolerance-sized error


@pytest.mark.parametrize("rate,shift", [(0.5, 0.3), (-0.4, -0.7)])
def test_riemann_integral_is_one_at_tolerance_1e7(rate: float, shift: float):
    block = affine_flow(rate, shift)
    density_integral.evaluate_at(block, 1e-7)
    mean, std = closed_form(rate, shift)
    value, stats = density_integral.riemann_integral(block, mean - 12 * std, mean + 12 * std, 2000)
    assert abs(1 - value) < 1e-3
    assert abs(1 - value) < 1e-6  # the exact flow at a tight tolerance leaves only the quadrature error
    assert stats["rtol"] == 1e-7 and stats["nfe"] > 0


def test_riemann_integral_sees_missing_mass():
    block = affine_flow(0.5, 0.3)
    density_integral.evaluate_at(block, 1e-7)
    mean, std = closed_form(0.5, 0.3)
    value, _ = density_integral.riemann_integral(block, mean, mean + 12 * std, 2000)  # half the line
    assert abs(value - 0.5) < 1e-6


def test_largest_safe_tolerance():
    rows = [{"tolerance": 10.0**-k, "riemann_error": e} for k, e in [(8, 1e-8), (6, 1e-6), (4, 5e-4), (2, 2e-3)]]
    assert density_integral.largest_safe_tolerance(rows, 1e-3) == 1e-4
    assert density_integral.largest_safe_tolerance(rows, 1e-7) == 1e-8
    assert density_integral.largest_safe_tolerance(rows, 1e-9) is None
