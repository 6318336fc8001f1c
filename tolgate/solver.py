"""GatedSolver: asks a policy for the tolerance, runs torchdiffeq, and fills a SolveRecord.

Where NFEs are counted: :class:`_CountingField`, which wraps the user's vector field. It counts
every call (forward solve, and the adjoint solve when autograd's backward runs it), receives
torchdiffeq's step callbacks (accepted and rejected steps), and for direct backpropagation
registers a gradient hook on each evaluation's output, so a VJP through that evaluation is
counted when autograd actually runs it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchdiffeq
from torch import nn

from .checks import check_times
from .errors import NonFiniteStateError, SolveError, StepBudgetExceeded, StepSizeUnderflow
from .persample import solve_per_sample
from .policies import FixedTolerance, Progress, ToleranceChoice, TolerancePolicy, validate_tolerance
from .records import SolveRecord, SolveStatus
from .scopes import announce, override_for

State = torch.Tensor | tuple[torch.Tensor, ...]
VectorField = Callable[[torch.Tensor, State], State]

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


class _CountingField:
    """The user's vector field, plus the counters torchdiffeq's callbacks and autograd feed.

    The field itself is called unchanged, so outputs are bitwise those of a raw odeint call. A
    plain object with slots, not an ``nn.Module``: it is called once per evaluation, and module
    call and attribute machinery there cost more than the counting itself.
    """

    __slots__ = ("func", "record", "in_backward", "last_t", "last_dt", "last_output")

    def __init__(self, func: VectorField, record: SolveRecord) -> None:
        self.func = func
        self.record = record
        self.in_backward = False
        self.last_t: torch.Tensor | None = None
        self.last_dt: torch.Tensor | None = None
        self.last_output: State | None = None

    def __call__(self, t: torch.Tensor, y: State, *per_sample: torch.Tensor) -> State:
        if self.in_backward:
            self.record.nfe_backward += 1
        else:
            self.record.nfe_forward += 1
        out = self.func(t, y, *per_sample)  # per_sample: the row indices, for the per-sample backend
        self.last_output = out
        if not self.in_backward and torch.is_grad_enabled():
            self._count_vjp_when_backpropagated(out)
        return out

    def _count_vjp_when_backpropagated(self, out: State) -> None:
        tensors = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if not tensors:
            return
        fired = [False]  # one count per evaluation, whichever of its outputs receives a gradient first

        def hook(grad: torch.Tensor) -> None:
            if not fired[0]:
                fired[0] = True
                self.record.nfe_backward += 1

        for tensor in tensors:
            tensor.register_hook(hook)

    def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        # References only (no sync); read when a solve fails.
        self.last_t, self.last_dt = t0, dt

    def callback_accept_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.record.n_steps_accepted += 1

    def callback_reject_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.record.n_steps_rejected += 1

    def callback_step_adjoint(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.record.n_steps_backward += 1


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
        if max_num_steps is not None and max_num_steps < 1:
            raise ValueError(f"max_num_steps must be >= 1, got {max_num_steps!r}")
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
        check_times(t)
        _check_state(y0, t)
        if context is None:
            context = y0[0] if isinstance(y0, tuple) else y0
        choice = self.choose_tolerance(context)
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
        if self.backend == "tolgate":
            return self._solve_per_sample(field, y0, t, choice, record)
        rtol, atol = _per_element(choice.rtol, y0), _per_element(choice.atol, y0)
        try:
            if self.adjoint:
                ys = self._odeint_adjoint(field, y0, t, rtol, atol, adjoint_params)
            else:
                ys = torchdiffeq.odeint(field, y0, t, rtol=rtol, atol=atol, method=self.method, options=self.options)
        except AssertionError as exc:
            raise _translate_failure(exc, field, record, self.options) from exc
        field.in_backward = True  # any later call comes from the adjoint solve in autograd's backward
        record.status = SolveStatus.SUCCESS
        record.t_reached = float(t[-1])
        return ys

    def _solve_per_sample(
        self, field: _CountingField, y0: State, t: torch.Tensor, choice: ToleranceChoice, record: SolveRecord
    ) -> State:
        try:
            ys, stats = solve_per_sample(
                field,
                y0,
                t,
                rtol=choice.rtol,
                atol=choice.atol,
                method=self.method,
                max_num_steps=self.max_num_steps,
                on_failure="raise",
            )
        except SolveError as exc:
            record.status = _STATUS_OF_ERROR.get(type(exc), SolveStatus.NON_FINITE)
            exc.record = record
            raise
        field.in_backward = True
        record.nfe_per_sample = stats.nfe
        record.n_steps_accepted = int(stats.n_accepted.sum())
        record.n_steps_rejected = int(stats.n_rejected.sum())
        record.extra["rows_evaluated"] = int(stats.rows_evaluated)
        record.status = SolveStatus.SUCCESS
        record.t_reached = float(t[-1])
        return ys

    def _odeint_adjoint(self, field, y0, t, rtol, atol, adjoint_params):
        if adjoint_params is None:
            if not isinstance(field.func, nn.Module):
                raise TypeError(
                    "adjoint=True needs the field's parameters: pass adjoint_params=(tensors...) for a "
                    f"field that is not an nn.Module (got {type(field.func).__name__})"
                )
            adjoint_params = tuple(field.func.parameters())
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
            options=self.options,
            adjoint_rtol=adjoint_rtol,
            adjoint_atol=adjoint_atol,
            adjoint_options=self.adjoint_options,
            adjoint_params=adjoint_params,
        )

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
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteStateError(
                f"y0 (element {k}) contains NaN or inf at the initial time t={float(t[0]):.6g}; nothing was solved"
            )


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


def _translate_failure(
    exc: AssertionError, field: _CountingField, record: SolveRecord, options: dict[str, Any]
) -> SolveError:
    message = str(exc)
    t_reached = math.nan if field.last_t is None else float(field.last_t)
    record.t_reached = t_reached
    where = f"(solve with rtol={_short(record.rtol)}, {record.method}) at t={t_reached:.6g}"
    # A NaN/inf stage makes the error ratio NaN; torchdiffeq then replaces the NaN step size by
    # min_step (0 by default) and fails with "underflow in dt 0.0", so a zero step is a non-finite sign.
    nan_step = field.last_dt is not None and not bool(field.last_dt > 0)
    if nan_step or _last_output_non_finite(field.last_output) or "non-finite" in message:
        record.status = SolveStatus.NON_FINITE
        return NonFiniteStateError(f"the vector field produced NaN or inf {where}", record)
    if "max_num_steps" in message:
        record.status = SolveStatus.STEP_BUDGET_EXCEEDED
        budget = options.get("max_num_steps")
        return StepBudgetExceeded(f"step budget max_num_steps={budget} exceeded {where}", record)
    if "underflow" in message:
        record.status = SolveStatus.STEP_SIZE_UNDERFLOW
        return StepSizeUnderflow(f"step size underflow {where}: {message}", record)
    return SolveError(f"torchdiffeq failed {where}: {message}", record)


def _last_output_non_finite(output: State | None) -> bool:
    if output is None:
        return False
    tensors = output if isinstance(output, tuple) else (output,)
    return any(not bool(torch.isfinite(o).all()) for o in tensors)


def _short(tol: float | torch.Tensor) -> str:
    if isinstance(tol, torch.Tensor):
        return f"per-sample in [{float(tol.min()):.3g}, {float(tol.max()):.3g}]"
    return f"{tol:.3g}"
