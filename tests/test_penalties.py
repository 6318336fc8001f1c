"""Solver-aware penalties on the torchdiffeq backend, and the eval-mode method.

``record.local_error`` is checked against torchdiffeq's own error ratio step by step (to 1e-6
relative: the 8th-order error estimate cancels, and the two sum the stages in another order), the
stiffness against a field whose Lipschitz constant is known, and both gradients against
finite differences on a one-step solve (where the step size cannot move).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchdiffeq._impl.rk_common as rk_common
from torch import nn

from tolgate import FixedStepSize, FixedTolerance, GatedSolver
from tolgate.policies import ToleranceChoice, TolerancePolicy
from tolgate.solver import ADAPTIVE_METHODS

DTYPE = torch.float64
TIMES = torch.tensor([0.0, 1.0], dtype=DTYPE)


def _mlp(seed: int = 0, dim: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim)).to(DTYPE)


class _Logged(nn.Module):
    """A field that remembers the accepted steps' sizes (torchdiffeq's callback, forwarded by tolgate)."""

    def __init__(self, net: Callable[[torch.Tensor], torch.Tensor], tuple_state: bool = False) -> None:
        super().__init__()
        self.net = net
        self.tuple_state = tuple_state
        self.accepted: list[float] = []

    def forward(self, t: torch.Tensor, y):
        if self.tuple_state:
            z, s = y
            dz = self.net(z)
            return dz, -(dz * z).sum(1)
        return self.net(y)

    def callback_accept_step(self, t0, y0, dt) -> None:
        self.accepted.append(float(dt.detach()))


def _error_ratios(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, bool]]:
    """Record every error ratio torchdiffeq computes, with whether its step was accepted."""
    log: list[tuple[float, bool]] = []
    original = rk_common._compute_error_ratio

    def logged(*args, **kwargs):
        ratio = original(*args, **kwargs)
        log.append((float(ratio.detach()), bool(ratio <= 1)))
        return ratio

    monkeypatch.setattr(rk_common, "_compute_error_ratio", logged)
    return log


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
@pytest.mark.parametrize("tuple_state", [False, True])
def test_local_error_is_the_sum_of_torchdiffeqs_error_ratios_times_steps(monkeypatch, method, tuple_state):
    log = _error_ratios(monkeypatch)
    field = _Logged(_mlp(), tuple_state)
    y0 = torch.randn(6, 3, dtype=DTYPE)
    state = (y0, torch.zeros(6, dtype=DTYPE)) if tuple_state else y0
    solver = GatedSolver(FixedTolerance(1e-6), method=method, penalties=True)
    solver(field, state, TIMES)
    record = solver.records[-1]
    accepted = [ratio for ratio, ok in log if ok]
    assert len(accepted) == record.n_steps_accepted == len(field.accepted) > 1
    expected = sum(ratio * dt for ratio, dt in zip(accepted, field.accepted, strict=True))
    assert float(record.local_error.detach()) == pytest.approx(expected, rel=1e-6)
    assert record.local_error.requires_grad and record.stiffness.requires_grad


def test_local_error_with_per_sample_tolerances_and_reversed_time(monkeypatch):
    log = _error_ratios(monkeypatch)
    field = _Logged(_mlp(1))
    y0 = torch.randn(4, 3, dtype=DTYPE)

    class PerSample(TolerancePolicy):
        def __call__(self, context, progress):
            rtol = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3], dtype=DTYPE)
            return ToleranceChoice(rtol=rtol, atol=rtol)

    solver = GatedSolver(PerSample(), penalties=True)
    solver(field, y0, TIMES.flip(0))
    record = solver.records[-1]
    accepted = [ratio for ratio, ok in log if ok]
    expected = sum(ratio * dt for ratio, dt in zip(accepted, field.accepted, strict=True))
    assert float(record.local_error.detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_stiffness_of_a_linear_decay_is_its_rate_times_the_steps(method):
    # torchdiffeq steps past the last output time and interpolates back: the sum covers the steps taken.
    rate = 7.5
    field = _Logged(lambda y: -rate * y)
    solver = GatedSolver(FixedTolerance(1e-7), method=method, penalties=True)
    y0 = torch.randn(5, 2, dtype=DTYPE)
    solver(field, y0, torch.tensor([0.0, 2.0], dtype=DTYPE))
    assert sum(field.accepted) >= 2.0
    # rel 1e-6: the last two stages differ by about the local error, a cancellation in the ratio.
    assert float(solver.records[-1].stiffness) == pytest.approx(rate * sum(field.accepted), rel=1e-6)


def test_gradients_match_finite_differences_on_one_step():
    # One step of the whole interval (first_step = span, a loose tolerance accepts it): the step
    # size is fixed, so the penalties are smooth functions of the field's parameters.
    net = _mlp(2, dim=2)
    y0 = torch.randn(3, 2, dtype=DTYPE)
    solver = GatedSolver(FixedTolerance(1.0), options={"first_step": 0.5}, penalties=True)
    weight = net[0].weight

    def penalties(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def field(t, y):
            return net[2](torch.tanh(y @ w.T + net[0].bias))

        solver(field, y0, torch.tensor([0.0, 0.5], dtype=DTYPE))
        record = solver.records[-1]
        assert record.n_steps_accepted == 1 and record.n_steps_rejected == 0
        return record.local_error, record.stiffness

    assert torch.autograd.gradcheck(penalties, (weight.detach().clone().requires_grad_(True),))


def test_penalties_are_off_by_default_and_absent_on_fixed_grids():
    y0 = torch.randn(2, 3, dtype=DTYPE)
    net = _mlp()
    plain = GatedSolver(FixedTolerance(1e-5))
    plain(lambda t, y: net(y), y0, TIMES)
    assert plain.records[-1].local_error is None and plain.records[-1].stiffness is None
    grid = GatedSolver(FixedStepSize(0.25), method="rk4", penalties=True)
    grid(lambda t, y: net(y), y0, TIMES)
    assert grid.records[-1].local_error is None
    assert grid.records[-1].nfe_forward == 16


def test_a_single_output_time_gives_zero_penalties():
    solver = GatedSolver(FixedTolerance(1e-5), penalties=True)
    solver(lambda t, y: -y, torch.ones(2, 2, dtype=DTYPE), TIMES[:1])
    record = solver.records[-1]
    assert float(record.local_error) == 0.0 and float(record.stiffness) == 0.0


def test_penalties_refuse_the_adjoint_method():
    with pytest.raises(ValueError, match="adjoint=False"):
        GatedSolver(FixedTolerance(1e-5), adjoint=True, penalties=True)


def test_eval_method_is_used_in_eval_mode_only():
    net = _mlp()
    solver = GatedSolver(FixedStepSize(0.25), method="rk4", eval_method="dopri5", eval_policy=FixedTolerance(1e-5))
    y0 = torch.randn(2, 3, dtype=DTYPE)
    solver(lambda t, y: net(y), y0, TIMES)
    train = solver.records[-1]
    assert (train.method, train.nfe_forward, train.step_size, train.rtol) == ("rk4", 16, 0.25, None)
    solver.eval()
    solver(lambda t, y: net(y), y0, TIMES)
    evaluated = solver.records[-1]
    assert (evaluated.method, evaluated.rtol) == ("dopri5", 1e-5)
    assert "eval dopri5" in repr(solver)


def test_eval_method_is_checked_by_the_backend():
    with pytest.raises(ValueError, match="method"):
        GatedSolver(FixedTolerance(1e-5), eval_method="no_such_method")


def test_a_field_with_equal_stages_has_finite_gradients():
    # A zero last layer makes every stage's derivative equal (zero): no NaN through sqrt(0).
    net = _mlp(3)
    nn.init.zeros_(net[2].weight)
    solver = GatedSolver(FixedTolerance(1e-5), penalties=True)
    solver(lambda t, y: net(y), torch.randn(3, 3, dtype=DTYPE), TIMES)
    record = solver.records[-1]
    (record.local_error + record.stiffness).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
