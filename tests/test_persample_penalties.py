"""Solver-aware penalties on the per-sample backend (tolgate.stepping, tolgate.penalties).

Each sample's ``record.local_error`` and ``record.stiffness`` are sums over its own accepted steps.
The tests check them three ways: a closed form (for ``y' = -lam y`` every step's Lipschitz
estimate is ``lam`` exactly, so ``stiffness == lam * |t1 - t0|``); a rebuild of every step from
the field's logged calls, with the controller's accept/reject test redone on them; and gradients
against a fixed-step replay of the accepted steps (the solver's step sizes depend on the field's
parameters but carry no gradient, so finite differences of the solver itself would measure
something else; at fixed steps they measure exactly what autograd computes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tolgate import FixedTolerance, GatedSolver, Progress, ToleranceChoice, TolerancePolicy, index_aware
from tolgate.persample import prepare_per_sample, run_prepared
from tolgate.records import SolveRecord
from tolgate.tableaux import TABLEAUX, get_tableau

F64 = torch.float64
METHODS = sorted(TABLEAUX)


# ---------------------------------------------------------------------------------------------
# Fields and solves


@dataclass(frozen=True)
class Call:
    """One logged evaluation: ``t`` ``(active,)``, ``y`` and ``f`` ``(active, dim)``, ``idx`` ``(active,)``."""

    t: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    f: torch.Tensor


class LoggedField(nn.Module):
    """An index-aware field that logs every forward evaluation (detached copies)."""

    takes_sample_index = True

    def __init__(self, dynamics: nn.Module) -> None:
        super().__init__()
        self.dynamics = dynamics
        self.calls: list[Call] = []

    def forward(self, t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = self.dynamics(t, y, idx)
        self.calls.append(Call(t.detach().clone(), y.detach().clone(), idx.clone(), out.detach().clone()))
        return out


class Decay(nn.Module):
    """``f(t, y) = -lam[idx] * y``: every row decays at its own rate ``lam`` ``(batch,)``."""

    def __init__(self, lam: torch.Tensor) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return -self.lam[idx].view(-1, *([1] * (y.dim() - 1))) * y


class Oscillators(nn.Module):
    """``f(t, y) = A[idx] y`` with damped rotations of per-row speed: rows take different steps."""

    def __init__(self, speeds: list[float]) -> None:
        super().__init__()
        base = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)
        self.matrices = torch.tensor(speeds, dtype=F64).view(-1, 1, 1) * base

    def forward(self, t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (self.matrices[idx] @ y.unsqueeze(-1)).squeeze(-1)


class TinyMLP(nn.Module):
    """A time-dependent ``tanh`` MLP, ``(rows, dim) -> (rows, dim)``, float64."""

    def __init__(self, dim: int = 2, hidden: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim)).double()

    def forward(self, t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        time = t.reshape(-1, 1).to(y.dtype).expand(y.shape[0], 1)
        return self.net(torch.cat([y, time], 1))


def solve(
    field: nn.Module | object,
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    method: str = "dopri5",
    tol: float = 1e-6,
    penalties: bool = True,
) -> SolveRecord:
    solver = GatedSolver(FixedTolerance(tol), method=method, backend="per_sample", penalties=penalties)
    solver(field, y0, t)
    return solver.records[-1]


# ---------------------------------------------------------------------------------------------
# The accepted steps, rebuilt from the log


@dataclass
class AcceptedStep:
    t: float  # start of the step
    h: float  # step size (time units, > 0: these tests solve forward)
    error_norm: float  # E: the controller's weighted RMS error
    rho: float  # ||f(Y_s) - f(Y_s-1)|| / ||Y_s - Y_s-1|| over the last two stages


def accepted_steps(calls: list[Call], method: str, rtol: float, atol: float) -> dict[int, list[AcceptedStep]]:
    """Each sample's accepted steps, from the field's calls: the first evaluation ``f(t0, y0)``, the
    initial-step probe, then ``stages - 1`` calls per attempted step on the active rows; a step is
    accepted when its error norm is below 1 (the controller's test, redone here)."""
    tableau = get_tableau(method)
    first, _probe, *attempts = calls
    state = {int(i): (float(first.t[p]), first.y[p], first.f[p]) for p, i in enumerate(first.idx)}
    steps: dict[int, list[AcceptedStep]] = {i: [] for i in state}
    per_step = tableau.stages - 1
    assert len(attempts) % per_step == 0
    for g in range(0, len(attempts), per_step):
        group = attempts[g : g + per_step]
        assert all(torch.equal(call.idx, group[0].idx) for call in group)  # one active set per step
        for p, i in enumerate(group[0].idx.tolist()):
            t, y, f = state[i]
            ys = [y] + [call.y[p] for call in group]
            ks = [f] + [call.f[p] for call in group]
            t1 = float(group[-1].t[p])  # FSAL: the last stage is at t1
            h = t1 - t
            error = h * sum(w * k for w, k in zip(tableau.b_error, ks, strict=True))
            scale = atol + rtol * torch.maximum(y.abs(), ys[-1].abs())
            error_norm = float((error / scale).square().mean().sqrt())
            if error_norm**2 < 1.0:
                rho = float((ks[-1] - ks[-2]).norm() / (ys[-1] - ys[-2]).norm())
                steps[i].append(AcceptedStep(t, h, error_norm, rho))
                state[i] = (t1, ys[-1], ks[-1])
    return steps


def fixed_step_penalties(
    dynamics: nn.Module, y0: torch.Tensor, steps: list[AcceptedStep], method: str, rtol: float, atol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum E h, sum rho h)`` of one sample ``y0`` ``(dim,)`` along the given steps, with gradient."""
    tableau = get_tableau(method)
    y = y0.unsqueeze(0)
    k0 = dynamics(torch.tensor([steps[0].t], dtype=F64), y)
    local_error = stiffness = torch.zeros((), dtype=F64)
    for step in steps:
        ys, ks = [y], [k0]
        for a_row, c in zip(tableau.a[1:], tableau.c[1:], strict=True):
            ys.append(y + step.h * sum(a * k for a, k in zip(a_row, ks, strict=False)))
            ks.append(dynamics(torch.tensor([step.t + c * step.h], dtype=F64), ys[-1]))
        error = step.h * sum(w * k for w, k in zip(tableau.b_error, ks, strict=True))
        scale = atol + rtol * torch.maximum(y.abs(), ys[-1].abs())
        local_error = local_error + (error / scale).square().mean().sqrt() * step.h
        stiffness = stiffness + (ks[-1] - ks[-2]).norm() / (ys[-1] - ys[-2]).norm() * step.h
        y, k0 = ys[-1], ks[-1]
    return local_error, stiffness


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backward", [False, True])
def test_stiffness_of_linear_decay_is_rate_times_interval(method: str, backward: bool) -> None:
    lam = torch.tensor([0.3, 2.0, 9.0, 40.0], dtype=F64)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([1.5, 0.25, -0.5], dtype=F64) if backward else torch.tensor([0.0, 0.7, 2.0], dtype=F64)
    record = solve(index_aware(Decay(lam)), y0, t, method=method, tol=1e-5)
    assert record.stiffness.shape == (4,) and record.local_error.shape == (4,)
    assert len(set(record.nfe_per_sample.tolist())) > 1  # the rows took different steps
    torch.testing.assert_close(record.stiffness, lam * 2.0, rtol=1e-10, atol=0)
    assert bool((record.local_error > 0).all()) and bool(torch.isfinite(record.local_error).all())


@settings(max_examples=10)
@given(
    rates=st.lists(st.floats(0.05, 50.0), min_size=1, max_size=5),
    log10_tol=st.floats(-9.0, -3.0),
    method=st.sampled_from(METHODS),
)
def test_stiffness_of_linear_decay_for_drawn_rates(rates: list[float], log10_tol: float, method: str) -> None:
    lam = torch.tensor(rates, dtype=F64)
    y0 = torch.linspace(0.5, 2.0, len(rates), dtype=F64).unsqueeze(1)
    record = solve(index_aware(Decay(lam)), y0, torch.tensor([0.0, 1.0], dtype=F64), method, 10.0**log10_tol)
    # The last two stages differ by about the local error (down to ~1e-9 of the state), so their
    # ratio carries the cancellation of that difference: 1e-6, not machine precision.
    torch.testing.assert_close(record.stiffness, lam, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_penalties_equal_the_sums_over_the_logged_accepted_steps(method: str) -> None:
    field = LoggedField(Oscillators([0.5, 2.0, 7.0, 20.0]))
    y0 = torch.randn(4, 2, dtype=F64)
    tol = 1e-5
    record = solve(field, y0, torch.tensor([0.0, 0.4, 3.0], dtype=F64), method, tol)
    steps = accepted_steps(field.calls, method, tol, tol)
    assert sum(len(s) for s in steps.values()) == record.n_steps_accepted
    expected_error = torch.tensor([sum(s.error_norm * s.h for s in steps[i]) for i in range(4)], dtype=F64)
    expected_stiffness = torch.tensor([sum(s.rho * s.h for s in steps[i]) for i in range(4)], dtype=F64)
    torch.testing.assert_close(record.local_error, expected_error, rtol=1e-10, atol=0)
    torch.testing.assert_close(record.stiffness, expected_stiffness, rtol=1e-10, atol=0)
    # Every accepted step passed the error test; the step's own norm is not the tolerance's.
    assert all(0.0 < s.error_norm < 1.0 for row in steps.values() for s in row)


def test_a_sample_penalties_do_not_depend_on_its_batch() -> None:
    field = index_aware(TinyMLP())
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.tensor([[0.5, -1.0], [0.5, -1.0], [2.0, 0.3], [0.5, -1.0]], dtype=F64)
    together = solve(field, y0, t)
    for name in ("local_error", "stiffness"):
        values = getattr(together, name)
        torch.testing.assert_close(values[[1, 3]], values[[0, 0]], rtol=1e-12, atol=0)
        for i in range(4):
            alone = getattr(solve(field, y0[i : i + 1], t), name)
            torch.testing.assert_close(values[i : i + 1], alone, rtol=1e-12, atol=0)


def test_a_tuple_state_uses_the_largest_part_norm() -> None:
    """Two equal parts have the RMS and the Lipschitz ratio of one: the penalties of ``y`` itself."""
    lam = torch.tensor([0.5, 5.0], dtype=F64)
    decay = Decay(lam)

    @index_aware
    def pair(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor) -> tuple:
        return decay(t, y[0], idx), decay(t, y[1], idx)

    y0 = torch.randn(2, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    single = solve(index_aware(decay), y0, t)
    double = solve(pair, (y0, y0.clone()), t)
    torch.testing.assert_close(double.local_error, single.local_error, rtol=1e-12, atol=0)
    torch.testing.assert_close(double.stiffness, single.stiffness, rtol=1e-12, atol=0)


def test_a_failed_sample_keeps_the_sums_of_its_accepted_steps() -> None:
    """With a step budget the fast rows stop early; their stiffness is lam times the time they reached."""
    lam = torch.tensor([0.2, 30.0, 80.0], dtype=F64)
    problem = prepare_per_sample(
        torch.ones(3, 2, dtype=F64), torch.tensor([0.0, 5.0], dtype=F64), 1e-8, 1e-8, "dopri5", max_num_steps=25
    )
    _, stats, penalties = run_prepared(Decay(lam), problem, raise_on_failure=False, penalties=True)
    assert stats.succeeded.tolist() == [True, False, False]
    torch.testing.assert_close(penalties.stiffness, lam * stats.t_reached, rtol=1e-10, atol=0)
    assert bool((penalties.local_error[1:] > 0).all())


def test_a_non_finite_sample_has_zero_penalties() -> None:
    y0 = torch.tensor([[1.0], [float("nan")]], dtype=F64)
    problem = prepare_per_sample(y0, torch.tensor([0.0, 1.0], dtype=F64), 1e-6, 1e-6, "bosh3", None)
    _, _, penalties = run_prepared(Decay(torch.ones(2, dtype=F64)), problem, False, penalties=True)
    assert penalties.local_error[1] == 0 and penalties.stiffness[1] == 0
    assert penalties.local_error[0] > 0


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_gradients_equal_those_of_a_fixed_step_replay(method: str) -> None:
    torch.manual_seed(1)
    dynamics = TinyMLP()
    field = LoggedField(dynamics)
    y0 = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.7, 0.9]], dtype=F64)
    tol = 1e-5
    record = solve(field, y0, torch.tensor([0.0, 1.0], dtype=F64), method, tol)
    steps = accepted_steps(field.calls, method, tol, tol)
    params = list(dynamics.parameters())
    for i in range(3):
        replay = fixed_step_penalties(dynamics, y0[i], steps[i], method, tol, tol)
        for solved, replayed in zip((record.local_error[i], record.stiffness[i]), replay, strict=True):
            torch.testing.assert_close(solved, replayed, rtol=1e-8, atol=0)  # E: a difference of two solutions
            got = torch.autograd.grad(solved, params, retain_graph=True)
            want = torch.autograd.grad(replayed, params, retain_graph=True)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
    # The replay's own gradient is the derivative at fixed steps: check it by central differences.
    # (Not finer than 1e-4: dopri5's last two stage inputs differ by about the local error, so rho
    # carries a rounding noise far above float64's epsilon.)
    weight = params[0]
    probe = torch.zeros_like(weight)
    probe[1, 2] = 1.0
    eps = 1e-4

    def replayed_sum(shift: float) -> float:
        with torch.no_grad():
            weight.add_(shift * probe)
            total = sum(sum(fixed_step_penalties(dynamics, y0[i], steps[i], method, tol, tol)) for i in range(3))
            weight.sub_(shift * probe)
        return float(total)

    analytic = torch.autograd.grad(record.local_error.sum() + record.stiffness.sum(), weight)[0][1, 2]
    numeric = (replayed_sum(eps) - replayed_sum(-eps)) / (2 * eps)
    assert np.isclose(float(analytic), numeric, rtol=1e-5, atol=0)


def test_the_penalty_backpropagates_into_the_field() -> None:
    dynamics = TinyMLP()
    y0 = torch.randn(5, 2, dtype=F64)
    solver = GatedSolver(FixedTolerance(1e-5), backend="per_sample", penalties=True)
    ys = solver(index_aware(dynamics), y0, torch.tensor([0.0, 1.0], dtype=F64))
    record = solver.records[-1]
    (ys[-1].square().mean() + 0.1 * record.local_error.mean() + 0.01 * record.stiffness.mean()).backward()
    grads = [p.grad for p in dynamics.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool((g != 0).any()) for g in grads)


def test_a_constant_field_has_zero_error_and_a_finite_gradient() -> None:
    """A field whose output ignores ``y`` and ``t`` (a zero-initialised last layer, say) makes every
    step exact: ``E = 0``, where the square root alone would give an infinite derivative."""
    bias = nn.Parameter(torch.tensor([0.5, -0.25], dtype=F64))

    @index_aware
    def field(t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return bias.expand_as(y) + 0 * y

    record = solve(field, torch.ones(2, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert bool((record.local_error < 1e-100).all())
    (grad,) = torch.autograd.grad(record.local_error.sum(), bias)
    assert bool(torch.isfinite(grad).all())


# ---------------------------------------------------------------------------------------------
# Off, no step, and what is refused


def test_without_penalties_the_record_has_none() -> None:
    record = solve(
        index_aware(Decay(torch.ones(2, dtype=F64))),
        torch.ones(2, 1, dtype=F64),
        torch.tensor([0.0, 1.0]),
        penalties=False,
    )
    assert record.local_error is None and record.stiffness is None


def test_a_single_output_time_gives_zero_penalties() -> None:
    record = solve(index_aware(Decay(torch.ones(3, dtype=F64))), torch.ones(3, 1, dtype=F64), torch.tensor([0.0]))
    assert record.local_error.shape == (3,) and not bool(record.local_error.any())
    assert record.stiffness.shape == (3,) and not bool(record.stiffness.any())


def test_penalties_are_in_the_error_control_dtype_of_a_16_bit_state() -> None:
    """Rates that are powers of two make ``f`` exact in float16, so ``rho`` is the rate exactly.

    bosh3: its last two stages sit at ``3/4 h`` and ``h``. dopri5's both sit at ``h`` and differ by
    about the local error, which float16 often rounds to nothing (then ``rho = 0`` for the step).
    """
    lam = torch.tensor([1.0, 4.0], dtype=torch.float16)
    t = torch.tensor([0.0, 1.0])
    record = solve(index_aware(Decay(lam)), torch.ones(2, 2, dtype=torch.float16), t, "bosh3", tol=1e-2)
    assert record.local_error.dtype == torch.float32 and record.stiffness.dtype == torch.float32
    torch.testing.assert_close(record.stiffness, lam.float(), rtol=1e-6, atol=0)
    assert bool((record.local_error > 0).all())


def test_penalties_with_adjoint_are_refused() -> None:
    with pytest.raises(NotImplementedError, match="adjoint=False"):
        GatedSolver(FixedTolerance(1e-5), backend="per_sample", adjoint=True, penalties=True)
    with pytest.raises(ValueError, match="penalties=True needs adjoint=False"):
        GatedSolver(FixedTolerance(1e-5), backend="torchdiffeq", adjoint=True, penalties=True)


class PerElement(TolerancePolicy):
    """A policy that hands torchdiffeq's own per-element tolerance layout through."""

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        tol = torch.full_like(context, 1e-5)
        return ToleranceChoice(tol, tol, per_element=True)


def test_per_element_tolerances_are_refused_before_solving() -> None:
    field = LoggedField(Decay(torch.ones(2, dtype=F64)))
    solver = GatedSolver(PerElement(), backend="per_sample", penalties=True)
    with pytest.raises(ValueError, match="per_element=True"):
        solver(field, torch.ones(2, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert field.calls == []
