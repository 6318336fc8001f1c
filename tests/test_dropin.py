"""The drop-in contract (issue 10, items 1-2): every torchdiffeq method, keyword, ``t`` length and
callback through GatedSolver and ``tolgate.odeint``, bitwise torchdiffeq's under a fixed policy;
fixed-grid NFE; step-size policies; backends as objects, each taking either kind of field."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn
from torchdiffeq._impl.odeint import SOLVERS

import tolgate
from tolgate import FixedStepSize, FixedTolerance, GatedSolver, SolveStatus, index_aware
from tolgate.sample_stats import SampleStatus
from tolgate.solver import ADAPTIVE_METHODS, FIXED_GRID_METHODS, METHODS

F64 = torch.float64
T = torch.tensor([0.0, 0.4, 1.0], dtype=F64)


class Field(nn.Module):
    """A small nonlinear, time-dependent field with parameters (for gradients and the adjoint)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 3).double()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(y)) * (1.0 + 0.5 * torch.sin(3.0 * t)) - 0.3 * y


class WithCallbacks(Field):
    """Counts every callback torchdiffeq may call, forward and adjoint."""

    NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.times: list[float] = []

    def _count(self, name: str, t0: torch.Tensor) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        if name == "callback_step":
            self.times.append(float(t0.detach()))

    def callback_step(self, t0, y0, dt):  # noqa: ANN001, ANN201
        self._count("callback_step", t0)

    def callback_accept_step(self, t0, y0, dt):  # noqa: ANN001, ANN201
        self._count("callback_accept_step", t0)

    def callback_reject_step(self, t0, y0, dt):  # noqa: ANN001, ANN201
        self._count("callback_reject_step", t0)

    def callback_step_adjoint(self, t0, y0, dt):  # noqa: ANN001, ANN201
        self._count("callback_step_adjoint", t0)

    def callback_accept_step_adjoint(self, t0, y0, dt):  # noqa: ANN001, ANN201
        self._count("callback_accept_step_adjoint", t0)


def options_for(method: str) -> dict | None:
    if method in FIXED_GRID_METHODS:
        return {"step_size": 0.1}
    if method == "scipy_solver":
        return {"solver": "RK45"}
    return None


def y0() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(4, 3)


# ---------------------------------------------------------------- every method, bitwise


def test_method_lists_are_torchdiffeqs_own() -> None:
    assert METHODS == tuple(SOLVERS)
    assert set(ADAPTIVE_METHODS) | set(FIXED_GRID_METHODS) | {"scipy_solver"} == set(SOLVERS)
    assert "rk4" in FIXED_GRID_METHODS and "dopri8" in ADAPTIVE_METHODS


@pytest.mark.parametrize("method", tuple(SOLVERS))
def test_every_method_is_bitwise_raw_torchdiffeq(method: str) -> None:
    field, options = Field(), options_for(method)
    ours = GatedSolver(FixedTolerance(1e-6, 1e-8), method=method, options=options)(field, y0(), T)
    raw = torchdiffeq.odeint(field, y0(), T, rtol=1e-6, atol=1e-8, method=method, options=options)
    assert torch.equal(ours, raw)


@pytest.mark.parametrize("method", ["rk4", "implicit_adams", "dopri8", "euler"])
def test_gradients_are_bitwise_raw_torchdiffeq(method: str) -> None:
    field, options = Field(), options_for(method)
    ours = GatedSolver(FixedTolerance(1e-6, 1e-8), method=method, options=options)(field, y0(), T)
    grads_ours = torch.autograd.grad(ours.pow(2).sum(), list(field.parameters()))
    raw = torchdiffeq.odeint(field, y0(), T, rtol=1e-6, atol=1e-8, method=method, options=options)
    grads_raw = torch.autograd.grad(raw.pow(2).sum(), list(field.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads_ours, grads_raw, strict=True))


@pytest.mark.parametrize("method", ["rk4", "bosh3"])
def test_adjoint_with_another_adjoint_method_is_bitwise(method: str) -> None:
    field, options = Field(), options_for(method)
    solver = GatedSolver(
        FixedTolerance(1e-6), method=method, options=options, adjoint=True, adjoint_method="dopri5", adjoint_options={}
    )
    grads_ours = torch.autograd.grad(solver(field, y0(), T).pow(2).sum(), list(field.parameters()))
    raw = torchdiffeq.odeint_adjoint(
        field, y0(), T, rtol=1e-6, atol=1e-6, method=method, options=options, adjoint_method="dopri5",
        adjoint_options={},
    )  # fmt: skip
    grads_raw = torch.autograd.grad(raw.pow(2).sum(), list(field.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads_ours, grads_raw, strict=True))
    assert solver.records[-1].nfe_backward > 0 and solver.records[-1].n_steps_backward > 0


# ---------------------------------------------------------------- fixed grids and step sizes


def test_rk4_counts_four_evaluations_per_step_and_no_tolerance() -> None:
    solver = GatedSolver(FixedTolerance(1e-6), method="rk4", options={"step_size": 0.125})
    with torch.no_grad():
        solver(Field(), y0(), torch.tensor([0.0, 1.0], dtype=F64))
    record = solver.records[-1]
    assert record.n_steps_accepted == 0 and record.n_steps == 0  # a grid has no accept/reject test
    assert record.nfe_forward == 4 * 8
    assert record.rtol is None and record.atol is None and record.step_size == 0.125
    assert record.status is SolveStatus.SUCCESS


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4"])
def test_fixed_grid_nfe_is_stages_times_grid_steps(method: str) -> None:
    stages = {"euler": 1, "midpoint": 2, "heun3": 3, "rk4": 4}[method]
    field = WithCallbacks()
    solver = GatedSolver(FixedTolerance(1e-6), method=method, options={"step_size": 0.1})
    with torch.no_grad():
        solver(field, y0(), T)
    assert solver.records[-1].nfe_forward == stages * field.counts["callback_step"]


def test_step_size_policy_is_bitwise_torchdiffeq_with_that_step() -> None:
    field = Field()
    solver = GatedSolver(FixedStepSize(0.05), method="rk4")
    ours = solver(field, y0(), T)
    raw = torchdiffeq.odeint(field, y0(), T, method="rk4", options={"step_size": 0.05})
    assert torch.equal(ours, raw)
    record = solver.records[-1]
    assert record.step_size == 0.05 and record.rtol is None and record.nfe_forward == 4 * 20


def test_step_size_policy_refused_by_an_adaptive_method() -> None:
    with pytest.raises(ValueError, match="step_size=0.1.*fixed-grid"):
        GatedSolver(FixedStepSize(0.1), method="dopri5")(Field(), y0(), T)
    with pytest.raises(ValueError, match="step_size"):
        FixedStepSize(0.0)


# ---------------------------------------------------------------- t of one time


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_single_time_returns_y0_stacked_as_torchdiffeq(method: str) -> None:
    field, t = Field(), torch.tensor([0.3], dtype=F64)
    ours = GatedSolver(FixedTolerance(1e-6), method=method, options=options_for(method))(field, y0(), t)
    raw = torchdiffeq.odeint(field, y0(), t, method=method, rtol=1e-6, atol=1e-6, options=options_for(method))
    assert ours.shape == (1, 4, 3) and torch.equal(ours, raw)


def test_single_time_on_the_per_sample_backend() -> None:
    solver = GatedSolver(FixedTolerance(1e-6), backend="per_sample")
    ys = solver(lambda t, y: -y, (y0(), y0()[:, :1]), torch.tensor([0.3], dtype=F64))
    assert torch.equal(ys[0], y0()[None]) and torch.equal(ys[1], y0()[None, :, :1])
    assert solver.records[-1].status is SolveStatus.SUCCESS and solver.records[-1].nfe_forward == 0


# ---------------------------------------------------------------- callbacks


@pytest.mark.parametrize("method", ["dopri5", "rk4", "implicit_adams"])
@pytest.mark.parametrize("t", [T, T.flip(0)], ids=["increasing", "decreasing"])
def test_user_callbacks_are_called_as_torchdiffeq_calls_them(method: str, t: torch.Tensor) -> None:
    ours_field, raw_field = WithCallbacks(), WithCallbacks()
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        GatedSolver(FixedTolerance(1e-7), method=method, options=options_for(method))(ours_field, y0(), t)
    with warnings.catch_warnings(record=True) as raw_warned:
        warnings.simplefilter("always")
        torchdiffeq.odeint(raw_field, y0(), t, rtol=1e-7, atol=1e-7, method=method, options=options_for(method))
    assert ours_field.counts == raw_field.counts and ours_field.counts["callback_step"] > 0
    assert ours_field.times == raw_field.times  # user time: un-negated for decreasing t
    assert [str(w.message) for w in ours_warned] == [str(w.message) for w in raw_warned]


def test_adjoint_callbacks_are_forwarded() -> None:
    ours_field, raw_field = WithCallbacks(), WithCallbacks()
    solver = GatedSolver(FixedTolerance(1e-6), adjoint=True)
    solver(ours_field, y0(), T).pow(2).sum().backward()
    torchdiffeq.odeint_adjoint(raw_field, y0(), T, rtol=1e-6, atol=1e-6).pow(2).sum().backward()
    assert ours_field.counts == raw_field.counts and ours_field.counts["callback_step_adjoint"] > 0
    assert solver.records[-1].n_steps_backward == ours_field.counts["callback_step_adjoint"]


# ---------------------------------------------------------------- backends and fields


def test_per_sample_backend_takes_a_plain_torchdiffeq_field() -> None:
    field = Field()
    plain = GatedSolver(FixedTolerance(1e-6), backend="per_sample")(field, y0(), T)
    wrapped = GatedSolver(FixedTolerance(1e-6), backend="per_sample")(tolgate.from_torchdiffeq(field), y0(), T)
    assert torch.equal(plain, wrapped)
    torch.testing.assert_close(plain, torchdiffeq.odeint(field, y0(), T, rtol=1e-9, atol=1e-9), rtol=1e-5, atol=1e-5)


def test_index_aware_field_works_on_both_backends() -> None:
    seen: list[tuple[int, torch.Tensor]] = []

    @index_aware
    def field(t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        seen.append((t.dim(), idx))
        return -y * (1.0 + idx.to(y.dtype)).view(-1, 1)

    ys_td = GatedSolver(FixedTolerance(1e-8), backend="torchdiffeq")(field, y0(), T)
    assert seen[0][0] == 0 and torch.equal(seen[0][1], torch.arange(4))
    seen.clear()
    ys_ps = GatedSolver(FixedTolerance(1e-8), backend="per_sample")(field, y0(), T)
    assert seen[0][0] == 1
    exact = y0() * torch.exp(-(1.0 + torch.arange(4, dtype=F64)).view(1, -1, 1) * T.view(-1, 1, 1))
    torch.testing.assert_close(ys_td, exact, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ys_ps, exact, rtol=1e-6, atol=1e-7)


def test_backends_are_objects_that_answer_for_themselves() -> None:
    solver = GatedSolver(FixedTolerance(1e-5), backend="per_sample")
    assert isinstance(solver.backend, tolgate.PerSampleBackend) and solver.backend.name == "per_sample"
    with pytest.raises(ValueError, match="per_sample.*rk4"):
        GatedSolver(FixedTolerance(1e-5), backend="per_sample", method="rk4")
    with pytest.raises(NotImplementedError, match="adjoint"):
        GatedSolver(FixedTolerance(1e-5), backend="per_sample", adjoint=True)
    with pytest.raises(NotImplementedError, match="event"):
        solver(lambda t, y: -y, y0(), T[:2], event_fn=lambda t, y: y.sum())
    with pytest.warns(DeprecationWarning, match="per_sample"):
        old = GatedSolver(FixedTolerance(1e-5), backend="tolgate")
    assert old.backend.name == "per_sample"
    with pytest.raises(ValueError, match="backend must be one of"):
        GatedSolver(FixedTolerance(1e-5), backend="scipy")


def test_one_status_enum_serves_both_backends() -> None:
    assert SampleStatus is SolveStatus
    assert [int(s) for s in (SolveStatus.SUCCESS, SolveStatus.NON_FINITE)] == [0, 3]
    assert SolveStatus.from_code(int(SolveStatus.STEP_SIZE_UNDERFLOW)) is SolveStatus.STEP_SIZE_UNDERFLOW
    _, stats = tolgate.solve_per_sample(lambda t, y, idx: -y, y0(), T)
    assert stats.status_of(0) is SolveStatus.SUCCESS and stats.status_counts()[SolveStatus.SUCCESS] == 4


# ---------------------------------------------------------------- the tolgate.odeint shim


def _same(a: object, b: object) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def _tuple_field(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, v = state
    return v, -x - 0.1 * v


SHIM_CALLS = {
    "default": lambda f, ode: ode(f, y0(), T),
    "tuple_decreasing": lambda f, ode: ode(_tuple_field, (y0(), y0() * 0.5), T.flip(0), rtol=1e-5, atol=1e-6),
    "rk4_step": lambda f, ode: ode(f, y0(), T, method="rk4", options={"step_size": 0.2}),
    "euler_grid": lambda f, ode: ode(f, y0(), torch.linspace(0, 1, 11, dtype=F64), method="euler"),
    "tensor_rtol": lambda f, ode: ode(f, y0(), T, rtol=torch.full((4, 3), 1e-5, dtype=F64), atol=0.0),
    "seminorm_options": lambda f, ode: ode(f, y0(), T, options={"norm": lambda y: y.abs().max()}),
    "event": lambda f, ode: ode(lambda t, y: -y, y0(), T[:2], event_fn=lambda t, y: y[0, 0] + 0.5),
    "single_time": lambda f, ode: ode(f, y0(), T[:1], method="midpoint"),
}


@pytest.mark.parametrize("name", SHIM_CALLS)
def test_tolgate_odeint_is_bitwise_torchdiffeq_odeint(name: str) -> None:
    field = Field()
    assert _same(SHIM_CALLS[name](field, tolgate.odeint), SHIM_CALLS[name](field, torchdiffeq.odeint))


@pytest.mark.parametrize("params", [False, True])
def test_tolgate_odeint_adjoint_is_bitwise_torchdiffeq(params: bool) -> None:
    field = Field()
    kwargs = {"rtol": 1e-6, "atol": 1e-7, "adjoint_rtol": 1e-5, "adjoint_options": {"norm": "seminorm"}}
    func = field if not params else (lambda t, y: field(t, y))
    if params:
        kwargs["adjoint_params"] = tuple(field.parameters())
    grads = []
    for ode in (tolgate.odeint_adjoint, torchdiffeq.odeint_adjoint):
        ys = ode(func, y0(), T, **kwargs)
        grads.append((ys, torch.autograd.grad(ys.pow(2).sum(), list(field.parameters()))))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1], strict=True))


def test_adjoint_without_params_raises_what_torchdiffeq_raises() -> None:
    for ode in (tolgate.odeint_adjoint, torchdiffeq.odeint_adjoint):
        with pytest.raises(ValueError, match="adjoint_params"):
            ode(lambda t, y: -y, y0(), T)


def test_tolgate_odeint_takes_a_policy_and_raises_typed_failures() -> None:
    ys = tolgate.odeint(Field(), y0(), T, method="rk4", policy=FixedStepSize(0.25))
    assert torch.equal(ys, torchdiffeq.odeint(Field(), y0(), T, method="rk4", options={"step_size": 0.25}))
    with pytest.raises(tolgate.NonFiniteStateError):
        tolgate.odeint(lambda t, y: torch.full_like(y, math.nan), y0(), T)


@pytest.mark.parametrize("name", ["odeint", "odeint_adjoint"])
def test_shim_signature_is_torchdiffeqs_plus_policy(name: str) -> None:
    ours, theirs = inspect.signature(getattr(tolgate, name)), inspect.signature(getattr(torchdiffeq, name))
    *same, policy = ours.parameters.values()
    assert same == list(theirs.parameters.values())  # names, order, kinds and defaults
    assert policy.name == "policy" and policy.kind is inspect.Parameter.KEYWORD_ONLY and policy.default is None
    assert getattr(tolgate, name).__name__ == name and "torchdiffeq" in getattr(tolgate, name).__doc__


def test_shim_refuses_what_torchdiffeq_refuses() -> None:
    for ode in (tolgate.odeint, torchdiffeq.odeint):
        with pytest.raises(TypeError):
            ode(Field(), y0(), T, 1e-3)  # rtol is keyword-only
        with pytest.raises(TypeError, match="adjoint_rtol"):
            ode(Field(), y0(), T, adjoint_rtol=1e-3)
        with pytest.raises(TypeError):
            ode(Field(), y0())


def test_a_torchdiffeq_argument_tolgate_does_not_know_is_refused_only_when_passed() -> None:
    def newer_odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None, fast=False):  # noqa: ANN001, ANN202
        raise AssertionError("never called: the drop-in only reads its signature")

    ode = tolgate.dropin._drop_in(newer_odeint, adjoint=False, doc="")
    assert torch.equal(ode(Field(), y0(), T), torchdiffeq.odeint(Field(), y0(), T))
    with pytest.raises(TypeError, match=r"newer_odeint does not support.*\['fast'\]"):
        ode(Field(), y0(), T, fast=True)


def test_adjoint_atol_alone_keeps_the_forward_rtol() -> None:
    field = Field()
    grads = []
    for ode in (tolgate.odeint_adjoint, torchdiffeq.odeint_adjoint):
        ys = ode(field, y0(), T, rtol=1e-6, atol=1e-7, adjoint_atol=1e-5)
        grads.append(torch.autograd.grad(ys.pow(2).sum(), list(field.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_replacing_torchdiffeq_odeint_by_the_shim_does_not_recurse(monkeypatch):
    # The usual drop-in trick: the backend must still reach the real torchdiffeq.
    monkeypatch.setattr(torchdiffeq, "odeint", tolgate.odeint)
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    ys = torchdiffeq.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ys[-1], y0 * math.exp(-1.0), rtol=1e-6, atol=1e-8)


def test_a_few_tiny_steps_at_a_discontinuity_are_not_an_underflow():
    # torchdiffeq's own TestDiscontinuities.test_odeint_jump_t (float32, adaptive_heun, adjoint,
    # without jump_t, rtol 1e-7): the adjoint solve crosses the jump at t = 0.5 with a handful of
    # steps below 4 ulps of t and recovers; torchdiffeq passes, so the shim must too.
    def jump(t, x):
        return -0.5 * x if t < 0.5 else x**2

    x0 = torch.tensor([1.0, 2.0], requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    settings = {"atol": 1e-6, "method": "adaptive_heun", "adjoint_params": ()}
    raw = torchdiffeq.odeint_adjoint(jump, x0, t, **settings)
    shim = tolgate.odeint_adjoint(jump, x0, t, **settings)
    assert torch.equal(raw, shim)
    (raw_grad,) = torch.autograd.grad(raw.sum(), x0)
    (shim_grad,) = torch.autograd.grad(shim.sum(), x0)
    assert torch.equal(raw_grad, shim_grad)


def test_the_per_sample_backend_warns_that_it_does_not_call_step_callbacks():
    class WithCallback(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            raise AssertionError("the per-sample backend never calls it")

    solver = GatedSolver(FixedTolerance(1e-5), backend="per_sample")
    with pytest.warns(UserWarning, match="callback_step"):
        solver(WithCallback(), torch.ones(2, 2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64))
