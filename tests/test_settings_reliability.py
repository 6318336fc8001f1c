"""Settings that must never be silently wrong (issue 19, first part).

* ``solver.max_num_steps`` set after construction is honoured by both backends (it was ignored by
  the torchdiffeq one); a budget given in ``options`` is the same budget on both.
* A ``t`` that requires grad is refused by the per-sample backend (its gradient would be zero).
* ``adjoint_tolerance`` that is not a pair, and an ``eval_policy`` that is not a policy, are named at
  construction, not at the first solve.
* Scheduled tolerances pickle (schedules are objects), and a NaN duration is refused.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from tolgate import FixedTolerance, GatedSolver, ScheduledTolerance, StepBudgetExceeded

T = torch.tensor([0.0, 10.0], dtype=torch.float64)


def fast(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([-30.0 * y[:, 1], 30.0 * y[:, 0]], dim=1)


@pytest.mark.parametrize("backend", ["torchdiffeq", "per_sample"])
def test_a_step_budget_set_after_construction_is_honoured(backend: str) -> None:
    solver = GatedSolver(FixedTolerance(1e-8), backend=backend)
    y0 = torch.ones(3, 2, dtype=torch.float64)
    solver(fast, y0, T)  # no budget: it finishes
    solver.max_num_steps = 5
    with pytest.raises(StepBudgetExceeded):
        solver(fast, y0, T)
    solver.max_num_steps = None
    solver(fast, y0, T)
    with pytest.raises(ValueError, match="max_num_steps"):
        solver.max_num_steps = 0


@pytest.mark.parametrize("backend", ["torchdiffeq", "per_sample"])
def test_a_budget_in_options_is_the_same_budget_on_both_backends(backend: str) -> None:
    solver = GatedSolver(FixedTolerance(1e-8), backend=backend, options={"max_num_steps": 5})
    assert solver.max_num_steps == 5
    with pytest.raises(StepBudgetExceeded):
        solver(fast, torch.ones(2, 2, dtype=torch.float64), T)
    with pytest.raises(ValueError, match="disagree"):
        GatedSolver(FixedTolerance(1e-8), max_num_steps=4, options={"max_num_steps": 5})


def test_per_sample_backend_refuses_a_time_that_requires_grad() -> None:
    solver = GatedSolver(FixedTolerance(1e-6), backend="per_sample")
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="respect to t"):
        solver(fast, torch.ones(2, 2, dtype=torch.float64), t)
    out = GatedSolver(FixedTolerance(1e-6))(lambda t, y: -y, torch.ones(1, 1, dtype=torch.float64), t)
    (grad,) = torch.autograd.grad(out[-1].sum(), t)  # torchdiffeq: d y(t1)/d t1 = -y(t1)
    assert float(grad[1]) == pytest.approx(-math.exp(-1.0), rel=1e-4)


def test_adjoint_tolerance_and_eval_policy_are_checked_at_construction() -> None:
    with pytest.raises(TypeError, match="adjoint_tolerance must be a pair"):
        GatedSolver(FixedTolerance(1e-5), adjoint=True, adjoint_tolerance=1e-5)
    with pytest.raises(ValueError, match="adjoint rtol"):
        GatedSolver(FixedTolerance(1e-5), adjoint=True, adjoint_tolerance=(0.0, 1e-5))
    with pytest.raises(TypeError, match="eval_policy must be a TolerancePolicy"):
        GatedSolver(FixedTolerance(1e-5), eval_policy=1e-5)


def test_scheduled_solvers_pickle_and_behave_the_same() -> None:
    for policy in (
        ScheduledTolerance.log_linear(1e-5, 1e-3, duration=10.0),
        ScheduledTolerance.piecewise([2.0, 5.0], [1e-5, 1e-4, 1e-3]),
    ):
        solver = GatedSolver(policy)
        clone = pickle.loads(pickle.dumps(solver))
        for epoch in (0.0, 3.0, 7.5, 20.0):
            assert clone.policy.schedule(epoch) == solver.policy.schedule(epoch)
    assert ScheduledTolerance.log_linear(1e-5, 1e-3, duration=10.0).schedule(5.0) == pytest.approx(1e-4)


@pytest.mark.parametrize("duration", [math.nan, math.inf, 0.0, -1.0])
def test_a_schedule_needs_a_finite_positive_duration(duration: float) -> None:
    with pytest.raises(ValueError, match="duration"):
        ScheduledTolerance.log_linear(1e-5, 1e-3, duration=duration)


BAD_FIELDS = {
    "none": (lambda t, y: None, TypeError, "NoneType"),
    "float": (lambda t, y: 1.0, TypeError, "float"),
    "wrong-shape": (lambda t, y: y[:, :1], ValueError, r"shape \(3, 1\)"),
    "wrong-dtype": (lambda t, y: y.float(), TypeError, "torch.float32"),
    "tuple-for-tensor": (lambda t, y: (y,), TypeError, "tuple of 1"),
}


@pytest.mark.parametrize("backend", ["torchdiffeq", "per_sample"])
@pytest.mark.parametrize("name", BAD_FIELDS)
def test_what_a_field_returns_is_checked_on_its_first_evaluation(backend: str, name: str) -> None:
    field, error, message = BAD_FIELDS[name]
    solver = GatedSolver(FixedTolerance(1e-5), backend=backend)
    with pytest.raises(error, match=message) as raised:
        solver(field, torch.ones(3, 2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert "the state y is" in str(raised.value) or "for a state a tensor of shape (3, 2)" in str(raised.value)


def test_a_tuple_state_needs_a_tuple_of_matching_derivatives() -> None:
    solver = GatedSolver(FixedTolerance(1e-5))
    y0 = (torch.ones(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(TypeError, match="tuple of 1"):
        solver(lambda t, y: (y[0],), y0, t)
    with pytest.raises(ValueError, match="element 0 of the tuple"):
        solver(lambda t, y: (y[0].sum(), -y[1]), y0, t)
    out = solver(lambda t, y: (-y[0], y[0].sum(1)), y0, t)  # a good one still solves
    assert out[0].shape == (2, 2, 2)


@pytest.mark.parametrize("backend", ["torchdiffeq", "per_sample"])
def test_empty_states_and_integer_contexts_are_named(backend: str) -> None:
    solver = GatedSolver(FixedTolerance(1e-5), backend=backend)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="empty"):
        solver(lambda t, y: -y, torch.ones(0, 2, dtype=torch.float64), t)
    with pytest.raises(ValueError, match="empty tuple"):
        solver(lambda t, y: y, (), t)
    with pytest.raises(TypeError, match="context"):
        solver(lambda t, y: -y, torch.ones(2, 2, dtype=torch.float64), t, context=torch.ones(2, 2, dtype=torch.int64))
    assert len(solver.records) == 0  # refused before anything was solved
