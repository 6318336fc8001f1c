"""GatedSolver: bitwise agreement with torchdiffeq, exact NFE accounting, modes, records, errors."""

from __future__ import annotations

import math

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
    NonFiniteToleranceError,
    Progress,
    SolveStatus,
    StepBudgetExceeded,
    StepSizeUnderflow,
    ToleranceChoice,
    TolerancePolicy,
    gated_solvers,
)

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)
METHODS = ("dopri5", "bosh3", "fehlberg2", "adaptive_heun")
# Field evaluations per step after the first (FSAL: the last stage is the next step's first);
# plus 2 before stepping: f(t0, y0) and one for the initial step-size selection.
EVALS_PER_STEP = {"dopri5": 6, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 1}


class Tap(torch.autograd.Function):
    """Identity whose backward counts itself: an autograd-side counter independent of tolgate."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counter: Counted) -> torch.Tensor:
        ctx.counter = counter
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.counter.vjps += 1
        return grad, None


class Counted(nn.Module):
    """Wraps a field and counts its calls (and, with ``tap=True``, the VJPs through its outputs)."""

    def __init__(self, field: nn.Module, tap: bool = False) -> None:
        super().__init__()
        self.field, self.tap = field, tap
        self.calls = self.vjps = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.field(t, y)
        return Tap.apply(out, self) if self.tap else out


class MLPField(nn.Module):
    def __init__(self, dim: int = 3, hidden: int = 16, dtype: torch.dtype = F64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(dtype)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([y, t.to(y.dtype).expand(*y.shape[:-1], 1)], dim=-1))


class TupleField(nn.Module):
    """A coupled field on a tuple state ``(x: (batch, 3), v: (batch,))``."""

    def __init__(self, dtype: torch.dtype = F64) -> None:
        super().__init__()
        self.inner = MLPField(3, dtype=dtype)

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, v = state
        return self.inner(t, x) * v.unsqueeze(-1).cos(), -x.sum(-1) * 0.5


class Forced(nn.Module):
    """``dy/dt = 20 cos(20 t)``: fast forcing that makes the controller reject steps."""

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 20 * torch.cos(20 * t) + 0 * y


class ConstantTolerance(TolerancePolicy):
    """Returns whatever tolerance it was given (tensor or float), unchecked: for error paths."""

    def __init__(self, rtol: float | torch.Tensor) -> None:
        super().__init__()
        self.value = rtol

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        return ToleranceChoice(self.value, self.value)


def states(dtype: torch.dtype, tupled: bool) -> tuple[torch.Tensor, ...] | torch.Tensor:
    x = torch.randn(4, 3, dtype=dtype)
    return (x, torch.randn(4, dtype=dtype)) if tupled else x


def as_tuple(ys: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return ys if isinstance(ys, tuple) else (ys,)


# ---------------------------------------------------------------- bitwise agreement


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("tupled", [False, True])
def test_fixed_tolerance_is_bitwise_raw_torchdiffeq(method: str, dtype: torch.dtype, tupled: bool) -> None:
    field = TupleField(dtype) if tupled else MLPField(dtype=dtype)
    y0, t = states(dtype, tupled), torch.tensor([0.0, 0.3, 1.0], dtype=dtype)
    solver = GatedSolver(FixedTolerance(1e-4, 1e-6), method=method)
    ours = as_tuple(solver(field, y0, t))
    grads_ours = torch.autograd.grad(sum(y.sum() for y in ours), list(field.parameters()))
    raw = as_tuple(torchdiffeq.odeint(field, y0, t, rtol=1e-4, atol=1e-6, method=method))
    grads_raw = torch.autograd.grad(sum(y.sum() for y in raw), list(field.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ours, raw, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_ours, grads_raw, strict=True))


@pytest.mark.parametrize("tupled", [False, True])
def test_adjoint_is_bitwise_raw_odeint_adjoint(tupled: bool) -> None:
    field = TupleField() if tupled else MLPField()
    y0, t = states(F64, tupled), torch.tensor([1.0, 0.5, 0.0], dtype=F64)  # decreasing time too
    solver = GatedSolver(FixedTolerance(1e-5), adjoint=True, adjoint_options={"norm": "seminorm"})
    ours = as_tuple(solver(field, y0, t))
    grads_ours = torch.autograd.grad(sum(y.pow(2).sum() for y in ours), list(field.parameters()))
    raw = as_tuple(torchdiffeq.odeint_adjoint(field, y0, t, rtol=1e-5, atol=1e-5, adjoint_options={"norm": "seminorm"}))
    grads_raw = torch.autograd.grad(sum(y.pow(2).sum() for y in raw), list(field.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ours, raw, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_ours, grads_raw, strict=True))


# ---------------------------------------------------------------- NFE accounting


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make_field", [MLPField, Forced], ids=["mlp", "forced"])
def test_forward_nfe_matches_an_independent_counter_and_the_step_identity(method: str, make_field) -> None:
    counted = Counted(make_field())
    solver = GatedSolver(FixedTolerance(1e-3), method=method)
    with torch.no_grad():
        solver(counted, torch.randn(4, 3, dtype=F64), torch.linspace(0, 1, 5, dtype=F64))
    rec = solver.records[-1]
    assert rec.nfe_forward == counted.calls
    assert rec.nfe_forward == 2 + EVALS_PER_STEP[method] * (rec.n_steps_accepted + rec.n_steps_rejected)
    assert rec.status is SolveStatus.SUCCESS and rec.t_reached == 1.0


def test_forced_problem_really_exercises_rejected_steps() -> None:
    solver = GatedSolver(FixedTolerance(1e-5))
    solver(Forced(), torch.zeros(1, 1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64))
    rec = solver.records[-1]
    assert rec.n_steps_rejected > 0
    assert rec.nfe_forward == 2 + 6 * rec.n_steps == 2 + 6 * (rec.n_steps_accepted + rec.n_steps_rejected)


@pytest.mark.parametrize("make_field", [MLPField, Forced], ids=["mlp", "forced"])
def test_direct_backprop_counts_the_vjps_autograd_runs(make_field) -> None:
    counted = Counted(make_field(), tap=True)
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    solver = GatedSolver(FixedTolerance(1e-5))
    ys = solver(counted, y0, torch.tensor([0.0, 2.0], dtype=F64))
    rec = solver.records[-1]
    assert rec.nfe_backward == 0  # nothing is known before backward runs
    ys[-1].pow(2).sum().backward()
    assert counted.vjps > 0
    assert rec.nfe_backward == counted.vjps
    # A rejected step's evaluations never reach the loss (its only use, the next step size, is
    # computed without grad). The initial step-size probe does when the first step size depends
    # on it: torchdiffeq does not detach that one.
    unreached = rec.nfe_forward - rec.nfe_backward
    assert 6 * rec.n_steps_rejected <= unreached <= 6 * rec.n_steps_rejected + 1


def test_adjoint_backward_nfe_matches_calls_during_backward() -> None:
    counted = Counted(MLPField())
    solver = GatedSolver(FixedTolerance(1e-6), adjoint=True)
    ys = solver(counted, torch.randn(4, 3, dtype=F64), T01)
    rec = solver.records[-1]
    assert (rec.nfe_forward, rec.nfe_backward) == (counted.calls, 0)
    calls_before = counted.calls
    ys[-1].pow(2).sum().backward()
    assert rec.nfe_backward == counted.calls - calls_before > 0
    assert rec.n_steps_backward > 0 and rec.nfe_total == counted.calls


def test_plain_function_field_under_adjoint_takes_adjoint_params() -> None:
    weight = torch.tensor([[-1.0, 0.5], [0.0, -2.0]], dtype=F64, requires_grad=True)
    solver = GatedSolver(FixedTolerance(1e-6), adjoint=True)
    ys = solver(lambda t, y: y @ weight.T, torch.ones(1, 2, dtype=F64), T01, adjoint_params=(weight,))
    ys[-1].sum().backward()
    assert weight.grad is not None and solver.records[-1].nfe_backward > 0


def test_plain_function_field_under_adjoint_without_params_is_a_type_error() -> None:
    solver = GatedSolver(FixedTolerance(1e-6), adjoint=True)
    with pytest.raises(TypeError, match="adjoint_params"):
        solver(lambda t, y: -y, torch.ones(1, 2, dtype=F64), T01)


def test_seminorm_reduces_backward_nfe() -> None:
    # The parameter adjoint (258 entries here) does not feed back into the dynamics, so leaving it
    # out of the step-size norm (torchdiffeq's seminorm) allows longer backward steps. With this
    # seed: 32 -> 20 evaluations (over 4 seeds: 3 reductions, 1 tie).
    net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2)).double()
    y0 = torch.randn(32, 2, dtype=F64)
    nfe = {}
    for norm in ("default", "seminorm"):
        options = {"norm": "seminorm"} if norm == "seminorm" else None
        solver = GatedSolver(FixedTolerance(1e-6), adjoint=True, adjoint_options=options)
        ys = solver(lambda t, y: net(y), y0, T01, adjoint_params=tuple(net.parameters()))
        ys[-1].pow(2).sum().backward()
        nfe[norm] = solver.records[-1].nfe_backward
    assert nfe["seminorm"] < nfe["default"], nfe


def test_separate_adjoint_tolerance_is_used_for_the_backward_solve() -> None:
    field, y0 = MLPField(), torch.randn(4, 3, dtype=F64)
    results = {}
    for adjoint_tolerance in (None, (1e-3, 1e-3)):
        solver = GatedSolver(FixedTolerance(1e-9), adjoint=True, adjoint_tolerance=adjoint_tolerance)
        ys = solver(field, y0, T01)
        grads = torch.autograd.grad(ys[-1].pow(2).sum(), list(field.parameters()))
        results[adjoint_tolerance] = (solver.records[-1], grads)
    tight, loose = results[None][0], results[(1e-3, 1e-3)][0]
    assert tight.nfe_forward == loose.nfe_forward  # same forward solve
    assert loose.nfe_backward < tight.nfe_backward / 2
    for g_tight, g_loose in zip(results[None][1], results[(1e-3, 1e-3)][1], strict=True):
        assert torch.allclose(g_tight, g_loose, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- policies and modes


def test_train_mode_uses_the_policy_and_eval_mode_the_eval_policy() -> None:
    gate = GaussianGate(MLPGate(3).double(), initial_log10=-3.0)
    solver = GatedSolver(gate)  # default eval policy: fixed 1e-5 (paper, Section 4.2)
    parent = nn.Sequential(nn.ModuleDict({"block": solver}))
    y0 = torch.randn(4, 3, dtype=F64)
    solver(MLPField(), y0, T01)
    trained = solver.records[-1]
    assert trained.log_prob is not None and trained.log_prob.requires_grad
    assert trained.rtol == pytest.approx(10.0 ** float(trained.log10_tolerance))
    parent.eval()  # follows its parent
    solver(MLPField(), y0, T01)
    assert (solver.records[-1].rtol, solver.records[-1].log_prob) == (1e-5, None)
    parent.train()
    solver(MLPField(), y0, T01)
    assert solver.records[-1].log_prob is not None


def test_eval_policy_none_uses_the_gate_mean() -> None:
    gate = GaussianGate(MLPGate(3).double(), initial_log10=-3.0)
    solver = GatedSolver(gate, eval_policy=None).eval()
    y0 = torch.randn(4, 3, dtype=F64)
    for _ in range(2):
        solver(MLPField(), y0, T01)
    first, second = solver.records
    mu, _ = gate.distribution(y0)
    assert first.rtol == second.rtol == pytest.approx(10.0 ** float(mu.detach()))  # no noise
    assert first.log_prob is None


def test_context_defaults_to_y0_and_can_be_given() -> None:
    gate = GaussianGate(MLPGate(3).double(), initial_log10=-3.0)
    solver = GatedSolver(gate, eval_policy=None).eval()
    y0, context = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    solver(MLPField(), y0, T01)
    solver(TupleField(), (y0, torch.zeros(4, dtype=F64)), T01)  # tuple: its first tensor
    solver(MLPField(), y0, T01, context=context)
    assert solver.records[0].rtol == solver.records[1].rtol != solver.records[2].rtol
    assert solver.records[2].rtol == pytest.approx(10.0 ** float(gate.distribution(context)[0].detach()))


def test_records_are_bounded_and_reset() -> None:
    solver = GatedSolver(FixedTolerance(1e-3), max_records=3)
    y0 = torch.ones(1, 1, dtype=F64)
    for _ in range(5):
        solver(lambda t, y: -y, y0, T01)
    assert len(solver.records) == 3
    solver.reset()
    assert len(solver.records) == 0
    unbounded = GatedSolver(FixedTolerance(1e-3), max_records=None)
    for _ in range(40):
        unbounded(lambda t, y: -y, y0, T01)
    assert len(unbounded.records) == 40


def test_gated_solvers_finds_every_solver_in_order() -> None:
    a, b = GatedSolver(FixedTolerance(1e-3)), GatedSolver(FixedTolerance(1e-4))
    model = nn.ModuleList([nn.Linear(1, 1), a, nn.Sequential(b)])
    assert list(gated_solvers(model)) == [a, b]


# ---------------------------------------------------------------- per-sample tolerances


@pytest.mark.parametrize("tupled", [False, True])
def test_per_sample_gate_tolerances_feed_torchdiffeq_per_element(tupled: bool) -> None:
    field = TupleField() if tupled else MLPField()
    y0 = states(F64, tupled)
    gate = GaussianGate(MLPGate(3).double(), reduction="none", initial_log10=-4.0, initial_std=1.0)
    solver = GatedSolver(gate)
    ours = as_tuple(solver(field, y0, T01))
    rec = solver.records[-1]
    assert rec.rtol.shape == (4,) and rec.log_prob.shape == (4,)
    # The same solve, spelled out for torchdiffeq: each sample's tolerance on its own elements.
    per_element = [rec.rtol.view(-1, *[1] * (y.dim() - 1)).expand_as(y) for y in as_tuple(y0)]
    tol = tuple(p.reshape(-1) for p in per_element) if tupled else per_element[0]
    raw = as_tuple(torchdiffeq.odeint(field, y0, T01, rtol=tol, atol=tol))
    assert all(torch.equal(a, b) for a, b in zip(ours, raw, strict=True))


@pytest.mark.parametrize("tupled", [False, True])
@pytest.mark.parametrize("adjoint", [False, True])
def test_equal_per_sample_tolerances_equal_the_scalar_solve(tupled: bool, adjoint: bool) -> None:
    field, y0 = (TupleField() if tupled else MLPField()), states(F64, tupled)
    results = []
    for policy in (ConstantTolerance(torch.full((4,), 1e-6, dtype=F64)), FixedTolerance(1e-6)):
        solver = GatedSolver(policy, adjoint=adjoint)
        ys = as_tuple(solver(field, y0, T01))
        grads = torch.autograd.grad(sum(y[-1].pow(2).sum() for y in ys), list(field.parameters()))
        results.append((ys, grads, solver.records[-1]))
    (ys_a, g_a, rec_a), (ys_b, g_b, rec_b) = results
    assert all(torch.equal(a, b) for a, b in zip(ys_a, ys_b, strict=True))
    assert rec_a.nfe_forward == rec_b.nfe_forward
    # The adjoint's per-element layout differs from the scalar one only in how norms group.
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(g_a, g_b, strict=True))
    if adjoint:
        assert rec_a.nfe_backward > 0


def test_per_sample_tolerance_needs_the_batch_dimension_first() -> None:
    solver = GatedSolver(ConstantTolerance(torch.full((4,), 1e-5, dtype=F64)))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        solver(lambda t, y: -y, torch.ones(3, 4, dtype=F64), T01)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0.0, -1e-4, 2.0, math.nan, math.inf])
def test_invalid_tolerance_from_a_policy_raises_value_error_naming_it(bad: float) -> None:
    solver = GatedSolver(ConstantTolerance(bad))
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        solver(lambda t, y: -y, torch.ones(1, 1, dtype=F64), T01)


def test_invalid_per_sample_tolerance_names_the_bad_values() -> None:
    solver = GatedSolver(ConstantTolerance(torch.tensor([1e-5, math.nan, 3.0], dtype=F64)))
    with pytest.raises(ValueError, match=r"nan, 3\.0"):
        solver(lambda t, y: -y, torch.ones(3, 1, dtype=F64), T01)


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="'rk45'"):
        GatedSolver(FixedTolerance(1e-5), method="rk45")
    with pytest.raises(ValueError, match="0"):
        GatedSolver(FixedTolerance(1e-5), max_num_steps=0)
    with pytest.raises(ValueError, match="adjoint rtol"):
        GatedSolver(FixedTolerance(1e-5), adjoint_tolerance=(0.0, 1e-5))
    with pytest.raises(TypeError, match="float"):
        GatedSolver(1e-5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("y0", "t", "error", "message"),
    [
        (torch.ones(2, dtype=torch.int64), T01, TypeError, "floating point"),
        (torch.ones(2, dtype=F64), torch.tensor([], dtype=F64), ValueError, "one time"),
        (torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0, 0.5], dtype=F64), ValueError, "monotone|increasing"),
        (torch.ones(2, dtype=F64), torch.tensor([0.0, math.inf], dtype=F64), ValueError, "finite"),
    ],
)
def test_invalid_inputs(y0: torch.Tensor, t: torch.Tensor, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        GatedSolver(FixedTolerance(1e-5))(lambda t, y: -y, y0, t)


def test_nan_in_y0_names_the_initial_time() -> None:
    y0 = torch.tensor([[1.0, math.nan]], dtype=F64)
    with pytest.raises(NonFiniteStateError, match=r"t=0\.25"):
        GatedSolver(FixedTolerance(1e-5))(lambda t, y: -y, y0, torch.tensor([0.25, 1.0], dtype=F64))


@pytest.mark.parametrize(
    "field",
    [
        lambda t, y: torch.where(t > 0.3, torch.full_like(y, math.nan), -y),  # NaN after t = 0.3
        lambda t, y: torch.sqrt(0.6 - t.expand_as(y)),  # NaN beyond t = 0.6
        lambda t, y: torch.where(t < 0.5, 0 * y, 1e300 * y.exp()),  # overflows to inf at t = 0.5
    ],
    ids=["nan", "sqrt", "overflow"],
)
def test_non_finite_field_output_names_the_time_reached(field) -> None:
    solver = GatedSolver(FixedTolerance(1e-6), max_num_steps=10_000)
    with pytest.raises(NonFiniteStateError, match=r"NaN or inf .* at t=\d") as info:
        solver(field, torch.ones(2, 3, dtype=F64), T01)
    rec = info.value.record
    assert rec is solver.records[-1] and rec.status is SolveStatus.NON_FINITE
    assert 0.0 <= rec.t_reached <= 0.6 and f"t={rec.t_reached:.6g}" in str(info.value)


def test_step_budget_raises_with_the_record_so_far() -> None:
    solver = GatedSolver(FixedTolerance(1e-8), max_num_steps=3)
    with pytest.raises(StepBudgetExceeded, match="max_num_steps=3") as info:
        solver(lambda t, y: -y, torch.ones(2, 3, dtype=F64), T01)
    assert isinstance(info.value, RuntimeError)
    rec = info.value.record
    assert rec.status is SolveStatus.STEP_BUDGET_EXCEEDED and rec.n_steps_accepted == 3
    assert rec.nfe_forward == 2 + 6 * rec.n_steps and 0 < rec.t_reached < 1


def test_step_size_underflow_is_typed() -> None:
    # dy/dt = 2 y^2 from y = 1 blows up at t = 0.5: the step size shrinks to nothing.
    solver = GatedSolver(FixedTolerance(1e-3), max_num_steps=100_000)
    with pytest.raises(StepSizeUnderflow, match="underflow") as info:
        solver(lambda t, y: 2 * y**2, torch.ones(2, 3, dtype=F64), T01)
    assert info.value.record.status is SolveStatus.STEP_SIZE_UNDERFLOW
    assert info.value.record.t_reached == pytest.approx(0.5, abs=1e-3)


def test_gate_producing_nan_is_an_error_in_the_solver() -> None:
    net = MLPGate(3).double()
    with torch.no_grad():
        net.head.bias.fill_(math.nan)
    solver = GatedSolver(GaussianGate(net))
    with pytest.raises(NonFiniteToleranceError):
        solver(lambda t, y: -y, torch.ones(2, 3, dtype=F64), T01)
    assert len(solver.records) == 0  # nothing was solved with a NaN tolerance
