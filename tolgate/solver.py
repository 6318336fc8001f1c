"""GatedSolver: asks a policy for the tolerance, runs torchdiffeq, and fills a SolveRecord.

Where NFEs are counted: :class:`_CountingField`, which wraps the user's vector field. It counts
every call (forward solve, and the adjoint solve when autograd's backward runs it), receives
torchdiffeq's step callbacks (accepted and rejected steps), and for direct backpropagation
registers a gradient hook on each evaluation's output, so a VJP through that evaluation is
counted when autograd actually runs it.

Where failures are detected: also in :class:`_CountingField`, never by torchdiffeq's ``assert``
statements (which ``python -O`` strips, turning a step budget into nothing and a NaN into an
endless loop). Before every step torchdiffeq calls ``callback_step(t0, y0, dt)``; there
:class:`_StepGuard` counts the step against the budget and tests the step size, and the state
``y0`` is tested for NaN/inf (what torchdiffeq's stripped ``assert`` did), on the forward solve
and on the adjoint solve alike. A NaN or inf from the field makes torchdiffeq's error ratio NaN,
the step is rejected and the next ``dt`` is NaN, which torchdiffeq replaces by ``min_step`` (0 by
default): so a zero or non-finite ``dt`` at the callback is the sign of a non-finite evaluation,
and no per-evaluation test (one device sync per evaluation) is needed. The state test catches
what the error ratio hides: torchdiffeq's norm for tuple states and for the adjoint state is a
Python ``max`` over per-tensor norms, which drops a NaN, so such a step is accepted with a NaN
component. A state that overflows on the last step (its error scale is then inf, so it passes
the error test) is caught by the check of the returned solution.

Cost per step: two host reads (t0, dt) and one reduction of the state with one sync; torchdiffeq
itself syncs several times per step.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchdiffeq
from torch import nn

from .checks import LOW_PRECISION_DTYPES, check_rtol_for_dtype, check_times, control_dtype, state_dtype_of
from .errors import NonFiniteStateError, SolveError, StepBudgetExceeded, StepSizeUnderflow
from .persample import PreparedSolve, prepare_per_sample, run_prepared
from .policies import FixedTolerance, Progress, ToleranceChoice, TolerancePolicy, validate_tolerance
from .records import SolveRecord, SolveStatus
from .scopes import announce, override_for

State = torch.Tensor | tuple[torch.Tensor, ...]
VectorField = Callable[[torch.Tensor, State], State]
TorchdiffeqTolerance = float | torch.Tensor | tuple[torch.Tensor, ...]

ADAPTIVE_METHODS = ("dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8")
BACKENDS = ("torchdiffeq", "tolgate")
PER_SAMPLE_METHODS = ("dopri5", "bosh3", "tsit5")
_STATUS_OF_ERROR = {
    StepBudgetExceeded: SolveStatus.STEP_BUDGET_EXCEEDED,
    StepSizeUnderflow: SolveStatus.STEP_SIZE_UNDERFLOW,
    NonFiniteStateError: SolveStatus.NON_FINITE,
}
# Section 4.2 of the paper: evaluate with a fixed tight tolerance, never the sampled one.
DEFAULT_EVAL_POLICY = FixedTolerance(1e-5)
#: a step at most this many machine epsilons of ``max(|t|, |t[-1] - t[0]|)`` is an underflow
UNDERFLOW_ULPS = 4.0


class _StepGuard:
    """Step budget and step-size test for one direction of a solve (forward, or adjoint).

    Works on *keys*: times multiplied by the direction of the forward solve, so that keys increase
    along the forward solve. The budget counts steps (accepted and rejected) per output interval,
    as torchdiffeq's ``max_num_steps`` does: a forward step from key ``k`` serves the interval
    ending at the first output key above ``k``; an adjoint step (which runs each interval
    backwards, from ``keys[i]`` down to ``keys[i-1]``) the interval whose end is the first output
    key at or above ``k``.
    """

    __slots__ = ("budget", "keys", "adjoint", "smallest_scale", "span", "interval", "steps")

    def __init__(self, budget: int | None, keys: list[float], eps: float, adjoint: bool) -> None:
        self.budget = budget
        self.keys = keys
        self.adjoint = adjoint
        self.smallest_scale = UNDERFLOW_ULPS * eps
        self.span = abs(keys[-1] - keys[0])
        self.interval = -1
        self.steps = 0

    def over_budget(self, key: float) -> bool:
        """Count one step from ``key``; whether it exceeds the budget of its interval."""
        if self.budget is None:
            return False
        find = bisect.bisect_left if self.adjoint else bisect.bisect_right
        interval = find(self.keys, key)
        if interval != self.interval:
            self.interval, self.steps = interval, 0
        self.steps += 1
        return self.steps > self.budget

    def smallest_step(self, key: float) -> float:
        """The smallest step that still advances time meaningfully at ``key`` (same units as t)."""
        return self.smallest_scale * max(abs(key), self.span)


class _CountingField:
    """The user's vector field, plus the counters torchdiffeq's callbacks and autograd feed, and
    the library's own failure checks (see the module docstring).

    The field itself is called unchanged, so outputs are bitwise those of a raw odeint call. A
    plain object with slots, not an ``nn.Module``: it is called once per evaluation, and module
    call and attribute machinery there cost more than the counting itself.
    """

    __slots__ = (
        "func",
        "record",
        "in_backward",
        "last_t",
        "last_dt",
        "last_output",
        "forward_guard",
        "adjoint_guard",
        "sign",
        "state_dtype",
    )

    def __init__(self, func: VectorField, record: SolveRecord) -> None:
        self.func = func
        self.record = record
        self.in_backward = False
        self.last_t: torch.Tensor | None = None
        self.last_dt: torch.Tensor | None = None
        self.last_output: State | None = None
        self.forward_guard: _StepGuard | None = None
        self.adjoint_guard: _StepGuard | None = None
        self.sign = 1.0
        self.state_dtype: torch.dtype | None = None

    def guard(self, times: list[float], eps: float, budget: int | None, adjoint_budget: int | None) -> None:
        """Arm the step checks for a torchdiffeq solve over the output ``times`` (user time).

        ``eps``: machine epsilon of the solver's time dtype; ``budget``, ``adjoint_budget``: steps
        per output interval of the forward and of the adjoint solve (``None``: unlimited).
        """
        self.sign = 1.0 if times[-1] > times[0] else -1.0
        keys = [self.sign * time for time in times]
        self.forward_guard = _StepGuard(budget, keys, eps, adjoint=False)
        self.adjoint_guard = _StepGuard(adjoint_budget, keys, eps, adjoint=True)

    def __call__(self, t: torch.Tensor, y: State, *per_sample: torch.Tensor) -> State:
        if self.in_backward:
            self.record.nfe_backward += 1
        else:
            self.record.nfe_forward += 1
        try:
            out = self.func(t, y, *per_sample)  # per_sample: the row indices, for the per-sample backend
        except BaseException as exc:
            self._field_raised(exc, t)
            raise
        self.last_output = out
        if not self.in_backward and torch.is_grad_enabled():
            self._count_vjp_when_backpropagated(out)
        return out

    def _field_raised(self, exc: BaseException, t: torch.Tensor) -> None:
        """Mark the record (status, time) and hand it to the exception, which is re-raised unchanged."""
        record = self.record
        if record.status in (SolveStatus.RUNNING, SolveStatus.SUCCESS):  # SUCCESS: in the adjoint's backward
            record.status = SolveStatus.FIELD_ERROR if isinstance(exc, Exception) else SolveStatus.INTERRUPTED
            if self.in_backward:
                record.extra["failed_in"] = "adjoint"
            else:
                record.t_reached = _time_of(self.last_t if self.last_t is not None else t)
        _attach_record(exc, record)
        phase = "the adjoint solve (in autograd's backward)" if self.in_backward else "the forward solve"
        exc.add_note(
            f"tolgate: raised by the vector field during {phase} ({record.method}, rtol={_short(record.rtol)}, "
            f"t={_time_of(t):.6g}, after {record.nfe_total} evaluations); the SolveRecord is exc.record"
        )

    def _count_vjp_when_backpropagated(self, out: State) -> None:
        tensors = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if not tensors:
            return
        fired = [False]  # one count per evaluation, whichever of its outputs receives a gradient first
        # The hook holds the record, not self: self.last_output is this very output, and a cycle
        # through a tensor's hooks passes through autograd's C++ graph, which Python's garbage
        # collector cannot see, so it would keep every training solve's graph alive for good.
        record = self.record

        def hook(grad: torch.Tensor) -> None:
            if not fired[0]:
                fired[0] = True
                record.nfe_backward += 1

        for tensor in tensors:
            tensor.register_hook(hook)

    def callback_step(self, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        # t0 in user time (torchdiffeq un-negates it for decreasing t); dt > 0 in solver time.
        self.last_t, self.last_dt = t0, dt
        if self.forward_guard is not None:
            # detach: torchdiffeq does not detach the first step size from the initial-step probe.
            self._check_step(self.forward_guard, self.sign * float(t0.detach()), y0, float(dt.detach()))

    def callback_accept_step(self, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        self.record.n_steps_accepted += 1

    def callback_reject_step(self, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        self.record.n_steps_rejected += 1

    def callback_step_adjoint(self, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        # The adjoint solve reports t0 as a key already (the forward solve's increasing time), and
        # y0 as (t, y, adj_y, *adj_params): the parameter adjoints do not feed back into the
        # dynamics, so only the first three are tested.
        if self.adjoint_guard is not None:
            self._check_step(self.adjoint_guard, float(t0.detach()), y0[:3], float(dt.detach()))
        self.record.n_steps_backward += 1

    def _check_step(self, guard: _StepGuard, key: float, y0: State, dt: float) -> None:
        """Raise the typed error if the step about to be taken from ``key`` must not be taken."""
        if guard.over_budget(key):
            raise self._failure(
                StepBudgetExceeded, f"step budget max_num_steps={guard.budget} exceeded", key, guard.adjoint
            )
        smallest = guard.smallest_step(key)
        if not dt > smallest:
            if dt == 0.0 or not math.isfinite(dt):
                # The last error ratio was NaN: torchdiffeq replaced the NaN step by min_step (0).
                raise self._non_finite(key, guard.adjoint)
            if _non_finite(self.last_output):
                raise self._failure(NonFiniteStateError, "the vector field produced NaN or inf", key, guard.adjoint)
            raise self._failure(
                StepSizeUnderflow,
                f"step size underflow: dt={dt:.3g} is below {smallest:.3g} ({UNDERFLOW_ULPS:g} ulps of the time)",
                key,
                guard.adjoint,
            )
        if _non_finite(y0):
            field_output_bad = _non_finite(self.last_output)
            what = "the vector field produced NaN or inf" if field_output_bad else "the state became NaN or inf"
            raise self._failure(NonFiniteStateError, what, key, guard.adjoint)

    def _non_finite(self, key: float, adjoint: bool) -> NonFiniteStateError:
        if _non_finite(self.last_output):
            return self._failure(NonFiniteStateError, "the vector field produced NaN or inf", key, adjoint)
        return self._failure(
            NonFiniteStateError,
            f"the error estimate became NaN or inf while the vector field's last output was finite (an overflow "
            f"of the state's dtype {self.state_dtype} in the solver's arithmetic, or a NaN at an earlier stage)",
            key,
            adjoint,
        )

    def _failure(self, error: type[SolveError], what: str, key: float, adjoint: bool) -> SolveError:
        """The typed error for a failure at ``key``, with the record's status and time set."""
        record = self.record
        record.status = _STATUS_OF_ERROR[error]
        time = self.sign * key
        solve = f"rtol={_short(record.rtol)}, {record.method}"
        if adjoint:
            record.extra["failed_in"] = "adjoint"
            where = f"in the adjoint solve (autograd's backward, {solve}) at t={time:.6g}"
        else:
            record.t_reached = time
            where = f"(solve with {solve}) at t={time:.6g}"
        return error(f"{what} {where}", record)


class GatedSolver(nn.Module):
    """``torchdiffeq.odeint`` with the tolerance chosen by a policy and the cost of each solve recorded.

    ``solver(func, y0, t, context=None)`` takes the same ``func``, ``y0`` (tensor or tuple of
    tensors) and ``t`` as ``torchdiffeq.odeint`` and returns the same output. In training mode the
    tolerance comes from ``policy``; in eval mode from ``eval_policy`` (default fixed 1e-5, the
    paper's Section 4.2 protocol), or from ``policy.deterministic`` (a gate's mean) when
    ``eval_policy`` is ``None``. Under a fixed tolerance the output is bitwise identical to the raw
    ``odeint`` call with the same arguments.

    Args:
        policy: a :class:`~tolgate.policies.TolerancePolicy`; it reads ``context`` (detached, so
            the REINFORCE term cannot reach the network that produced the context).
        method: an adaptive torchdiffeq method (``dopri5``, ``bosh3``, ``fehlberg2``, ...).
        adjoint: solve the backward pass with ``odeint_adjoint``.
        options: torchdiffeq solver options.
        max_num_steps: step budget per output interval; exceeding it raises
            :class:`~tolgate.errors.StepBudgetExceeded`.
        adjoint_tolerance: ``(rtol, atol)`` for the adjoint solve; default the forward solve's.
        adjoint_options: options of the adjoint solve, e.g. ``{"norm": "seminorm"}``.
        max_records: how many :class:`SolveRecord` to keep in ``records`` (oldest dropped);
            ``None`` keeps all.
        backend: ``"torchdiffeq"`` (one step size for the batch) or ``"tolgate"``: the native
            per-sample solver of :mod:`tolgate.persample`, where every sample has its own step
            size and tolerance (a ``(batch,)`` tolerance from a ``GaussianGate(reduction="none")``
            is used as is) and the record carries ``nfe_per_sample``. With ``"tolgate"`` the field
            follows the per-sample contract ``func(t (active,), y (active, ...), idx (active,))``
            (wrap a torchdiffeq field with :func:`tolgate.persample.from_torchdiffeq`); methods
            dopri5, bosh3, tsit5; no adjoint. Its ``nfe_forward`` counts calls of the field
            (each on the rows still integrating); ``extra["rows_evaluated"]`` counts rows.

    Failures. The step budget, the step-size underflow test (a step of at most 4 ulps of
    ``max(|t|, |t[-1] - t[0]|)`` with torchdiffeq; 10 ulps of ``t`` per sample with ``"tolgate"``)
    and the detection of NaN/inf are the library's own checks, on both backends and on the
    adjoint solve, so they hold under ``python -O`` (torchdiffeq's ``assert`` statements do not).
    ``max_num_steps=None`` means no budget: a solve that cannot finish then stops only at an
    underflow or a non-finite value, so give a budget wherever a bad tolerance or field may occur.

    Records. A call whose inputs are refused (``ValueError``/``TypeError`` for ``t``, ``y0``, the
    tolerance the policy chose, or a tolerance the dtype cannot meet; ``NonFiniteStateError`` for
    a NaN ``y0``) appends no record: nothing was solved, and ``records[-1]`` is still the
    previous call's. Every call that starts solving appends exactly one record first, and when
    it raises, the record's status says how (never ``RUNNING``) and the exception carries it as
    ``exc.record``: the typed :class:`~tolgate.errors.SolveError` subclasses for solver failures;
    an exception raised by the field itself is re-raised unchanged, with status ``FIELD_ERROR``,
    ``exc.record`` set (unless it has a ``record`` already) and a note naming the time. With
    ``adjoint=True`` a failure of the adjoint solve, raised from ``loss.backward()``, sets the
    status of the forward record it belongs to (and ``extra["failed_in"] = "adjoint"``).
    A deep copy or pickle of a solver holds its records with tensors detached.

    Precision. A float16 or bfloat16 state needs ``rtol >= 10 * eps`` of its dtype (float16:
    0.0098, bfloat16: 0.078), else ``ValueError`` naming dtype, eps and rtol: below that the error
    estimate is roundoff and a solve "succeeds" with a state that barely moved. For such states
    the error control (tolerance scale, scaled error, norm) runs in float32 and the solver's time
    in at least float32, where the scaled error cannot overflow. See :mod:`tolgate.checks`.
    """

    def __init__(
        self,
        policy: TolerancePolicy,
        method: str = "dopri5",
        adjoint: bool = False,
        options: dict[str, Any] | None = None,
        max_num_steps: int | None = None,
        eval_policy: TolerancePolicy | None = DEFAULT_EVAL_POLICY,
        adjoint_tolerance: tuple[float, float] | None = None,
        adjoint_options: dict[str, Any] | None = None,
        max_records: int | None = 16,
        backend: str = "torchdiffeq",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "tolgate":
            if method not in PER_SAMPLE_METHODS:
                raise ValueError(f"backend 'tolgate' supports methods {PER_SAMPLE_METHODS}, got {method!r}")
            if adjoint:
                raise NotImplementedError("backend 'tolgate' has no adjoint: use adjoint=False (backpropagation)")
        if not isinstance(policy, TolerancePolicy):
            raise TypeError(f"policy must be a TolerancePolicy, got {type(policy).__name__}")
        if backend == "torchdiffeq" and method not in ADAPTIVE_METHODS:
            raise ValueError(f"method must be one of {ADAPTIVE_METHODS} (an adaptive method), got {method!r}")
        if max_num_steps is not None and (
            not isinstance(max_num_steps, int) or isinstance(max_num_steps, bool) or max_num_steps < 1
        ):
            raise ValueError(f"max_num_steps must be an int >= 1 or None, got {max_num_steps!r}")
        if adjoint_tolerance is not None:
            validate_tolerance(adjoint_tolerance[0], "adjoint rtol")
            validate_tolerance(adjoint_tolerance[1], "adjoint atol")
        self.policy = policy
        self.eval_policy = eval_policy
        self.backend = backend
        self.max_num_steps = max_num_steps
        self.method = method
        self.adjoint = adjoint
        self.options = dict(options or {})
        if max_num_steps is not None:
            self.options["max_num_steps"] = max_num_steps
        self.adjoint_tolerance = adjoint_tolerance
        self.adjoint_options = adjoint_options
        self.records: deque[SolveRecord] = deque(maxlen=max_records)
        self.progress = Progress()

    def reset(self) -> None:
        """Forget all records."""
        self.records.clear()

    def choose_tolerance(self, context: torch.Tensor) -> ToleranceChoice:
        """The policy's choice for this context: the override if one is active, else per the train/eval mode."""
        context = context.detach()
        override = override_for(self)
        if override is not None:
            choice = override(context, self.progress)
        elif self.training:
            choice = self.policy(context, self.progress)
        elif self.eval_policy is None:
            choice = self.policy.deterministic(context, self.progress)
        else:
            choice = self.eval_policy(context, self.progress)
        validate_tolerance(choice.rtol, "rtol")
        validate_tolerance(choice.atol, "atol")
        return choice

    def forward(
        self,
        func: VectorField,
        y0: State,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        adjoint_params: tuple[torch.Tensor, ...] | None = None,
    ) -> State:
        """Solve ``dy/dt = func(t, y)`` from ``y0`` at the times ``t`` (1-D, strictly monotone).

        ``y0``: tensor ``(batch, *state)`` or a tuple of such tensors (per-sample tolerances
        need the batch dimension first). ``context`` defaults to ``y0`` (its first tensor if a
        tuple). Returns ``(len(t), *y0.shape)`` (a tuple of such tensors for a tuple ``y0``).
        """
        # Everything that can refuse the inputs runs before the record exists (see the class docstring).
        times = check_times(t)
        _check_state(y0, t)
        if context is None:
            context = y0[0] if isinstance(y0, tuple) else y0
        choice = self.choose_tolerance(context)
        state_dtype = state_dtype_of(y0)
        check_rtol_for_dtype(choice.rtol, state_dtype)
        if self.backend == "tolgate":
            problem = prepare_per_sample(y0, t, choice.rtol, choice.atol, self.method, self.max_num_steps)
        else:
            if self.adjoint:
                adjoint_params = _adjoint_params(func, adjoint_params)
                if self.adjoint_tolerance is not None:
                    check_rtol_for_dtype(self.adjoint_tolerance[0], state_dtype, "adjoint rtol")
            rtol = _solver_tolerance(choice.rtol, y0, state_dtype)
            atol = _solver_tolerance(choice.atol, y0, state_dtype)
        record = SolveRecord(
            method=self.method,
            adjoint=self.adjoint,
            rtol=choice.rtol,
            atol=choice.atol,
            log10_tolerance=choice.log10_tolerance,
            log_prob=choice.log_prob,
        )
        self.records.append(record)
        announce(self, record)
        field = _CountingField(func, record)
        field.state_dtype = state_dtype
        try:
            if self.backend == "tolgate":
                ys = self._solve_per_sample(field, problem, record)
            else:
                ys = self._solve_torchdiffeq(field, y0, t, times, rtol, atol, adjoint_params, state_dtype)
        except SolveError as exc:
            if exc.record is None:  # raised by the per-sample step loop
                exc.record = record
            if record.status is SolveStatus.RUNNING:
                record.status = _STATUS_OF_ERROR.get(type(exc), SolveStatus.FAILED)
            raise
        except AssertionError as exc:
            if record.status is not SolveStatus.RUNNING:  # the field's own assert: re-raised as it is
                raise
            raise _translate_failure(exc, field, record) from exc
        except BaseException as exc:
            if record.status is SolveStatus.RUNNING:
                record.status = SolveStatus.FAILED if isinstance(exc, Exception) else SolveStatus.INTERRUPTED
                record.t_reached = _time_of(field.last_t)
                _attach_record(exc, record)
            raise
        field.in_backward = True  # any later call comes from the adjoint solve in autograd's backward
        _check_solution(ys, times, field, record)
        record.status = SolveStatus.SUCCESS
        record.t_reached = times[-1]
        return ys

    def _solve_torchdiffeq(
        self,
        field: _CountingField,
        y0: State,
        t: torch.Tensor,
        times: list[float],
        rtol: TorchdiffeqTolerance,
        atol: TorchdiffeqTolerance,
        adjoint_params: tuple[torch.Tensor, ...] | None,
        state_dtype: torch.dtype,
    ) -> State:
        # The step budget is enforced by the field's step guard (also under -O), not by torchdiffeq's
        # assert, so it is taken out of the options torchdiffeq sees.
        options = {k: v for k, v in self.options.items() if k != "max_num_steps"}
        budget = self.options.get("max_num_steps")
        if self.adjoint_options is None:  # torchdiffeq then derives the adjoint's options from options
            adjoint_options, adjoint_budget = None, budget
        else:
            adjoint_options = {k: v for k, v in self.adjoint_options.items() if k != "max_num_steps"}
            adjoint_budget = self.adjoint_options.get("max_num_steps")
        if state_dtype in LOW_PRECISION_DTYPES and t.dtype in LOW_PRECISION_DTYPES:
            t = t.to(torch.float32)  # the solver's time in at least float32 (see checks)
        time_dtype = t.dtype
        for tensor in y0 if isinstance(y0, tuple) else (y0,):
            time_dtype = torch.promote_types(time_dtype, tensor.dtype)
        field.guard(times, torch.finfo(time_dtype).eps, budget, adjoint_budget)
        if not self.adjoint:
            return torchdiffeq.odeint(field, y0, t, rtol=rtol, atol=atol, method=self.method, options=options)
        if self.adjoint_tolerance is not None:
            adjoint_rtol, adjoint_atol = self.adjoint_tolerance
        else:
            adjoint_rtol = _adjoint_tolerance(rtol, adjoint_params)
            adjoint_atol = _adjoint_tolerance(atol, adjoint_params)
        return torchdiffeq.odeint_adjoint(
            field,
            y0,
            t,
            rtol=rtol,
            atol=atol,
            method=self.method,
            options=options,
            adjoint_rtol=adjoint_rtol,
            adjoint_atol=adjoint_atol,
            adjoint_options=adjoint_options,
            adjoint_params=adjoint_params,
        )

    def _solve_per_sample(self, field: _CountingField, problem: PreparedSolve, record: SolveRecord) -> State:
        ys, stats = run_prepared(field, problem, raise_on_failure=True)
        record.nfe_per_sample = stats.nfe
        record.n_steps_accepted = int(stats.n_accepted.sum())
        record.n_steps_rejected = int(stats.n_rejected.sum())
        record.extra["rows_evaluated"] = int(stats.rows_evaluated)
        return ys

    def extra_repr(self) -> str:
        return f"method={self.method!r}, adjoint={self.adjoint}, backend={self.backend!r}"


def gated_solvers(module: nn.Module) -> Iterator[GatedSolver]:
    """Every GatedSolver inside ``module``, in registration order (one per CNF block, say)."""
    return (m for m in module.modules() if isinstance(m, GatedSolver))


def set_progress(module: nn.Module, step: int, epoch: float) -> None:
    """Tell every GatedSolver in ``module`` the training progress (for scheduled policies)."""
    progress = Progress(step=step, epoch=epoch)
    for solver in gated_solvers(module):
        solver.progress = progress


def _check_state(y0: State, t: torch.Tensor) -> None:
    tensors = y0 if isinstance(y0, tuple) else (y0,)
    for k, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"y0 must be a tensor or a tuple of tensors; element {k} is {type(tensor).__name__}")
        if not torch.is_floating_point(tensor):
            raise TypeError(f"y0 must be floating point; element {k} has dtype {tensor.dtype}")
        if _non_finite(tensor):
            raise NonFiniteStateError(
                f"y0 (element {k}) contains NaN or inf at the initial time t={float(t[0]):.6g}; nothing was solved"
            )


def _adjoint_params(func: VectorField, adjoint_params: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...]:
    """The parameters the adjoint solve differentiates: as given, or those of an ``nn.Module`` field."""
    if adjoint_params is not None:
        return tuple(adjoint_params)
    if not isinstance(func, nn.Module):
        raise TypeError(
            "adjoint=True needs the field's parameters: pass adjoint_params=(tensors...) for a "
            f"field that is not an nn.Module (got {type(func).__name__})"
        )
    return tuple(func.parameters())


def _solver_tolerance(tol: float | torch.Tensor, y0: State, state_dtype: torch.dtype) -> TorchdiffeqTolerance:
    """The tolerance as torchdiffeq takes it: a float, or per-element tensors laid out like ``y0``.

    A 16-bit state always gets per-element float32 tensors: torchdiffeq computes the tolerance
    scale ``atol + rtol * |y|`` with the promoted dtype of those tensors and the state, so the
    scaled error and its norm are then float32 (a 0-d tolerance would not promote a float16 state).
    """
    if state_dtype not in LOW_PRECISION_DTYPES:
        return _per_element(tol, y0)
    control = control_dtype(state_dtype)
    if isinstance(tol, torch.Tensor):
        per_element = _per_element(tol.to(control), y0)
    else:
        tensors = y0 if isinstance(y0, tuple) else (y0,)
        scalar = torch.tensor(tol, dtype=control, device=tensors[0].device)
        expanded = tuple(scalar.expand(tensor.shape) for tensor in tensors)
        per_element = tuple(e.reshape(-1) for e in expanded) if isinstance(y0, tuple) else expanded[0]
    return per_element


def _per_element(tol: float | torch.Tensor, y0: State) -> float | torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-sample tolerances ``(batch,)`` broadcast to torchdiffeq's per-element tolerance tensors."""
    if not isinstance(tol, torch.Tensor):
        return tol
    tensors = y0 if isinstance(y0, tuple) else (y0,)
    expanded = []
    for tensor in tensors:
        if tensor.dim() == 0 or tensor.shape[0] != tol.shape[0]:
            raise ValueError(
                f"per-sample tolerance of shape {tuple(tol.shape)} needs every state tensor to have "
                f"the batch dimension first; got a state of shape {tuple(tensor.shape)}"
            )
        per_sample = tol.to(device=tensor.device).view(-1, *([1] * (tensor.dim() - 1)))
        expanded.append(per_sample.expand(tensor.shape))
    if isinstance(y0, tuple):
        return tuple(e.reshape(-1) for e in expanded)
    return expanded[0]


def _adjoint_tolerance(
    tol: float | torch.Tensor | tuple[torch.Tensor, ...], adjoint_params: tuple[torch.Tensor, ...]
) -> float | tuple[torch.Tensor, ...]:
    """The forward solve's tolerance laid out for torchdiffeq's adjoint state.

    The adjoint solves the tuple ``(t, y, adj_y, *adj_params)``, so a per-element tolerance must be
    a tuple of that length: the per-element values for ``y`` and ``adj_y`` (flattened, as
    torchdiffeq flattens tuple states) and, for the scalar time and the parameter adjoints that
    every sample feeds, the tightest per-sample value.
    """
    if not isinstance(tol, (torch.Tensor, tuple)):
        return tol
    parts = (tol,) if isinstance(tol, torch.Tensor) else tol
    per_element = torch.cat([part.reshape(-1) for part in parts])
    tightest = per_element.min()
    # torchdiffeq drops parameters that do not require grad from the adjoint state.
    n_params = sum(1 for p in adjoint_params if p.requires_grad)
    return (tightest, per_element, per_element) + (tightest,) * n_params


def _translate_failure(exc: AssertionError, field: _CountingField, record: SolveRecord) -> SolveError:
    """The typed error for an ``assert`` torchdiffeq raised that the field's own checks did not
    pre-empt (a fallback: the step guard runs before torchdiffeq's asserts)."""
    message = str(exc)
    t_reached = _time_of(field.last_t)
    record.t_reached = t_reached
    where = f"(solve with rtol={_short(record.rtol)}, {record.method}) at t={t_reached:.6g}"
    # A NaN/inf stage makes the error ratio NaN; torchdiffeq then replaces the NaN step size by
    # min_step (0 by default) and fails with "underflow in dt 0.0", so a zero step is a non-finite sign.
    nan_step = field.last_dt is not None and not bool(field.last_dt > 0)
    if nan_step or _non_finite(field.last_output) or "non-finite" in message:
        record.status = SolveStatus.NON_FINITE
        return NonFiniteStateError(f"the vector field produced NaN or inf {where}", record)
    if "max_num_steps" in message:
        record.status = SolveStatus.STEP_BUDGET_EXCEEDED
        return StepBudgetExceeded(f"step budget exceeded {where}: {message}", record)
    if "underflow" in message:
        record.status = SolveStatus.STEP_SIZE_UNDERFLOW
        return StepSizeUnderflow(f"step size underflow {where}: {message}", record)
    record.status = SolveStatus.FAILED
    return SolveError(f"torchdiffeq failed {where}: {message}", record)


def _check_solution(ys: State, times: list[float], field: _CountingField, record: SolveRecord) -> None:
    """Raise :class:`NonFiniteStateError` if the returned solution holds NaN or inf: a state that
    overflowed on the last step (its error scale is then inf, so the step passes the error test)
    or that a ``min_step`` option forced through. One reduction per output tensor."""
    tensors = ys if isinstance(ys, tuple) else (ys,)
    if not _non_finite(tensors):
        return
    bad = [i for i in range(len(times)) if _non_finite(tuple(tensor[i] for tensor in tensors))]
    record.status = SolveStatus.NON_FINITE
    record.t_reached = times[bad[0] - 1] if bad[0] > 0 else times[0]
    source = "the vector field produced NaN or inf" if _non_finite(field.last_output) else "the state overflowed"
    raise NonFiniteStateError(
        f"the solution is NaN or inf from t={times[bad[0]]:.6g} on ({source}; solve with "
        f"rtol={_short(record.rtol)}, {record.method}, state dtype {field.state_dtype})",
        record,
    )


def _non_finite(output: State | None) -> bool:
    """Whether a tensor or tuple of tensors holds NaN or inf.

    Through ``aminmax``: one pass, and min and max propagate NaN while an inf is an extreme. On
    CPU ``torch.isfinite(x).all()`` costs about ten times as much, and arithmetic on the two 0-d
    results more than reading them.
    """
    if output is None:
        return False
    for tensor in (output,) if isinstance(output, torch.Tensor) else output:
        if tensor.numel():
            low, high = torch.aminmax(tensor.detach())
            if not (math.isfinite(low.item()) and math.isfinite(high.item())):
                return True
    return False


def _attach_record(exc: BaseException, record: SolveRecord) -> None:
    """Set ``exc.record`` unless the exception has one already (a nested solve's) or takes no attributes."""
    if getattr(exc, "record", None) is None:
        try:
            exc.record = record  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with __slots__
            pass


def _time_of(t: torch.Tensor | None) -> float:
    """A time tensor as a float (the first entry of a per-row time); NaN for ``None``."""
    if t is None:
        return math.nan
    return float(t.detach().reshape(-1)[0]) if t.numel() else math.nan


def _short(tol: float | torch.Tensor) -> str:
    if isinstance(tol, torch.Tensor):
        return f"per-sample in [{float(tol.min()):.3g}, {float(tol.max()):.3g}]"
    return f"{tol:.3g}"
