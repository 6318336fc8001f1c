"""Solver failures (issue 11, items 1, 2, 7): every failure typed, also under ``python -O``; low
precision refused or solved correctly; the record of every failed solve says what happened.

Each test is named for the failure it pins. The ``python -O`` cases run in one subprocess (one
torch import), whose results the ``test_under_python_O_*`` tests read.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torchdiffeq
from torch import nn

from tolgate import (
    FixedTolerance,
    GatedSolver,
    GaussianGate,
    MLPGate,
    NonFiniteStateError,
    SolveStatus,
    StepBudgetExceeded,
    StepSizeUnderflow,
    collect_records,
    from_torchdiffeq,
    solve_per_sample,
)
from tolgate.checks import MIN_RTOL_IN_EPS

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)
BACKENDS = ("torchdiffeq", "per_sample")


def field_for(backend: str, func):
    """``func(t, y)`` as the backend's field (the per-sample backend passes row indices too)."""
    return func if backend == "torchdiffeq" else from_torchdiffeq(func)


def decay(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -y


class Boom(Exception):
    """A user exception raised inside a vector field."""


# ---------------------------------------------------------------- the step budget


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_budget_exceeded_raises_with_the_record(backend: str) -> None:
    solver = GatedSolver(FixedTolerance(1e-8), max_num_steps=2, backend=backend)
    with pytest.raises(StepBudgetExceeded, match="max_num_steps=2") as info:
        solver(field_for(backend, decay), torch.ones(2, 3, dtype=F64), T01)
    record = info.value.record
    assert record is solver.records[-1] and record.status is SolveStatus.STEP_BUDGET_EXCEEDED
    if backend == "torchdiffeq":
        assert record.n_steps == 2 and 0 < record.t_reached < 1


def test_step_budget_counts_per_output_interval_exactly_as_torchdiffeq() -> None:
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    y0 = torch.randn(3, 2, dtype=F64)

    class StepCounter:
        def __init__(self) -> None:
            self.steps = 0

        def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -y

        def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
            self.steps += 1

    for budget in range(1, 12):
        raw = StepCounter()
        try:
            torchdiffeq.odeint(raw, y0, t, rtol=1e-9, atol=1e-9, options={"max_num_steps": budget})
            raw_failed = False
        except AssertionError:  # this test runs with asserts on
            raw_failed = True
        solver = GatedSolver(FixedTolerance(1e-9, 1e-9), max_num_steps=budget)
        try:
            solver(decay, y0, t)
            ours_failed = False
        except StepBudgetExceeded:
            ours_failed = True
        assert ours_failed == raw_failed, budget
        assert solver.records[-1].n_steps == raw.steps, budget


def test_step_budget_given_in_options_is_honoured() -> None:
    solver = GatedSolver(FixedTolerance(1e-8), options={"max_num_steps": 3})
    with pytest.raises(StepBudgetExceeded, match="max_num_steps=3"):
        solver(decay, torch.ones(2, 3, dtype=F64), T01)


def test_non_integer_step_budget_is_refused() -> None:
    for bad in (2.5, True, "3"):
        with pytest.raises(ValueError, match="max_num_steps"):
            GatedSolver(FixedTolerance(1e-5), max_num_steps=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- NaN, blow-up, underflow


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_field_raises_non_finite_at_once(backend: str) -> None:
    solver = GatedSolver(FixedTolerance(1e-6), backend=backend)
    with pytest.raises(NonFiniteStateError, match="NaN or inf") as info:
        solver(field_for(backend, lambda t, y: torch.full_like(y, math.nan)), torch.ones(2, 3, dtype=F64), T01)
    assert info.value.record.status is SolveStatus.NON_FINITE
    assert info.value.record.nfe_forward < 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_blow_up_y_squared_fails_fast_without_a_budget(backend: str) -> None:
    # y' = y^2 from y = 1 blows up at t = 1; no step budget: the step-size test must stop it.
    start = time.perf_counter()
    solver = GatedSolver(FixedTolerance(1e-6), backend=backend)
    with pytest.raises((StepSizeUnderflow, NonFiniteStateError)) as info:
        solver(field_for(backend, lambda t, y: y**2), torch.ones(2, 3), torch.tensor([0.0, 2.0]))
    assert time.perf_counter() - start < 20
    assert info.value.record.status in (SolveStatus.STEP_SIZE_UNDERFLOW, SolveStatus.NON_FINITE)
    if backend == "torchdiffeq":
        assert info.value.record.t_reached == pytest.approx(1.0, abs=1e-3)


def test_nan_in_one_tensor_of_a_tuple_state_is_caught_at_the_next_step() -> None:
    # torchdiffeq's norm for a tuple state is a Python max over per-tensor norms, which drops a
    # NaN: the step is accepted with a NaN component. The state test before each step catches it.
    def field(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, logp = state
        return -x, torch.where(t > 0.5, torch.full_like(logp, math.nan), -logp)

    solver = GatedSolver(FixedTolerance(1e-6))
    y0 = (torch.ones(4, 3, dtype=F64), torch.zeros(4, 1, dtype=F64))
    with pytest.raises(NonFiniteStateError) as info:
        solver(field, y0, T01)
    record = info.value.record
    assert record.status is SolveStatus.NON_FINITE and 0.4 < record.t_reached < 0.7


def test_nan_forced_through_by_min_step_is_caught() -> None:
    # Steps at or below min_step are accepted whatever their error, so a NaN enters the state.
    solver = GatedSolver(FixedTolerance(1e-6), options={"min_step": 1e-3})
    field = lambda t, y: torch.where(t > 0.5, torch.full_like(y, math.nan), -y)  # noqa: E731
    with pytest.raises(NonFiniteStateError) as info:
        solver(field, torch.ones(2, 3, dtype=F64), T01)
    assert 0.4 < info.value.record.t_reached < 0.7


def test_underflow_near_time_zero_is_caught_on_a_short_interval() -> None:
    # A blow-up at t = 1e-9 on [0, 2e-9]: the underflow floor scales with the interval, not with 1.
    solver = GatedSolver(FixedTolerance(1e-6))
    with pytest.raises((StepSizeUnderflow, NonFiniteStateError)) as info:
        solver(lambda t, y: 1e9 * y**2, torch.ones(1, 2, dtype=F64), torch.tensor([0.0, 2e-9], dtype=F64))
    assert info.value.record.t_reached == pytest.approx(1e-9, rel=1e-3)
    short = GatedSolver(FixedTolerance(1e-6))
    short(decay, torch.ones(1, 2, dtype=F64), torch.tensor([0.0, 1e-12], dtype=F64))  # tiny but healthy
    assert short.records[-1].status is SolveStatus.SUCCESS


# ---------------------------------------------------------------- the adjoint solve


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def test_adjoint_budget_exceeded_in_backward_is_typed_and_recorded() -> None:
    net = _mlp()
    solver = GatedSolver(
        FixedTolerance(1e-4), adjoint=True, adjoint_options={"max_num_steps": 2}, adjoint_tolerance=(1e-10, 1e-10)
    )
    ys = solver(lambda t, y: net(y), torch.randn(4, 3, dtype=F64), T01, adjoint_params=tuple(net.parameters()))
    assert solver.records[-1].status is SolveStatus.SUCCESS
    with pytest.raises(StepBudgetExceeded, match="adjoint") as info:
        ys[-1].sum().backward()
    record = info.value.record
    assert record is solver.records[-1]
    assert record.status is SolveStatus.STEP_BUDGET_EXCEEDED and record.extra["failed_in"] == "adjoint"


def test_adjoint_nan_in_backward_is_typed_and_recorded() -> None:
    net, in_backward = _mlp(), [False]

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return net(y) * (math.nan if in_backward[0] else 1.0)

    solver = GatedSolver(FixedTolerance(1e-5), adjoint=True)
    ys = solver(field, torch.randn(4, 3, dtype=F64), T01, adjoint_params=tuple(net.parameters()))
    in_backward[0] = True
    with pytest.raises(NonFiniteStateError, match="adjoint"):
        ys[-1].sum().backward()
    assert solver.records[-1].status is SolveStatus.NON_FINITE
    assert solver.records[-1].extra["failed_in"] == "adjoint"


def test_field_exception_in_adjoint_backward_sets_field_error() -> None:
    net, in_backward = _mlp(), [False]

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if in_backward[0]:
            raise Boom("in backward")
        return net(y)

    solver = GatedSolver(FixedTolerance(1e-5), adjoint=True)
    ys = solver(field, torch.randn(4, 3, dtype=F64), T01, adjoint_params=tuple(net.parameters()))
    in_backward[0] = True
    with pytest.raises(Boom) as info:
        ys[-1].sum().backward()
    assert info.value.record is solver.records[-1]
    assert solver.records[-1].status is SolveStatus.FIELD_ERROR


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 1e-7), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_low_precision_tolerance_below_ten_eps_is_refused(backend: str, dtype: torch.dtype, rtol: float) -> None:
    solver = GatedSolver(FixedTolerance(rtol), backend=backend)
    eps = torch.finfo(dtype).eps
    with pytest.raises(ValueError, match=rf"rtol={rtol:.3g}.*{dtype}.*eps={eps:.3g}"):
        solver(field_for(backend, decay), torch.ones(2, 3, dtype=dtype), torch.tensor([0.0, 1.0]))
    assert len(solver.records) == 0  # refused before solving


def test_low_precision_refusal_covers_the_adjoint_tolerance_and_per_sample_calls() -> None:
    solver = GatedSolver(FixedTolerance(0.05), adjoint=True, adjoint_tolerance=(1e-6, 1e-6))
    with pytest.raises(ValueError, match="adjoint rtol"):
        solver(nn.Linear(3, 3).half(), torch.ones(2, 3, dtype=torch.float16), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="bfloat16"):
        solve_per_sample(lambda t, y, idx: -y, torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_at_an_allowed_tolerance_is_accurate(backend: str, dtype: torch.dtype) -> None:
    rtol = MIN_RTOL_IN_EPS * torch.finfo(dtype).eps
    weight = (torch.randn(4, 4) * 0.7).to(dtype)
    y0 = torch.randn(16, 4).to(dtype)
    t = torch.tensor([0.0, 1.0])
    exact = torchdiffeq.odeint(lambda t, y: torch.tanh(y @ weight.double()), y0.double(), t.double(), rtol=1e-10)
    solver = GatedSolver(FixedTolerance(rtol, 1e-3), backend=backend)
    ys = solver(field_for(backend, lambda t, y: torch.tanh(y @ weight)), y0, t)
    assert ys.dtype == dtype and solver.records[-1].status is SolveStatus.SUCCESS
    scaled = (ys[-1].double() - exact[-1]) / (1e-3 + rtol * exact[-1].abs())
    assert float(scaled.pow(2).mean().sqrt()) < 2.0  # the state moved as it should (no stagnation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_error_norm_does_not_overflow_and_blame_the_field(backend: str) -> None:
    # f / (atol + rtol |y|) = 1 / (1e-6 + 1e-2 * 1e-4) = 5e5 > 65504: a float16 error control
    # overflowed here, the initial step became NaN and the field was blamed for it.
    y0 = torch.tensor([[1e-4, 1.0, 2.0]] * 2, dtype=torch.float16)
    t = torch.tensor([0.0, 1.0], dtype=torch.float16)
    solver = GatedSolver(FixedTolerance(1e-2, 1e-6), backend=backend)
    ys = solver(field_for(backend, lambda t, y: torch.ones_like(y)), y0, t)
    assert solver.records[-1].status is SolveStatus.SUCCESS
    assert torch.allclose(ys[-1].float(), y0.float() + 1, rtol=2e-2)


def test_overflowed_float16_state_is_never_returned_as_success() -> None:
    # y' = y^2 blows up at t = 0.5 from y = 2; in float16 the state overflows to inf long before.
    for backend in BACKENDS:
        solver = GatedSolver(FixedTolerance(1e-2), backend=backend)
        with pytest.raises((NonFiniteStateError, StepSizeUnderflow)):
            solver(field_for(backend, lambda t, y: y**2), torch.full((2, 3), 2.0, dtype=torch.float16), T01.float())


# ---------------------------------------------------------------- records after a failure


def test_validation_error_appends_no_record() -> None:
    solver = GatedSolver(FixedTolerance(1e-5))
    solver(decay, torch.ones(2, 3, dtype=F64), T01)
    before = list(solver.records)
    with pytest.raises(ValueError, match="increasing"):
        solver(decay, torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 0.0], dtype=F64))
    per_sample_tolerance = GatedSolver(FixedTolerance(1e-5))
    per_sample_tolerance.policy = GaussianGate(MLPGate(3).double(), reduction="none")
    with pytest.raises(ValueError, match="batch dimension first"):
        per_sample_tolerance(decay, (torch.ones(4, 3, dtype=F64), torch.ones(3, dtype=F64)), T01)
    with pytest.raises(TypeError, match="adjoint_params"):
        GatedSolver(FixedTolerance(1e-5), adjoint=True)(decay, torch.ones(2, 3, dtype=F64), T01)
    assert list(solver.records) == before and len(per_sample_tolerance.records) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_field_exception_is_reraised_unchanged_with_status_and_record(backend: str) -> None:
    error = Boom("bad field")

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if float(t.reshape(-1)[0]) > 0.3:
            raise error
        return -y

    solver = GatedSolver(FixedTolerance(1e-6), backend=backend)
    with collect_records(nn.ModuleList([solver])) as seen, pytest.raises(Boom) as info:
        solver(field_for(backend, field), torch.ones(2, 3, dtype=F64), T01)
    assert info.value is error
    record = info.value.record
    assert record is solver.records[-1] is seen[-1] and record.status is SolveStatus.FIELD_ERROR
    assert record.nfe_forward > 0 and any("tolgate: raised by the vector field" in n for n in error.__notes__)


def test_keyboard_interrupt_in_the_field_leaves_status_interrupted() -> None:
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt

    solver = GatedSolver(FixedTolerance(1e-6))
    with pytest.raises(KeyboardInterrupt):
        solver(field, torch.ones(2, 3, dtype=F64), T01)
    assert solver.records[-1].status is SolveStatus.INTERRUPTED


def test_field_assertion_error_is_not_mistaken_for_a_torchdiffeq_failure() -> None:
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the user's own check")

    solver = GatedSolver(FixedTolerance(1e-6))
    with pytest.raises(AssertionError, match="the user's own check"):
        solver(field, torch.ones(2, 3, dtype=F64), T01)
    assert solver.records[-1].status is SolveStatus.FIELD_ERROR


def test_deepcopy_of_a_model_after_a_training_mode_solve() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.field = nn.Linear(3, 3).double()
            self.solver = GatedSolver(GaussianGate(MLPGate(3).double()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.solver(lambda t, y: self.field(y), x, T01)[-1]

    model = Model().train()
    model(torch.randn(4, 3, dtype=F64))
    assert model.solver.records[-1].log_prob.requires_grad  # a non-leaf tensor in the record
    ema = copy.deepcopy(model)
    copied = ema.solver.records[-1]
    assert not copied.log_prob.requires_grad
    assert torch.equal(copied.log_prob, model.solver.records[-1].log_prob.detach())
    assert copied.nfe_forward == model.solver.records[-1].nfe_forward
    assert model.solver.records[-1].log_prob.requires_grad  # the original keeps its graph
    restored = pickle.loads(pickle.dumps(model.solver.records[-1]))
    assert restored.status is SolveStatus.SUCCESS and not restored.log_prob.requires_grad
    assert copy.copy(model.solver.records[-1]).log_prob is model.solver.records[-1].log_prob


# ---------------------------------------------------------------- the same under python -O

_UNDER_O = textwrap.dedent(
    """
    import json, math, time, torch
    from tolgate import GatedSolver, FixedTolerance, SolveError, from_torchdiffeq
    torch.set_num_threads(1)
    assert False, "asserts must be stripped"  # proves -O: this line does nothing
    F64, T01 = torch.float64, torch.tensor([0.0, 1.0], dtype=torch.float64)
    results = {"debug": __debug__}

    def attempt(name, solver, func, y0, t, backward=False, **kwargs):
        start = time.perf_counter()
        try:
            ys = solver(func, y0, t, **kwargs)
            if backward:
                ys[-1].sum().backward()
            outcome = "success"
        except SolveError as exc:
            outcome = type(exc).__name__
        record = solver.records[-1]
        results[name] = {"outcome": outcome, "status": record.status.value, "steps": record.n_steps,
                         "seconds": time.perf_counter() - start}

    for backend in ("torchdiffeq", "per_sample"):
        wrap = (lambda f: f) if backend == "torchdiffeq" else from_torchdiffeq
        attempt(f"budget/{backend}", GatedSolver(FixedTolerance(1e-8), max_num_steps=2, backend=backend),
                wrap(lambda t, y: -y), torch.ones(2, 3, dtype=F64), T01)
        attempt(f"nan/{backend}", GatedSolver(FixedTolerance(1e-6), backend=backend),
                wrap(lambda t, y: torch.full_like(y, math.nan)), torch.ones(2, 3, dtype=F64), T01)
        attempt(f"blowup/{backend}", GatedSolver(FixedTolerance(1e-6), backend=backend),
                wrap(lambda t, y: y**2), torch.ones(2, 3), torch.tensor([0.0, 2.0]))
    net = torch.nn.Linear(3, 3).double()
    attempt("adjoint_budget", GatedSolver(FixedTolerance(1e-4), adjoint=True, adjoint_options={"max_num_steps": 2},
            adjoint_tolerance=(1e-10, 1e-10)), lambda t, y: net(y), torch.randn(4, 3, dtype=F64), T01,
            backward=True, adjoint_params=tuple(net.parameters()))
    attempt("tuple_nan", GatedSolver(FixedTolerance(1e-6)),
            lambda t, s: (-s[0], torch.where(t > 0.5, torch.full_like(s[1], math.nan), -s[1])),
            (torch.ones(4, 3, dtype=F64), torch.zeros(4, 1, dtype=F64)), T01)
    attempt("min_step_nan", GatedSolver(FixedTolerance(1e-6), options={"min_step": 1e-3}),
            lambda t, y: torch.where(t > 0.5, torch.full_like(y, math.nan), -y), torch.ones(2, 3, dtype=F64), T01)
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def under_python_O() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-O", "-c", _UNDER_O], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("debug") is False
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_python_O_step_budget_is_honoured(under_python_O: dict, backend: str) -> None:
    result = under_python_O[f"budget/{backend}"]
    assert result["outcome"] == "StepBudgetExceeded" and result["status"] == "step_budget_exceeded"
    if backend == "torchdiffeq":
        assert result["steps"] == 2  # not 132


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_python_O_nan_field_fails_fast(under_python_O: dict, backend: str) -> None:
    result = under_python_O[f"nan/{backend}"]
    assert result["outcome"] == "NonFiniteStateError" and result["status"] == "non_finite"
    assert result["seconds"] < 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_python_O_blow_up_fails_fast(under_python_O: dict, backend: str) -> None:
    result = under_python_O[f"blowup/{backend}"]
    assert result["outcome"] in ("StepSizeUnderflow", "NonFiniteStateError") and result["seconds"] < 20


def test_under_python_O_adjoint_budget_is_honoured(under_python_O: dict) -> None:
    result = under_python_O["adjoint_budget"]
    assert result["outcome"] == "StepBudgetExceeded" and result["status"] == "step_budget_exceeded"


def test_under_python_O_nan_in_a_tuple_state_is_caught(under_python_O: dict) -> None:
    assert under_python_O["tuple_nan"]["outcome"] == "NonFiniteStateError"


def test_under_python_O_nan_forced_through_by_min_step_is_caught(under_python_O: dict) -> None:
    assert under_python_O["min_step_nan"]["outcome"] == "NonFiniteStateError"
