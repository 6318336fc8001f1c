"""Tolerance policies: fixed, scheduled, Gaussian gate (sampling, clipping, censored log-prob)."""

from __future__ import annotations

import math
import re

import pytest
import scipy.stats
import torch
from scipy.integrate import quad
from torch import nn

from tolgate import (
    ConvGate,
    FixedTolerance,
    GatedSolver,
    GaussianGate,
    MLPGate,
    NonFiniteToleranceError,
    Progress,
    ScheduledTolerance,
    set_progress,
)
from tolgate.policies import censored_normal_log_prob

CONTEXT = torch.zeros(4, 3)


class ConstantNet(nn.Module):
    """Gate network whose output is one learnable row ``(mu offset, log-sigma offset)`` per sample."""

    def __init__(self, mu_offset: float = 0.0, log_std_offset: float = 0.0) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.tensor([mu_offset, log_std_offset], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw.expand(x.shape[0], 2)


# ---------------------------------------------------------------- FixedTolerance


def test_fixed_tolerance_defaults_atol_to_rtol() -> None:
    choice = FixedTolerance(1e-4)(CONTEXT, Progress())
    assert (choice.rtol, choice.atol, choice.log_prob) == (1e-4, 1e-4, None)
    choice = FixedTolerance(1e-4, 1e-7)(CONTEXT, Progress())
    assert (choice.rtol, choice.atol) == (1e-4, 1e-7)


@pytest.mark.parametrize("bad", [0.0, -1e-5, 1.5, math.nan, math.inf])
def test_invalid_tolerance_raises_value_error_naming_it(bad: float) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        FixedTolerance(bad)
    with pytest.raises(ValueError, match="atol"):
        FixedTolerance(1e-5, bad)


def test_non_numeric_tolerance_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="str"):
        FixedTolerance("1e-5")  # type: ignore[arg-type]


# ---------------------------------------------------------------- ScheduledTolerance


def test_log_linear_schedule_interpolates_in_log_space() -> None:
    policy = ScheduledTolerance.log_linear(1e-3, 1e-7, duration=10, unit="epoch")
    at = {epoch: policy(CONTEXT, Progress(epoch=epoch)).rtol for epoch in (-1.0, 0.0, 5.0, 10.0, 20.0)}
    assert at[0.0] == pytest.approx(1e-3, rel=1e-12)
    assert at[5.0] == pytest.approx(1e-5, rel=1e-12)  # halfway in log10
    assert at[10.0] == pytest.approx(1e-7, rel=1e-12)
    assert at[-1.0] == at[0.0] and at[20.0] == at[10.0]  # held at the ends


def test_schedule_reads_its_unit() -> None:
    by_step = ScheduledTolerance.log_linear(1e-2, 1e-4, duration=100, unit="step")
    assert by_step(CONTEXT, Progress(step=100, epoch=0.0)).rtol == pytest.approx(1e-4)
    assert by_step(CONTEXT, Progress(step=0, epoch=50.0)).rtol == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="'batch'"):
        ScheduledTolerance(lambda p: 1e-5, unit="batch")  # type: ignore[arg-type]


def test_piecewise_schedule_switches_exactly_at_boundaries() -> None:
    policy = ScheduledTolerance.piecewise([10, 20], [1e-3, 1e-4, 1e-5], unit="step")
    rtol = {step: policy(CONTEXT, Progress(step=step)).rtol for step in (0, 9, 10, 19, 20, 1000)}
    assert rtol == {0: 1e-3, 9: 1e-3, 10: 1e-4, 19: 1e-4, 20: 1e-5, 1000: 1e-5}


@pytest.mark.parametrize(
    ("boundaries", "values", "message"),
    [([10], [1e-3], "len"), ([20, 10], [1e-3, 1e-4, 1e-5], "increasing"), ([10], [1e-3, 0.0], "0.0")],
)
def test_piecewise_rejects_bad_arguments(boundaries: list, values: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScheduledTolerance.piecewise(boundaries, values)


def test_schedule_rejects_a_bad_atol_ratio() -> None:
    with pytest.raises(ValueError, match="nan"):
        ScheduledTolerance(lambda epoch: 1e-5, atol_ratio=math.nan)


def test_schedule_producing_an_invalid_tolerance_raises() -> None:
    policy = ScheduledTolerance(lambda epoch: 10.0**epoch)
    assert policy(CONTEXT, Progress(epoch=-2)).rtol == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="10.0"):
        policy(CONTEXT, Progress(epoch=1))


def test_set_progress_reaches_the_solver_policy() -> None:
    solver = GatedSolver(ScheduledTolerance.piecewise([3], [1e-3, 1e-6], unit="epoch"))
    model = nn.ModuleList([solver])
    y0, t = torch.ones(2, 2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    solver(lambda t, y: -y, y0, t)
    set_progress(model, step=7, epoch=3.0)
    solver(lambda t, y: -y, y0, t)
    assert [r.rtol for r in solver.records] == [1e-3, 1e-6]
    assert solver.records[0].nfe_forward < solver.records[1].nfe_forward


# ---------------------------------------------------------------- GaussianGate


def test_gate_draw_is_detached_and_log_prob_reaches_mean_and_std() -> None:
    net = ConstantNet()
    gate = GaussianGate(net, initial_log10=-5.0, initial_std=0.5)
    choice = gate(CONTEXT, Progress())
    assert isinstance(choice.rtol, float) and choice.atol == choice.rtol
    assert not choice.log10_tolerance.requires_grad and choice.log10_tolerance.shape == ()
    assert choice.rtol == pytest.approx(10.0 ** float(choice.log10_tolerance))
    assert choice.log_prob.shape == ()
    (grad,) = torch.autograd.grad(choice.log_prob, net.raw)
    # d/dmu log N(g; mu, s) = (g - mu)/s^2; d/dlog s = ((g - mu)/s)^2 - 1. Both non-zero a.s.
    z = (float(choice.log10_tolerance) + 5.0) / 0.5
    assert float(grad[0]) == pytest.approx(z / 0.5, rel=1e-9)
    assert float(grad[1]) == pytest.approx(z**2 - 1.0, rel=1e-9)


@pytest.mark.parametrize(("offset", "expected"), [(+10.0, 1e-1), (-10.0, 1e-8)])
def test_gate_draw_is_clipped_and_scored_as_censored(offset: float, expected: float) -> None:
    net = ConstantNet(mu_offset=offset)
    gate = GaussianGate(net, low=1e-8, high=1e-1, initial_log10=-5.0, initial_std=0.5)
    choice = gate(CONTEXT, Progress())
    assert choice.rtol == pytest.approx(expected, rel=1e-12)
    mu = -5.0 + offset
    if offset > 0:
        reference = scipy.stats.norm.logsf(-1.0, loc=mu, scale=0.5)  # mass above high
    else:
        reference = scipy.stats.norm.logcdf(-8.0, loc=mu, scale=0.5)  # mass below low
    assert float(choice.log_prob.detach()) == pytest.approx(reference, rel=1e-9)
    (grad,) = torch.autograd.grad(choice.log_prob, net.raw)
    assert float(grad[0].abs()) > 0 and float(grad[1].abs()) > 0


@pytest.mark.parametrize("value", [-8.0, -7.2, -3.0, -1.0])
def test_censored_log_prob_matches_scipy(value: float) -> None:
    mu, sigma = torch.tensor(-2.0, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    got = float(censored_normal_log_prob(torch.tensor(value, dtype=torch.float64), mu, sigma, -8.0, -1.0))
    if value <= -8.0:
        reference = scipy.stats.norm.logcdf(-8.0, -2.0, 1.3)
    elif value >= -1.0:
        reference = scipy.stats.norm.logsf(-1.0, -2.0, 1.3)
    else:
        reference = scipy.stats.norm.logpdf(value, -2.0, 1.3)
    assert got == pytest.approx(reference, rel=1e-10)


def test_censored_distribution_is_normalised() -> None:
    mu, sigma = torch.tensor(-1.5, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)

    def prob(value: float) -> float:
        return math.exp(float(censored_normal_log_prob(torch.tensor(value, dtype=torch.float64), mu, sigma, -2, -1)))

    density, _ = quad(prob, -2.0 + 1e-12, -1.0 - 1e-12)
    assert prob(-2.0) + density + prob(-1.0) == pytest.approx(1.0, abs=1e-8)


def test_per_sample_gate_gives_batch_shaped_tolerances() -> None:
    gate = GaussianGate(MLPGate(3), reduction="none", initial_log10=-4.0)
    choice = gate(torch.randn(5, 3), Progress())
    assert choice.rtol.shape == (5,) and choice.rtol.dtype == torch.float64
    assert not choice.rtol.requires_grad
    assert choice.log_prob.shape == (5,) and choice.log_prob.requires_grad
    assert torch.equal(choice.rtol, torch.pow(10.0, choice.log10_tolerance.double()))


def test_deterministic_choice_is_the_clipped_mean() -> None:
    gate = GaussianGate(ConstantNet(mu_offset=0.7), initial_log10=-5.0)
    choice = gate.deterministic(CONTEXT, Progress())
    assert choice.rtol == pytest.approx(10.0**-4.3) and choice.log_prob is None
    far = GaussianGate(ConstantNet(mu_offset=9.0), initial_log10=-5.0, high=1e-2)
    assert far.deterministic(CONTEXT, Progress()).rtol == pytest.approx(1e-2)


def test_freeze_stops_gradients() -> None:
    gate = GaussianGate(MLPGate(3)).freeze()
    assert all(not p.requires_grad for p in gate.parameters())
    assert not gate(torch.randn(4, 3), Progress()).log_prob.requires_grad


def test_gate_producing_nan_is_an_error() -> None:
    gate = GaussianGate(ConstantNet(mu_offset=math.nan))
    with pytest.raises(NonFiniteToleranceError, match="non-finite"):
        gate(CONTEXT, Progress())
    assert issubclass(NonFiniteToleranceError, ValueError)


def test_gate_network_with_wrong_output_shape_is_rejected() -> None:
    gate = GaussianGate(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        gate(CONTEXT, Progress())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low": 1e-3, "high": 1e-5}, "low < high"),
        ({"low": 0.0}, "low"),
        ({"reduction": "sum"}, "'sum'"),
        ({"initial_std": 0.0}, "initial_std"),
        ({"atol_ratio": 0.0}, "atol_ratio"),
    ],
)
def test_gate_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianGate(MLPGate(3), **kwargs)


@pytest.mark.parametrize("size", [8, 7, 28])
def test_conv_gate_output_shape_and_initial_tolerance(size: int) -> None:
    net = ConvGate(in_channels=3)
    with torch.no_grad():
        raw = net(torch.randn(6, 3, size, size))
    assert raw.shape == (6, 2)
    # Small head: an untrained gate starts near its initial tolerance but still reads its input.
    assert float(raw.abs().max()) < 0.5 and float(raw[:, 0].std()) > 0


def test_mlp_gate_flattens_its_input() -> None:
    assert MLPGate(12)(torch.randn(5, 3, 4)).shape == (5, 2)


# ---------------------------------------------------------------- FixedTolerance.from_gate


def test_from_gate_fixes_the_geometric_mean_of_the_gates_choices() -> None:
    gate = GaussianGate(MLPGate(3), initial_log10=-4.0, atol_ratio=0.1)  # one tolerance per solve
    contexts = [torch.randn(5, 3), torch.randn(7, 3)]
    per_solve = [float(gate.distribution(c)[0].detach()) for c in contexts]
    fixed = FixedTolerance.from_gate(gate, contexts)
    assert fixed.rtol == pytest.approx(10.0 ** (sum(per_solve) / 2), rel=1e-6)
    assert fixed.atol == pytest.approx(0.1 * fixed.rtol)
    with pytest.raises(ValueError, match="empty"):
        FixedTolerance.from_gate(gate, [])


def test_from_gate_averages_clipped_choices() -> None:
    # Per-sample means -2 +- 3 clip to [-5, -1] first: the fixed tolerance is what the gate used.
    net = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0], [0.0]]))
    context = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    per_sample = GaussianGate(net, low=1e-5, high=1e-1, reduction="none", initial_log10=-2.0)
    assert math.log10(FixedTolerance.from_gate(per_sample, [context]).rtol) == pytest.approx((-5 - 1) / 2)
    per_batch = GaussianGate(net, low=1e-5, high=1e-1, reduction="mean", initial_log10=-2.0)
    assert math.log10(FixedTolerance.from_gate(per_batch, [context]).rtol) == pytest.approx(-2.0)
