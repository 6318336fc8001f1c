"""GatedSolver: asks a policy for the tolerance (or step size), runs a backend, and fills a SolveRecord.

How a solve flows: :meth:`GatedSolver.forward` checks ``t`` and ``y0``, asks the policy
(:mod:`tolgate.policies`) for a :class:`~tolgate.policies.ToleranceChoice`, lets the backend
(:mod:`tolgate.backends`) adapt the field and validate the call, and only then appends a
:class:`~tolgate.records.SolveRecord`; the backend's run counts every evaluation through a
:class:`~tolgate.counting.CountingField` and sets the record's status. What depends on
torchdiffeq's internals (callbacks, adjoint state, its failures) is in
:mod:`tolgate.torchdiffeq_backend`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .backends import BACKEND_NAMES, BACKENDS, PER_SAMPLE_METHODS, Backend, Run, SolveRequest, get_backend
from .checks import check_times, state_dtype_of
from .counting import attach_record, non_finite, time_of
from .errors import NonFiniteStateError, SolveError, StepBudgetExceeded, StepSizeUnderflow
from .policies import FixedTolerance, Progress, ToleranceChoice, TolerancePolicy, validate_tolerance
from .records import SolveRecord, SolveStatus
from .scopes import announce, override_for
from .torchdiffeq_backend import ADAPTIVE_METHODS, FIXED_GRID_METHODS, METHODS

__all__ = [
    "ADAPTIVE_METHODS",
    "BACKEND_NAMES",
    "BACKENDS",
    "FIXED_GRID_METHODS",
    "METHODS",
    "PER_SAMPLE_METHODS",
    "GatedSolver",
    "gated_solvers",
    "set_progress",
]

State = torch.Tensor | tuple[torch.Tensor, ...]
VectorField = Callable[..., State]

_STATUS_OF_ERROR = {
    StepBudgetExceeded: SolveStatus.STEP_BUDGET_EXCEEDED,
    StepSizeUnderflow: SolveStatus.STEP_SIZE_UNDERFLOW,
    NonFiniteStateError: SolveStatus.NON_FINITE,
}
# Section 4.2 of the paper: evaluate with a fixed tight tolerance, never the sampled one.
DEFAULT_EVAL_POLICY = FixedTolerance(1e-5)


class GatedSolver(nn.Module):
    """``torchdiffeq.odeint`` with the tolerance chosen by a policy and the cost of each solve recorded.

    ``solver(func, y0, t, context=None)`` takes the same ``func``, ``y0`` (tensor or tuple of
    tensors) and ``t`` (one time or more) as ``torchdiffeq.odeint`` and returns the same output
    (``(event_t, ys)`` with ``event_fn``). The user's step callbacks on ``func`` are called as
    torchdiffeq calls them. :func:`tolgate.odeint` is the same with torchdiffeq's signature. In training mode the
    tolerance comes from ``policy``; in eval mode from ``eval_policy`` (default fixed 1e-5, the
    paper's Section 4.2 protocol), or from ``policy.deterministic`` (a gate's mean) when
    ``eval_policy`` is ``None``. Under a fixed tolerance the output is bitwise identical to the raw
    ``odeint`` call with the same arguments.

    Args:
        policy: a :class:`~tolgate.policies.TolerancePolicy`; it reads ``context`` (detached, so
            the REINFORCE term cannot reach the network that produced the context).
        method: any method of the backend: torchdiffeq's adaptive ones (``dopri5``, ``bosh3``, ...),
            its fixed-grid ones (``euler``, ``rk4``, ``explicit_adams``, ...: the record then has
            ``rtol = atol = None``, and a policy may choose ``step_size`` instead, see
            :class:`~tolgate.policies.FixedStepSize`) and ``scipy_solver``.
        adjoint: solve the backward pass with ``odeint_adjoint``.
        options: torchdiffeq solver options.
        max_num_steps: step budget per output interval; exceeding it raises
            :class:`~tolgate.errors.StepBudgetExceeded`.
        adjoint_tolerance: ``(rtol, atol)`` for the adjoint solve; default the forward solve's.
        adjoint_method: the adjoint solve's method; default ``method``.
        eval_method: the method of solves in eval mode; default ``method``. RNODE's protocol,
            say: ``method="rk4"`` with a :class:`~tolgate.policies.FixedStepSize` policy for
            training, ``eval_method="dopri5"`` at the fixed ``eval_policy`` for evaluation.
        penalties: fill the solver-aware penalties ``record.local_error`` and
            ``record.stiffness`` (:mod:`tolgate.penalties`) on every adaptive solve, as tensors
            that backpropagate to the field's parameters (``loss + lam * record.local_error``).
            Needs ``adjoint=False``: the adjoint method's forward solve keeps no graph.
        adjoint_options: options of the adjoint solve, e.g. ``{"norm": "seminorm"}``.
        max_records: how many :class:`SolveRecord` to keep in ``records`` (oldest dropped);
            ``None`` keeps all.
        backend: a name in :data:`~tolgate.backends.BACKENDS` or a backend object
            (:mod:`tolgate.backends`): ``"torchdiffeq"`` (one step size for the batch) or
            ``"per_sample"`` (``"tolgate"``, deprecated): the native per-sample solver of
            :mod:`tolgate.persample`, where every sample has its own step size and tolerance (a
            ``(batch,)`` tolerance from a ``GaussianGate(reduction="none")`` is used as is) and the
            record carries ``nfe_per_sample``; methods dopri5, bosh3, tsit5; no adjoint. Either
            backend takes a torchdiffeq field ``func(t, y)`` or an index-aware field
            ``func(t, y, idx)`` marked with :func:`tolgate.persample.index_aware`. Per-sample:
            ``nfe_forward`` counts calls of the field (each on the rows still integrating);
            ``extra["rows_evaluated"]`` counts rows.

    Failures. The step budget, the step-size underflow test (with torchdiffeq: more than 32 steps in
    a row of at most 4 ulps of ``max(|t|, |t[-1] - t[0]|)``, or one that cannot move ``t``; 10 ulps
    of ``t`` per sample with ``"per_sample"``)
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
        adjoint_tolerance: tuple[Any, Any] | None = None,
        adjoint_options: dict[str, Any] | None = None,
        max_records: int | None = 16,
        backend: str | Backend = "torchdiffeq",
        adjoint_method: str | None = None,
        eval_method: str | None = None,
        penalties: bool = False,
    ) -> None:
        super().__init__()
        solver_backend = get_backend(backend)
        solver_backend.check(method, adjoint, adjoint_method)
        if eval_method is not None:
            solver_backend.check(eval_method, adjoint, adjoint_method)
        if penalties and adjoint:
            raise ValueError(
                "penalties=True needs adjoint=False: the adjoint method runs its forward solve without a "
                "graph, so record.local_error and record.stiffness could not be differentiated"
            )
        if not isinstance(policy, TolerancePolicy):
            raise TypeError(f"policy must be a TolerancePolicy, got {type(policy).__name__}")
        if eval_policy is not None and not isinstance(eval_policy, TolerancePolicy):
            raise TypeError(f"eval_policy must be a TolerancePolicy or None, got {type(eval_policy).__name__}")
        _check_adjoint_tolerance(adjoint_tolerance)
        options = dict(options or {})
        from_options = options.pop("max_num_steps", None)
        if max_num_steps is not None and from_options is not None and from_options != max_num_steps:
            raise ValueError(
                f"max_num_steps={max_num_steps!r} and options['max_num_steps']={from_options!r} disagree; give one"
            )
        self.policy = policy
        self.eval_policy = eval_policy
        self.backend = solver_backend
        self.method = method
        self.eval_method = eval_method
        self.penalties = penalties
        self.adjoint = adjoint
        self.adjoint_method = adjoint_method
        self.options = options
        self.max_num_steps = max_num_steps if max_num_steps is not None else from_options
        self.adjoint_tolerance = adjoint_tolerance
        self.adjoint_options = adjoint_options
        self.records: deque[SolveRecord] = deque(maxlen=max_records)
        self.progress = Progress()

    @property
    def max_num_steps(self) -> int | None:
        """The step budget of every solve (both backends, the adjoint's too unless its options set
        one); settable, ``None`` for no budget."""
        return self._max_num_steps

    @max_num_steps.setter
    def max_num_steps(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"max_num_steps must be an int >= 1 or None, got {value!r}")
        self._max_num_steps = value
        # torchdiffeq's backend reads the budget where torchdiffeq's own callers put it
        if value is None:
            self.options.pop("max_num_steps", None)
        else:
            self.options["max_num_steps"] = value

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
        choice.validate()
        return choice

    def forward(
        self,
        func: VectorField,
        y0: State,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        adjoint_params: tuple[torch.Tensor, ...] | None = None,
        event_fn: Callable[[torch.Tensor, State], torch.Tensor] | None = None,
    ) -> Any:
        """Solve ``dy/dt = func(t, y)`` from ``y0`` at the times ``t`` (1-D, strictly monotone, >= 1 time).

        ``y0``: tensor ``(batch, *state)`` or a tuple of such tensors (per-sample tolerances
        need the batch dimension first). ``context`` defaults to ``y0`` (its first tensor if a
        tuple). Returns ``(len(t), *y0.shape)`` (a tuple of such tensors for a tuple ``y0``);
        with ``event_fn`` (torchdiffeq backend; ``t`` of two times) ``(event_t, ys)`` as
        ``torchdiffeq.odeint`` returns them.
        """
        # Everything that can refuse the inputs runs before the record exists (see the class docstring).
        times = check_times(t, min_times=1)
        _check_state(y0, t)
        if context is None:
            context = y0[0] if isinstance(y0, tuple) else y0
        elif not isinstance(context, torch.Tensor) or not torch.is_floating_point(context):
            what = context.dtype if isinstance(context, torch.Tensor) else type(context).__name__
            raise TypeError(f"context (what the policy reads) must be a floating-point tensor, got {what}")
        choice = self.choose_tolerance(context)
        method = self._method_for(choice)
        request = SolveRequest(
            self,
            method,
            func,
            self.backend.adapt(func, y0),
            y0,
            t,
            times,
            choice,
            state_dtype_of(y0),
            None if adjoint_params is None else tuple(adjoint_params),
            event_fn,
        )
        run = self.backend.prepare(request)
        record = SolveRecord(
            method=method,
            adjoint=self.adjoint,
            rtol=run.rtol,
            atol=run.atol,
            step_size=run.step_size,
            grid_steps=choice.grid_steps,
            log10_tolerance=choice.log10_tolerance,
            log_prob=choice.log_prob,
        )
        self.records.append(record)
        announce(self, record)
        return _run_recorded(run, record)

    def _method_for(self, choice: ToleranceChoice) -> str:
        """The method of this call: the policy's choice (a ladder rung), else the solver's own for the mode."""
        if choice.method is not None:
            self.backend.check(choice.method, self.adjoint, self.adjoint_method)
            return choice.method
        return self.method if self.training or self.eval_method is None else self.eval_method

    def extra_repr(self) -> str:
        methods = self.method if self.eval_method is None else f"{self.method} (eval {self.eval_method})"
        return f"method={methods!r}, adjoint={self.adjoint}, backend={self.backend.name!r}"


def gated_solvers(module: nn.Module) -> Iterator[GatedSolver]:
    """Every GatedSolver inside ``module``, in registration order (one per CNF block, say)."""
    return (m for m in module.modules() if isinstance(m, GatedSolver))


def set_progress(module: nn.Module, step: int, epoch: float) -> None:
    """Tell every GatedSolver in ``module`` the training progress (for scheduled policies)."""
    progress = Progress(step=step, epoch=epoch)
    for solver in gated_solvers(module):
        solver.progress = progress


def _run_recorded(run: Run, record: SolveRecord) -> Any:
    """``run.run(record)``; on failure the record's status says how and the exception carries it."""
    try:
        return run.run(record)
    except SolveError as exc:
        if exc.record is None:  # raised by the per-sample step loop
            exc.record = record
        if record.status is SolveStatus.RUNNING:
            record.status = _STATUS_OF_ERROR.get(type(exc), SolveStatus.FAILED)
        raise
    except BaseException as exc:
        if record.status is SolveStatus.RUNNING:
            record.status = SolveStatus.FAILED if isinstance(exc, Exception) else SolveStatus.INTERRUPTED
            record.t_reached = time_of(None if run.field is None else run.field.last_t)
            attach_record(exc, record)
        raise


def _check_adjoint_tolerance(adjoint_tolerance: Any) -> None:
    """``None`` or a pair ``(rtol, atol)``: floats checked here, tensors or tuples by torchdiffeq."""
    if adjoint_tolerance is None:
        return
    if not isinstance(adjoint_tolerance, (tuple, list)) or len(adjoint_tolerance) != 2:
        raise TypeError(
            f"adjoint_tolerance must be a pair (rtol, atol) or None, got {adjoint_tolerance!r}; "
            "e.g. adjoint_tolerance=(1e-5, 1e-5)"
        )
    if not any(isinstance(v, (torch.Tensor, tuple)) for v in adjoint_tolerance):
        validate_tolerance(adjoint_tolerance[0], "adjoint rtol")
        validate_tolerance(adjoint_tolerance[1], "adjoint atol")


def _check_state(y0: State, t: torch.Tensor) -> None:
    tensors = y0 if isinstance(y0, tuple) else (y0,)
    if not tensors:
        raise ValueError("y0 is an empty tuple: a tuple state needs at least one tensor")
    for k, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"y0 must be a tensor or a tuple of tensors; element {k} is {type(tensor).__name__}")
        if not torch.is_floating_point(tensor):
            raise TypeError(f"y0 must be floating point; element {k} has dtype {tensor.dtype}")
        if tensor.numel() == 0:
            raise ValueError(f"y0 (element {k}) is empty, shape {tuple(tensor.shape)}: nothing to solve")
        if non_finite(tensor):
            raise NonFiniteStateError(
                f"y0 (element {k}) contains NaN or inf at the initial time t={float(t[0]):.6g}; nothing was solved"
            )
