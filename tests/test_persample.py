"""Properties of the per-sample solver (tolgate.persample, tolgate.stepping, tolgate.tableaux).

Nonlinear problems, tolerances and the DOP853 reference come from ``tolgate.testing``; the batches
of linear systems with per-sample matrices (and their exact solutions) are local helpers, since
``tolgate.testing``'s problems are single-sample fields.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tolgate.errors import NonFiniteStateError, StepBudgetExceeded, StepSizeUnderflow
from tolgate.persample import PerSampleData, from_torchdiffeq, solve_per_sample
from tolgate.sample_stats import SampleStatus
from tolgate.tableaux import TABLEAUX, ButcherTableau
from tolgate.testing import normalized_error, reference_solution
from tolgate.testing.strategies import nonlinear_problems, tolerances

SCIPY_METHOD = {"dopri5": "RK45", "bosh3": "RK23"}
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Problems


def damped_oscillators(scales: np.ndarray, damping: float = 0.1) -> torch.Tensor:
    """``(batch, 2, 2)`` stable linear systems ``scale * [[-d, 1], [-1, -d]]``: time scale 1/scale."""
    base = np.array([[-damping, 1.0], [-1.0, -damping]])
    return torch.tensor(scales[:, None, None] * base, dtype=F64)


def linear_field(matrices: torch.Tensor, counter: list[int] | None = None):
    """``f(t, y, idx) = A[idx] y``; counts the rows it is given in ``counter[0]``."""

    def field(t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if counter is not None:
            counter[0] += y.shape[0]
        return (matrices[idx] @ y.unsqueeze(-1)).squeeze(-1)

    return field


def exact_linear(matrices: torch.Tensor, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(len(t), batch, n)`` from the matrix exponential."""
    out = np.empty((len(t), *y0.shape))
    for i, (a, y) in enumerate(zip(matrices.numpy(), y0.numpy(), strict=True)):
        for j, tj in enumerate(t.tolist()):
            out[j, i] = scipy.linalg.expm(a * (tj - float(t[0]))) @ y
    return torch.tensor(out)


def scipy_solve(matrix: np.ndarray, y0: np.ndarray, t: np.ndarray, method: str, rtol: float, atol: float):
    sol = scipy.integrate.solve_ivp(
        lambda _t, y: matrix @ y, (t[0], t[-1]), y0, method=method, t_eval=t, rtol=rtol, atol=atol
    )
    assert sol.success
    return sol.y.T, sol.nfev


def scaled_error(ys: torch.Tensor, reference: torch.Tensor, rtol, atol) -> torch.Tensor:
    """Per-sample worst (over output times) RMS of ``|y - ref| / (atol + rtol |ref|)``."""
    rtol = torch.as_tensor(rtol, dtype=F64).reshape(1, -1, 1)
    atol = torch.as_tensor(atol, dtype=F64).reshape(1, -1, 1)
    scaled = (ys - reference) / (atol + rtol * reference.abs())
    return scaled.square().mean(-1).sqrt().amax(0)


@st.composite
def oscillator_batches(draw, method: str, max_batch: int = 6):
    """Independent 2-D stable linear systems of different time scales, each with its own tolerance.

    Tolerances go down to 1e-9 for the 5th-order methods and 1e-6 for bosh3, which would need
    tens of thousands of steps on the fastest oscillators at 1e-9."""
    batch = draw(st.integers(1, max_batch))
    log_scales = draw(st.lists(st.floats(-1.0, 1.5), min_size=batch, max_size=batch))
    damping = draw(st.floats(0.02, 1.0))
    y0 = draw(st.lists(st.floats(0.1, 2.0), min_size=2 * batch, max_size=2 * batch))
    lowest = -6.0 if TABLEAUX[method].order < 5 else -9.0
    log_tol = draw(st.lists(st.floats(lowest, -3.0), min_size=batch, max_size=batch))
    t_end = draw(st.floats(0.3, 2.0))
    return (
        damped_oscillators(10.0 ** np.array(log_scales), damping),
        torch.tensor(y0, dtype=F64).view(batch, 2),
        torch.tensor(10.0 ** np.array(log_tol)),
        t_end,
    )


# ---------------------------------------------------------------------------------------------
# Tableaux as data


@pytest.mark.parametrize("tableau", TABLEAUX.values(), ids=list(TABLEAUX))
def test_tableau_is_consistent(tableau: ButcherTableau) -> None:
    assert math.isclose(sum(tableau.b), 1.0, abs_tol=1e-14)
    assert math.isclose(sum(tableau.b_hat), 1.0, abs_tol=1e-14)
    assert abs(sum(tableau.b_error)) < 1e-14
    for row, c in zip(tableau.a, tableau.c, strict=True):
        assert math.isclose(sum(row), c, abs_tol=1e-14)
    # The interpolant ends on the step's solution: at theta = 1 its weights are b.
    at_one = np.array(tableau.dense).sum(1)
    np.testing.assert_allclose(at_one, tableau.b, atol=2e-14)


def _fixed_step(tableau: ButcherTableau, weights, n_steps: int, theta: float = 1.0) -> float:
    """Solve y' = -2 t y^2, y(0) = 1 (y = 1/(1+t^2)) to t = 1 with ``n_steps`` equal steps using
    ``weights`` for the update; return the error of the last step's dense output at ``theta``."""

    def f(t: float, y: float) -> float:
        return -2.0 * t * y * y

    h, y, t = 1.0 / n_steps, 1.0, 0.0
    for _ in range(n_steps):
        ks: list[float] = []
        for row, c in zip(tableau.a, tableau.c, strict=True):
            ks.append(f(t + c * h, y + h * sum(a * k for a, k in zip(row, ks, strict=False))))
        y_start = y
        y = y + h * sum(w * k for w, k in zip(weights, ks, strict=True))
        t = t + h
    if theta == 1.0:
        return abs(y - 0.5)
    powers = [theta ** (p + 1) for p in range(len(tableau.dense[0]))]
    dense_weights = [sum(d * q for d, q in zip(row, powers, strict=True)) for row in tableau.dense]
    interpolated = y_start + h * sum(w * k for w, k in zip(dense_weights, ks, strict=True))
    t_mid = t - h + theta * h
    return abs(interpolated - 1.0 / (1.0 + t_mid**2))


def _slope(errors: list[float], n_steps: list[int]) -> float:
    return float(np.polyfit(np.log(n_steps), np.log(errors), 1)[0]) * -1.0


@pytest.mark.parametrize("tableau", TABLEAUX.values(), ids=list(TABLEAUX))
def test_convergence_orders(tableau: ButcherTableau) -> None:
    # Step counts in each method's asymptotic range, above round-off.
    n_steps = [8, 16, 32, 64] if tableau.order >= 5 else [64, 128, 256]
    main = _slope([_fixed_step(tableau, tableau.b, n) for n in n_steps], n_steps)
    embedded = _slope([_fixed_step(tableau, tableau.b_hat, n) for n in n_steps], n_steps)
    dense = _slope([_fixed_step(tableau, tableau.b, n, theta=0.5) for n in n_steps], n_steps)
    assert tableau.order - 0.3 < main < tableau.order + 0.6, main
    assert tableau.embedded_order - 0.3 < embedded < tableau.embedded_order + 0.6, embedded
    assert dense > tableau.dense_order - 0.3, dense


# ---------------------------------------------------------------------------------------------
# The solver against scipy, sample by sample


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_each_sample_takes_scipys_steps(method: str, data: st.DataObject) -> None:
    """Same tableau, controller and initial step as scipy: each sample, solved in a batch with its
    own tolerance, reproduces scipy's solution (solved alone) and its NFE exactly."""
    matrices, y0, tol, t_end = data.draw(oscillator_batches(method))
    t = torch.linspace(0.0, t_end, 6, dtype=F64)
    ys, stats = solve_per_sample(linear_field(matrices), y0, t, rtol=tol, atol=tol, method=method)
    assert stats.succeeded.all()
    for i in range(y0.shape[0]):
        expected, nfev = scipy_solve(
            matrices[i].numpy(), y0[i].numpy(), t.numpy(), SCIPY_METHOD[method], float(tol[i]), float(tol[i])
        )
        assert int(stats.nfe[i]) == nfev
        np.testing.assert_allclose(ys[:, i].numpy(), expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=6, deadline=None)
@given(data=st.data(), method=st.sampled_from(sorted(TABLEAUX)))
def test_error_in_batch_no_worse_than_alone(data: st.DataObject, method: str) -> None:
    """Against the exact solution (the role scipy's DOP853 at 1e-13 plays for nonlinear fields):
    every sample's error in the batch is within a factor 1 + 1e-9 of its error solved alone."""
    matrices, y0, tol, t_end = data.draw(oscillator_batches(method))
    t = torch.linspace(0.0, t_end, 4, dtype=F64)
    reference = exact_linear(matrices, y0, t)
    ys, _ = solve_per_sample(linear_field(matrices), y0, t, rtol=tol, atol=tol, method=method)
    in_batch = scaled_error(ys, reference, tol, tol)
    for i in range(y0.shape[0]):
        alone_ys, _ = solve_per_sample(
            linear_field(matrices[i : i + 1]),
            y0[i : i + 1],
            t,
            rtol=float(tol[i]),
            atol=float(tol[i]),
            method=method,
        )
        alone = scaled_error(alone_ys, reference[:, i : i + 1], tol[i : i + 1], tol[i : i + 1])
        assert float(in_batch[i]) <= float(alone[0]) * (1 + 1e-9) + 1e-12


def _batched(problems: list) -> object:
    """One per-sample field from several single-sample ``tolgate.testing`` problems (row r runs
    ``problems[idx[r]].field``)."""

    def field(t, y, idx):
        return torch.stack([problems[i].field(t[r], y[r]) for r, i in enumerate(idx.tolist())])

    return field


@settings(max_examples=6, deadline=None)
@given(
    problems=st.lists(nonlinear_problems(max_time=1.5), min_size=2, max_size=4),
    rtols=st.lists(tolerances(1e-8, 1e-3), min_size=4, max_size=4),
    method=st.sampled_from(sorted(TABLEAUX)),
)
def test_error_against_dop853_in_batch_and_alone(problems, rtols, method: str) -> None:
    """Different nonlinear problems (Lotka-Volterra, pendulum) in one batch, each with its own
    tolerance: every sample's error against scipy's DOP853 at 1e-13 is within a factor 1 + 1e-9
    of its error solved alone, and at most 100 tolerances."""
    t = problems[0].t
    y0 = torch.stack([p.y0 for p in problems])
    rtol = torch.tensor(rtols[: len(problems)], dtype=F64)
    ys, stats = solve_per_sample(_batched(problems), y0, t, rtol=rtol, atol=rtol, method=method)
    assert stats.succeeded.all()
    for i, problem in enumerate(problems):
        reference = reference_solution(problem.field, problem.y0, t)
        tol = float(rtol[i])
        alone, _ = solve_per_sample(_batched([problem]), y0[i : i + 1], t, rtol=tol, atol=tol, method=method)
        in_batch_error = normalized_error(ys[:, i], reference, tol, tol)
        alone_error = normalized_error(alone[:, 0], reference, tol, tol)
        assert in_batch_error <= alone_error * (1 + 1e-9) + 1e-12
        assert in_batch_error <= 100.0


# ---------------------------------------------------------------------------------------------
# Batch composition and cost


def test_sample_is_invariant_to_batch_composition() -> None:
    """One sample alone vs. among 1,000 others whose time scales span four decades."""
    rng = np.random.default_rng(0)
    others = damped_oscillators(10.0 ** rng.uniform(-2.0, 2.0, 1000))
    probe = damped_oscillators(np.array([3.0]))
    matrices = torch.cat((others[:500], probe, others[500:]))
    y0 = torch.tensor(rng.normal(size=(1001, 2)), dtype=F64)
    rtol = torch.tensor(10.0 ** rng.uniform(-8.0, -3.0, 1001))
    t = torch.tensor([0.0, 0.25, 0.7, 1.0], dtype=F64)
    ys, stats = solve_per_sample(linear_field(matrices), y0, t, rtol=rtol, atol=1e-9)
    alone, alone_stats = solve_per_sample(linear_field(probe), y0[500:501], t, rtol=rtol[500:501], atol=1e-9)
    assert stats.succeeded.all()
    torch.testing.assert_close(ys[:, 500], alone[:, 0], rtol=0.0, atol=1e-12)
    assert int(stats.nfe[500]) == int(alone_stats.nfe[0])
    assert int(stats.n_rejected[500]) == int(alone_stats.n_rejected[0])


def test_rows_evaluated_equal_the_sum_of_solo_nfe() -> None:
    rng = np.random.default_rng(1)
    matrices = damped_oscillators(10.0 ** rng.uniform(-1.0, 2.0, 24))
    y0 = torch.tensor(rng.normal(size=(24, 2)), dtype=F64)
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    rows = [0]
    _, stats = solve_per_sample(linear_field(matrices, rows), y0, t, rtol=1e-6, atol=1e-6)
    solo_total = 0
    for i in range(24):
        _, solo = solve_per_sample(linear_field(matrices[i : i + 1]), y0[i : i + 1], t, rtol=1e-6, atol=1e-6)
        solo_total += solo.rows_evaluated
    assert rows[0] == stats.rows_evaluated  # the statistics count exactly the rows the field saw
    assert rows[0] == solo_total  # finished rows cost nothing (the issue asks for <= 1.2x)
    tableau = TABLEAUX["dopri5"]
    assert torch.equal(stats.nfe, 2 + (tableau.stages - 1) * stats.n_steps)


def test_per_sample_data_is_gathered_once_per_active_set() -> None:
    """PerSampleData relies on idx being the same object until rows leave; the result is the same
    as indexing on every call, and there are as many gathers as distinct active sets."""

    class CountingGathers:
        def __init__(self, data: torch.Tensor) -> None:
            self.data, self.gathers = data, 0

        def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
            self.gathers += 1
            return self.data.index_select(dim, idx)

    matrices = damped_oscillators(np.array([0.5, 2.0, 8.0, 30.0]))
    source = CountingGathers(matrices)
    data = PerSampleData(source)
    active_sets = set()

    def field(t, y, idx):
        active_sets.add(tuple(idx.tolist()))
        return (data[idx] @ y.unsqueeze(-1)).squeeze(-1)

    y0 = torch.ones(4, 2, dtype=F64)
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    cached, _ = solve_per_sample(field, y0, t, rtol=1e-6, atol=1e-6)
    plain, _ = solve_per_sample(linear_field(matrices), y0, t, rtol=1e-6, atol=1e-6)
    assert torch.equal(cached, plain)
    assert source.gathers == len(active_sets) == 4  # the four samples finish at different steps


def test_per_sample_tolerance_sets_each_samples_cost() -> None:
    matrices = damped_oscillators(np.array([5.0, 5.0]))
    y0 = torch.ones(2, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    tol = torch.tensor([1e-3, 1e-9], dtype=F64)
    _, stats = solve_per_sample(linear_field(matrices), y0, t, rtol=tol, atol=tol)
    assert int(stats.nfe[0]) < int(stats.nfe[1])


# ---------------------------------------------------------------------------------------------
# Failures are per sample


def _nan_after(sample: int, when: float, matrices: torch.Tensor):
    base = linear_field(matrices)

    def field(t, y, idx):
        out = base(t, y, idx)
        poisoned = ((idx == sample) & (t > when)).unsqueeze(1)
        return torch.where(poisoned, torch.full_like(out, float("nan")), out)

    return field


def test_a_blowing_up_sample_is_frozen_and_the_others_finish() -> None:
    matrices = damped_oscillators(np.array([1.0, 3.0, 0.5, 2.0]))
    y0 = torch.ones(4, 2, dtype=F64)
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    ys, stats = solve_per_sample(_nan_after(2, 0.4, matrices), y0, t, rtol=1e-7, atol=1e-7)
    assert stats.status_of(2) is SampleStatus.NON_FINITE
    assert float(stats.t_reached[2]) <= 0.4
    assert torch.isnan(ys[-1, 2]).all() and torch.isfinite(ys[:2, 2]).all()
    keep = [0, 1, 3]
    clean, clean_stats = solve_per_sample(linear_field(matrices[keep]), y0[keep], t, rtol=1e-7, atol=1e-7)
    assert stats.succeeded[keep].all()
    torch.testing.assert_close(ys[:, keep], clean, rtol=0.0, atol=1e-12)
    assert torch.equal(stats.nfe[keep], clean_stats.nfe)
    assert stats.status_counts()[SampleStatus.SUCCESS] == 3


def test_a_sample_over_budget_is_reported_and_the_others_finish() -> None:
    matrices = damped_oscillators(np.array([1.0, 1.0, 1.0]))
    y0 = torch.ones(3, 2, dtype=F64)
    t = torch.linspace(0.0, 2.0, 3, dtype=F64)
    tol = torch.tensor([1e-4, 1e-11, 1e-4], dtype=F64)  # sample 1 needs far more steps
    ys, stats = solve_per_sample(linear_field(matrices), y0, t, rtol=tol, atol=tol, max_num_steps=40)
    assert stats.status.tolist() == [0, int(SampleStatus.STEP_BUDGET_EXCEEDED), 0]
    assert int(stats.n_steps[1]) == 40
    assert torch.isnan(ys[-1, 1]).all()
    reference = exact_linear(matrices, y0, t)
    assert float(scaled_error(ys[:, [0, 2]], reference[:, [0, 2]], 1e-4, 1e-4).max()) < 10.0
    with pytest.raises(StepBudgetExceeded, match="sample 1 "):
        solve_per_sample(linear_field(matrices), y0, t, rtol=tol, atol=tol, max_num_steps=40, on_failure="raise")


def test_finite_time_blow_up_underflows() -> None:
    """y' = y^2, y(0) = 1 blows up at t = 1: the step size underflows there (as in scipy)."""
    y0 = torch.tensor([[1.0], [0.1]], dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    _, stats = solve_per_sample(lambda t, y, idx: y * y, y0, t, rtol=1e-6, atol=1e-6)
    assert stats.status.tolist() == [int(SampleStatus.STEP_SIZE_UNDERFLOW), 0]
    assert 0.99 < float(stats.t_reached[0]) < 1.01
    with pytest.raises(StepSizeUnderflow, match="sample 0 "):
        solve_per_sample(lambda t, y, idx: y * y, y0, t, rtol=1e-6, atol=1e-6, on_failure="raise")


def test_non_finite_initial_state_and_raise_mode() -> None:
    matrices = damped_oscillators(np.array([1.0, 1.0, 1.0]))
    y0 = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 1.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    rows = [0]
    ys, stats = solve_per_sample(linear_field(matrices, rows), y0, t, rtol=1e-6, atol=1e-6)
    assert stats.status.tolist() == [0, int(SampleStatus.NON_FINITE), 0]
    assert int(stats.nfe[1]) == 0 and rows[0] == stats.rows_evaluated
    with pytest.raises(NonFiniteStateError, match="sample 1 "):
        solve_per_sample(linear_field(matrices), y0, t, rtol=1e-6, atol=1e-6, on_failure="raise")
    ones = torch.ones(4, 2, dtype=F64)
    with pytest.raises(NonFiniteStateError, match="sample 2 "):
        solve_per_sample(_nan_after(2, 0.4, damped_oscillators(np.ones(4))), ones, t, on_failure="raise")


# ---------------------------------------------------------------------------------------------
# Gradients, time direction, state structure, adapters, validation


def test_gradient_matches_finite_differences() -> None:
    """Backpropagation through the solve against central differences of the whole adaptive solve
    (tight tolerances, so step-size changes between the perturbed solves stay negligible)."""
    torch.manual_seed(0)
    weight = torch.randn(2, 2, dtype=F64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.2], dtype=F64)
    tol = torch.tensor([1e-10, 1e-11, 1e-12], dtype=F64)

    def loss_of(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def field(t, state, idx):
            return torch.tanh(state @ w.T) * (1 + 0.1 * t.unsqueeze(1)) - 0.2 * state

        ys, _ = solve_per_sample(field, y, t, rtol=tol, atol=tol)
        return (ys[1] ** 2).sum() + ys[2].sum()

    loss_of(weight, y0).backward()
    eps = 1e-5
    for which, grad in ((0, weight.grad), (1, y0.grad)):
        for k in range(grad.numel()):
            shifted = []
            for sign in (1.0, -1.0):
                args = [weight.detach().clone(), y0.detach().clone()]
                args[which].view(-1)[k] += sign * eps
                with torch.no_grad():
                    shifted.append(float(loss_of(*args)))
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            assert abs(float(grad.view(-1)[k]) - numeric) < 1e-6 * (1 + abs(numeric))


def test_decreasing_times_match_scipy() -> None:
    matrices = damped_oscillators(np.array([0.7, 4.0]))
    y0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=F64)
    t = torch.tensor([1.0, 0.6, 0.0, -0.5], dtype=F64)
    ys, stats = solve_per_sample(linear_field(matrices), y0, t, rtol=1e-8, atol=1e-8)
    for i in range(2):
        expected, nfev = scipy_solve(matrices[i].numpy(), y0[i].numpy(), t.numpy(), "RK45", 1e-8, 1e-8)
        assert int(stats.nfe[i]) == nfev
        np.testing.assert_allclose(ys[:, i].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(stats.t_reached, torch.full((2,), -0.5, dtype=F64))


def test_torchdiffeq_field_adapter_passes_per_row_time() -> None:
    """A torchdiffeq-style field that uses t by broadcasting, y' = -t * y."""
    y0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    ys, _ = solve_per_sample(from_torchdiffeq(lambda t, y: -t * y), y0, t, rtol=1e-10, atol=1e-10)
    expected = y0 * torch.exp(-(t**2) / 2).view(-1, 1, 1)
    torch.testing.assert_close(ys, expected, rtol=1e-8, atol=1e-10)


def test_tuple_state_follows_its_sample() -> None:
    """(z, logp)-style tuple state with per-sample auxiliary data indexed by idx."""
    rates = torch.tensor([0.5, 1.0, 3.0], dtype=F64)

    def field(t, state, idx):
        z, logp = state
        return -rates[idx].view(-1, 1, 1) * z, (-rates[idx] * 4).view(-1, 1)

    z0 = torch.ones(3, 2, 2, dtype=F64)
    logp0 = torch.zeros(3, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    (zs, logps), stats = solve_per_sample(field, (z0, logp0), t, rtol=1e-9, atol=1e-9)
    assert zs.shape == (2, 3, 2, 2) and logps.shape == (2, 3, 1)
    torch.testing.assert_close(zs[-1], torch.exp(-rates).view(3, 1, 1).expand(3, 2, 2), rtol=1e-7, atol=0)
    torch.testing.assert_close(logps[-1, :, 0], -4 * rates, rtol=1e-12, atol=1e-12)
    assert stats.succeeded.all() and stats.nfe[2] > stats.nfe[0]


@pytest.mark.parametrize("time_dtype", [torch.float32, F64])
def test_float32_state(time_dtype: torch.dtype) -> None:
    """A float32 state; the field sees t in the state's dtype whatever the dtype of ``t``."""
    base = linear_field(damped_oscillators(np.array([1.0, 10.0])).float())
    seen = set()

    def field(t, y, idx):
        seen.add(t.dtype)
        return base(t, y, idx)

    y0 = torch.ones(2, 2)
    t = torch.tensor([0.0, 1.0], dtype=time_dtype)
    ys, stats = solve_per_sample(field, y0, t, rtol=1e-5, atol=1e-5)
    assert ys.dtype == torch.float32 and seen == {torch.float32}
    assert stats.t_reached.dtype == time_dtype and torch.equal(stats.t_reached, t[-1].expand(2))
    reference = exact_linear(damped_oscillators(np.array([1.0, 10.0])), y0.double(), t.double())
    assert float(scaled_error(ys.double(), reference, 1e-5, 1e-5).max()) < 20.0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"rtol": 0.0}, ValueError),
        ({"rtol": -1e-3}, ValueError),
        ({"atol": float("nan")}, ValueError),
        ({"atol": float("inf")}, ValueError),
        ({"rtol": torch.tensor([1e-3, 0.0])}, ValueError),
        ({"rtol": torch.tensor([1e-3, float("nan")])}, ValueError),
        ({"rtol": torch.tensor([1e-3, 1e-3, 1e-3])}, ValueError),
        ({"rtol": "tight"}, TypeError),
        ({"method": "euler"}, ValueError),
        ({"on_failure": "ignore"}, ValueError),
        ({"max_num_steps": 0}, ValueError),
        ({"adjoint": True}, NotImplementedError),
    ],
)
def test_invalid_arguments_are_refused(kwargs, error) -> None:
    y0 = torch.ones(2, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(error):
        solve_per_sample(lambda t, y, idx: -y, y0, t, **kwargs)


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor([0.0, 1.0, 0.5]),
        torch.tensor([0.0]),
        torch.tensor([0.0, float("inf")]),
        torch.zeros(2, 2),
    ],
)
def test_invalid_times_are_refused(t) -> None:
    with pytest.raises(ValueError):
        solve_per_sample(lambda t, y, idx: -y, torch.ones(2, 2), t)
