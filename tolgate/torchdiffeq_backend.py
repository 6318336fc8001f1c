"""The torchdiffeq backend: every ``torchdiffeq.odeint``/``odeint_adjoint`` call, counted and checked.

The one module that knows torchdiffeq's internals: its solver table (the method lists below are
derived from ``torchdiffeq._impl.odeint.SOLVERS``, nowhere typed out), its step callbacks, the
layout of its adjoint state, and the ``assert`` failures it raises.

Where failures are detected: in :class:`TorchdiffeqField`, never by torchdiffeq's ``assert``
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
the error test) is caught by the check of the returned solution. Fixed-grid methods take the
steps of their grid, so only the budget and the state are checked there, not the step size.

The user's own callbacks (``callback_step``, ``callback_accept_step``, ``callback_reject_step``
and their ``_adjoint`` variants, set on ``func``) are called first, with the arguments
torchdiffeq would have given them, and only the callbacks torchdiffeq would have found on a raw
call plus the ones the counting needs are exposed, so torchdiffeq warns exactly when it would.

Cost per step: two host reads (t0, dt) and one reduction of the state with one sync; torchdiffeq
itself syncs several times per step.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torchdiffeq
from torch import nn
from torchdiffeq._impl.adjoint import find_parameters
from torchdiffeq._impl.fixed_adams import AdamsBashforth, AdamsBashforthMoulton
from torchdiffeq._impl.misc import _all_adjoint_callback_names, _all_callback_names
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

from .checks import LOW_PRECISION_DTYPES, check_rtol_for_dtype, control_dtype
from .counting import CountingField, check_solution, describe, non_finite, time_of
from .errors import AdjointParamsError, NonFiniteStateError, SolveError, StepBudgetExceeded, StepSizeUnderflow
from .penalties import StageTape
from .persample import takes_sample_index
from .records import SolveRecord, SolveStatus

if TYPE_CHECKING:
    from .backends import SolveRequest
    from .policies import ToleranceChoice

State = torch.Tensor | tuple[torch.Tensor, ...]
TorchdiffeqTolerance = float | torch.Tensor | tuple[torch.Tensor, ...]

# Bound at import: a user who replaces ``torchdiffeq.odeint`` by ``tolgate.odeint`` (the usual
# drop-in trick) must not make the backend call itself.
_TORCHDIFFEQ_ODEINT = torchdiffeq.odeint
_TORCHDIFFEQ_ODEINT_ADJOINT = torchdiffeq.odeint_adjoint

#: every method torchdiffeq offers, in its own order
METHODS = tuple(SOLVERS)
#: adaptive Runge-Kutta methods: the tolerance sets the step
ADAPTIVE_METHODS = tuple(m for m, cls in SOLVERS.items() if issubclass(cls, RKAdaptiveStepsizeODESolver))
#: fixed-grid methods: the grid of ``t`` or ``options["step_size"]`` sets the step
FIXED_GRID_METHODS = tuple(m for m, cls in SOLVERS.items() if issubclass(cls, FixedGridODESolver))
#: methods whose result depends on rtol/atol: the adaptive ones, the implicit Adams corrector
#: (its iteration stops at the tolerance) and scipy's solvers
TOLERANCE_METHODS = tuple(
    m
    for m, cls in SOLVERS.items()
    if m in ADAPTIVE_METHODS
    or (issubclass(cls, AdamsBashforthMoulton) and not issubclass(cls, AdamsBashforth))
    or not issubclass(cls, FixedGridODESolver)
)
#: a step at most this many machine epsilons of ``max(|t|, |t[-1] - t[0]|)`` is a small step ...
UNDERFLOW_ULPS = 4.0
#: ... and more than this many small steps in a row are an underflow (a solve that crosses a
#: discontinuity takes a few and recovers, as torchdiffeq's own tests do; a stuck one repeats them),
#: as is any step too small to move ``t`` at all (at most half an ulp of ``t``)
UNDERFLOW_PATIENCE = 32
_STATUS_OF_ERROR = {
    StepBudgetExceeded: SolveStatus.STEP_BUDGET_EXCEEDED,
    StepSizeUnderflow: SolveStatus.STEP_SIZE_UNDERFLOW,
    NonFiniteStateError: SolveStatus.NON_FINITE,
}


class _StepGuard:
    """Step budget and step-size test for one direction of a solve (forward, or adjoint).

    Works on *keys*: times multiplied by the direction of the forward solve, so that keys increase
    along the forward solve. The budget counts steps (accepted and rejected) per output interval,
    as torchdiffeq's ``max_num_steps`` does: a forward step from key ``k`` serves the interval
    ending at the first output key above ``k``; an adjoint step (which runs each interval
    backwards, from ``keys[i]`` down to ``keys[i-1]``) the interval whose end is the first output
    key at or above ``k``. ``smallest_scale`` 0 switches the step-size test off (fixed grids).
    """

    __slots__ = ("budget", "keys", "adjoint", "eps", "smallest_scale", "span", "interval", "steps", "small_steps")

    def __init__(self, budget: int | None, keys: list[float], eps: float, adjoint: bool, fixed_grid: bool) -> None:
        self.budget = budget
        self.keys = keys
        self.adjoint = adjoint
        self.eps = eps
        self.smallest_scale = 0.0 if fixed_grid else UNDERFLOW_ULPS * eps
        self.span = abs(keys[-1] - keys[0])
        self.interval = -1
        self.steps = 0
        self.small_steps = 0

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

    def stalled(self, key: float, dt: float) -> bool:
        """Count one small step ``dt`` from ``key``; whether the solve has stalled (see
        :data:`UNDERFLOW_PATIENCE`)."""
        self.small_steps += 1
        return self.small_steps > UNDERFLOW_PATIENCE or dt <= 0.5 * self.eps * abs(key)


class TorchdiffeqField(CountingField):
    """A :class:`CountingField` that also receives torchdiffeq's step callbacks, forwards them to
    the user's, and runs the step checks (see the module docstring).

    Never instantiated directly: :func:`_field_class` makes a subclass exposing exactly the
    callbacks a solve needs (torchdiffeq looks them up with ``getattr``).
    """

    __slots__ = ("user", "forward_guard", "adjoint_guard", "sign", "tape")

    def arm(self, times: list[float], eps: float, budgets: tuple[int | None, int | None], fixed_grid: bool) -> None:
        """Arm the step checks for a solve over the output ``times`` (user time).

        ``eps``: machine epsilon of the solver's time dtype; ``budgets``: steps per output interval
        of the forward and of the adjoint solve (``None``: unlimited).
        """
        self.sign = 1.0 if times[-1] >= times[0] else -1.0
        keys = [self.sign * time for time in times]
        self.forward_guard = _StepGuard(budgets[0], keys, eps, adjoint=False, fixed_grid=fixed_grid)
        self.adjoint_guard = _StepGuard(budgets[1], keys, eps, adjoint=True, fixed_grid=fixed_grid)

    def _on_step(self, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        # t0 in user time (torchdiffeq un-negates it for decreasing t); dt > 0 in solver time.
        self._forward_user("callback_step", t0, y0, dt)
        self.last_t, self.last_dt = t0, dt
        self._check_step(self.forward_guard, self.sign * _as_float(t0), y0, _as_float(dt))
        if self.tape is not None:
            self.tape.step_started()

    def _on_accept(self, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        self._forward_user("callback_accept_step", t0, y0, dt)
        self.record.n_steps_accepted += 1
        if self.tape is not None:
            self.tape.accepted(_as_float(dt))

    def _on_reject(self, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        self._forward_user("callback_reject_step", t0, y0, dt)
        self.record.n_steps_rejected += 1
        if self.tape is not None:
            self.tape.rejected()

    def _on_step_adjoint(self, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        # The adjoint solve reports t0 as a key already (the forward solve's increasing time), and
        # y0 as (t, y, adj_y, *adj_params): the parameter adjoints do not feed back into the
        # dynamics, so only the first three are tested.
        self._forward_user("callback_step_adjoint", t0, y0, dt)
        self._check_step(self.adjoint_guard, _as_float(t0), y0[:3], _as_float(dt))
        self.record.n_steps_backward += 1

    def _forward_user(self, name: str, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        callback = self.user.get(name)
        if callback is not None:
            callback(t0, y0, dt)

    def _check_step(self, guard: _StepGuard, key: float, y0: State, dt: float) -> None:
        """Raise the typed error if the step about to be taken from ``key`` must not be taken."""
        if guard.over_budget(key):
            raise self._failure(
                StepBudgetExceeded, f"step budget max_num_steps={guard.budget} exceeded", key, guard.adjoint
            )
        smallest = guard.smallest_step(key)
        if guard.smallest_scale and not dt > smallest:
            if dt == 0.0 or not math.isfinite(dt):
                # The last error ratio was NaN: torchdiffeq replaced the NaN step by min_step (0).
                raise self._non_finite(key, guard.adjoint)
            if non_finite(self.last_output):
                raise self._failure(NonFiniteStateError, "the vector field produced NaN or inf", key, guard.adjoint)
            if guard.stalled(key, dt):
                raise self._failure(
                    StepSizeUnderflow,
                    f"step size underflow: dt={dt:.3g} is below {smallest:.3g} ({UNDERFLOW_ULPS:g} ulps of the "
                    f"time) for {guard.small_steps} steps in a row, or too small to move t",
                    key,
                    guard.adjoint,
                )
        elif guard.small_steps:
            guard.small_steps = 0
        if non_finite(y0):
            field_output_bad = non_finite(self.last_output)
            what = "the vector field produced NaN or inf" if field_output_bad else "the state became NaN or inf"
            raise self._failure(NonFiniteStateError, what, key, guard.adjoint)

    def _non_finite(self, key: float, adjoint: bool) -> NonFiniteStateError:
        if non_finite(self.last_output):
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
        if adjoint:
            record.extra["failed_in"] = "adjoint"
            where = f"in the adjoint solve (autograd's backward, {describe(record)}) at t={time:.6g}"
        else:
            record.t_reached = time
            where = f"(solve with {describe(record)}) at t={time:.6g}"
        return error(f"{what} {where}", record)


def _as_float(value: torch.Tensor | float) -> float:
    # detach: torchdiffeq does not detach the first step size from the initial-step probe.
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _forward_only(name: str) -> Callable[[TorchdiffeqField, torch.Tensor, State, torch.Tensor], None]:
    def callback(self: TorchdiffeqField, t0: torch.Tensor, y0: State, dt: torch.Tensor) -> None:
        self._forward_user(name, t0, y0, dt)

    return callback


_CALLBACKS: dict[str, Callable[..., None]] = {
    "callback_step": TorchdiffeqField._on_step,
    "callback_accept_step": TorchdiffeqField._on_accept,
    "callback_reject_step": TorchdiffeqField._on_reject,
    "callback_step_adjoint": TorchdiffeqField._on_step_adjoint,
    "callback_accept_step_adjoint": _forward_only("callback_accept_step_adjoint"),
    "callback_reject_step_adjoint": _forward_only("callback_reject_step_adjoint"),
}


class _TapedField(TorchdiffeqField):
    """A :class:`TorchdiffeqField` that also hands every forward evaluation to its stage tape
    (``penalties=True``; a separate class so that other solves pay nothing per evaluation)."""

    __slots__ = ()

    def __call__(self, t: torch.Tensor, y: State, *per_sample: torch.Tensor) -> State:
        out = super().__call__(t, y, *per_sample)
        if not self.in_backward:
            self.tape.evaluated(y, out)
        return out


@functools.cache
def _field_class(names: frozenset[str], taped: bool) -> type[TorchdiffeqField]:
    """A :class:`TorchdiffeqField` subclass with exactly the callbacks ``names`` (one per set, cached)."""
    attributes: dict[str, Any] = {name: _CALLBACKS[name] for name in names}
    attributes["__slots__"] = ()
    return type("TorchdiffeqField", (_TapedField if taped else TorchdiffeqField,), attributes)


def step_callbacks(func: Callable[..., Any]) -> tuple[str, ...]:
    """The names of torchdiffeq's step callbacks (``callback_step``, ... and their ``_adjoint``
    variants) that ``func`` defines."""
    return tuple(name for name in _all_callback_names + _all_adjoint_callback_names if hasattr(func, name))


def _callback_names(func: Callable[..., Any], method: str, adjoint_method: str | None) -> frozenset[str]:
    """The callbacks to expose: those the counting needs where the method calls them, plus every
    one the user set (so torchdiffeq warns about an unsupported one just as on a raw call)."""
    user = set(step_callbacks(func))
    ours = set(SOLVERS[method].valid_callbacks())
    if adjoint_method is not None and "callback_step" in SOLVERS[adjoint_method].valid_callbacks():
        ours.add("callback_step_adjoint")
    return frozenset(user | ours)


@dataclass
class TorchdiffeqRun:
    """One validated torchdiffeq solve, ready to run (made by :meth:`TorchdiffeqBackend.prepare`).

    ``rtol``/``atol``/``step_size``: what the record reports (``None`` where they do not apply);
    ``kwargs``: the keyword arguments of the ``odeint``/``odeint_adjoint`` call.
    """

    request: SolveRequest
    rtol: Any
    atol: Any
    step_size: float | None
    kwargs: dict[str, Any]
    budgets: tuple[int | None, int | None]
    field: TorchdiffeqField | None = None

    def run(self, record: SolveRecord) -> Any:
        """Solve, filling ``record``; returns what torchdiffeq returns."""
        request = self.request
        settings = request.settings
        user_func = request.func
        adjoint_method = (settings.adjoint_method or request.method) if settings.adjoint else None
        names = _callback_names(user_func, request.method, adjoint_method)
        tape = self._tape()
        field = _field_class(names, tape is not None)(request.adapted_func, record, request.state_dtype)
        field.tape = tape
        field.user = {name: getattr(user_func, name) for name in names if hasattr(user_func, name)}
        self.field = field
        t = request.t
        if request.state_dtype in LOW_PRECISION_DTYPES and t.dtype in LOW_PRECISION_DTYPES:
            t = t.to(torch.float32)  # the solver's time in at least float32 (see checks)
        field.arm(request.times, torch.finfo(_time_dtype(t, request.y0)).eps, self.budgets, self.step_size_rules)
        odeint = _TORCHDIFFEQ_ODEINT_ADJOINT if settings.adjoint else _TORCHDIFFEQ_ODEINT
        try:
            out = odeint(field, request.y0, t, **self.kwargs)
        except AssertionError as exc:
            if record.status is not SolveStatus.RUNNING:  # the field's own assert: re-raised as it is
                raise
            raise _translate_failure(exc, field, record) from exc
        field.in_backward = True  # any later call comes from the adjoint solve in autograd's backward
        if request.event_fn is None:
            check_solution(out, request.times, field, record)
            record.t_reached = request.times[-1]
        else:
            event_t, ys = out
            times = [request.times[0], float(event_t.detach())]
            check_solution(tuple(y[-1:] for y in ys) if isinstance(ys, tuple) else ys[-1:], times[1:], field, record)
            record.t_reached = times[1]
        if field.tape is not None:
            record.local_error, record.stiffness = _penalty_totals(field.tape, request.y0)
        record.status = SolveStatus.SUCCESS
        return out

    def _tape(self) -> StageTape | None:
        """The stage tape of a solve with ``penalties=True`` and an adaptive method, else ``None``."""
        request = self.request
        if not request.settings.penalties or request.method not in ADAPTIVE_METHODS:
            return None
        tableau = SOLVERS[request.method].tableau
        sign = 1.0 if request.times[-1] >= request.times[0] else -1.0
        return StageTape(tableau.c_sol, tableau.c_error, request.choice.rtol, request.choice.atol, sign)

    @property
    def step_size_rules(self) -> bool:
        """Whether the grid, not the error control, sets the steps (no step-size test then)."""
        return self.request.method in FIXED_GRID_METHODS


class TorchdiffeqBackend:
    """``torchdiffeq.odeint`` / ``odeint_adjoint``: every method, adjoint, events, tuple states.

    One step size for the whole batch; per-sample tolerances become per-element tolerance tensors
    (the error of each sample is weighted by its own tolerance inside one norm).
    """

    name = "torchdiffeq"
    methods = METHODS

    def check(self, method: str, adjoint: bool, adjoint_method: str | None) -> None:
        """Raise ``ValueError`` unless torchdiffeq has ``method`` (and ``adjoint_method``)."""
        for label, value in (("method", method), ("adjoint_method", adjoint_method)):
            if value is not None and value not in METHODS:
                raise ValueError(f"{label} must be one of torchdiffeq's methods {METHODS}, got {value!r}")
        if adjoint_method is not None and not adjoint:
            raise ValueError(f"adjoint_method={adjoint_method!r} needs adjoint=True")

    def prepare(self, request: SolveRequest) -> TorchdiffeqRun:
        """Validate ``request`` (raises before anything is solved) and lay out torchdiffeq's arguments."""
        settings, choice = request.settings, request.choice
        method = request.method
        options = {k: v for k, v in settings.options.items() if k != "max_num_steps"}
        step_size = _grid(choice, method, options, request.times)
        uses_tolerance = method in TOLERANCE_METHODS or request.event_fn is not None
        rtol, atol = _tolerances(request, uses_tolerance)
        if settings.penalties and choice.per_element and method in ADAPTIVE_METHODS:
            raise ValueError(
                "penalties=True takes a float or per-sample (batch,) tolerance; the policy chose per-element "
                "tolerances, for which the penalties' error norm is not defined here"
            )
        kwargs: dict[str, Any] = {"rtol": rtol, "atol": atol, "method": method, "options": options or None}
        if request.event_fn is not None:
            kwargs["event_fn"] = request.event_fn
        budget = settings.options.get("max_num_steps")
        adjoint_budget = budget
        if settings.adjoint:
            adjoint_budget = _adjoint_kwargs(request, rtol, atol, kwargs)
        record_rtol = choice.rtol if uses_tolerance else None
        record_atol = choice.atol if uses_tolerance else None
        return TorchdiffeqRun(request, record_rtol, record_atol, step_size, kwargs, (budget, adjoint_budget))

    def adapt(self, func: Callable[..., State], y0: State) -> Callable[..., State]:
        """``func`` as torchdiffeq calls it, ``f(t, y)``: an index-aware field gets every row's index."""
        if not takes_sample_index(func):
            return func
        first = y0[0] if isinstance(y0, tuple) else y0
        idx = torch.arange(first.shape[0] if first.dim() else 1, device=first.device)

        def all_rows(t: torch.Tensor, y: State) -> State:
            return func(t, y, idx)

        return all_rows


def _penalty_totals(tape: StageTape, y0: State) -> tuple[torch.Tensor, torch.Tensor]:
    """The tape's sums, zeros (in the state's dtype) for a solve without accepted steps."""
    if tape.local_error is not None and tape.stiffness is not None:
        return tape.local_error, tape.stiffness
    first = y0[0] if isinstance(y0, tuple) else y0
    zero = first.new_zeros(())
    return zero, zero.clone()


def _time_dtype(t: torch.Tensor, y0: State) -> torch.dtype:
    time_dtype = t.dtype
    for tensor in y0 if isinstance(y0, tuple) else (y0,):
        time_dtype = torch.promote_types(time_dtype, tensor.dtype)
    return time_dtype


class UniformGrid:
    """torchdiffeq's ``grid_constructor`` for ``steps`` equal steps over ``[t[0], t[-1]]``.

    ``linspace`` rather than ``options["step_size"] = span / steps``: torchdiffeq builds that grid
    with ``ceil(span / step_size + 1)`` points, and the rounding of ``span / steps`` can add a
    sliver of a last step that costs a whole step's evaluations."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, func: Any, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.linspace(float(t[0]), float(t[-1]), self.steps + 1, dtype=t.dtype, device=t.device)


def _grid(choice: ToleranceChoice, method: str, options: dict[str, Any], times: list[float]) -> float | None:
    """The fixed-grid step size of the solve; a policy's ``step_size`` or ``grid_steps`` goes into ``options``."""
    chosen = choice.step_size if choice.grid_steps is None else f"grid_steps={choice.grid_steps}"
    if chosen is None:
        return options.get("step_size")
    if method not in FIXED_GRID_METHODS:
        raise ValueError(
            f"the policy chose {chosen if isinstance(chosen, str) else f'step_size={chosen:g}'}, which needs a "
            f"fixed-grid method {FIXED_GRID_METHODS}; method {method!r} chooses its own steps"
        )
    for option in ("grid_constructor", "step_size"):
        if option in options:
            raise ValueError(f"the policy chose the grid, but options has a {option} (mutually exclusive)")
    if choice.grid_steps is None:
        options["step_size"] = choice.step_size
        return choice.step_size
    options["grid_constructor"] = UniformGrid(choice.grid_steps)
    return abs(times[-1] - times[0]) / choice.grid_steps


def _tolerances(request: SolveRequest, uses_tolerance: bool) -> tuple[TorchdiffeqTolerance, TorchdiffeqTolerance]:
    """rtol, atol as torchdiffeq takes them (see :func:`_solver_tolerance`)."""
    choice = request.choice
    if choice.rtol is None or choice.atol is None:  # a step-size choice: torchdiffeq's defaults
        return 1e-7, 1e-9
    if choice.per_element or not uses_tolerance:
        return choice.rtol, choice.atol
    check_rtol_for_dtype(choice.rtol, request.state_dtype)
    if request.method == "scipy_solver" and isinstance(choice.rtol, torch.Tensor):
        raise ValueError("method 'scipy_solver' takes scalar tolerances; the policy chose per-sample tolerances")
    rtol = _solver_tolerance(choice.rtol, request.y0, request.state_dtype)
    atol = _solver_tolerance(choice.atol, request.y0, request.state_dtype)
    return rtol, atol


def _adjoint_kwargs(request: SolveRequest, rtol: Any, atol: Any, kwargs: dict[str, Any]) -> int | None:
    """Fill the adjoint keywords of ``odeint_adjoint`` into ``kwargs``; returns the adjoint step budget."""
    settings = request.settings
    adjoint_params = adjoint_parameters(request.func, request.adjoint_params)
    kwargs["adjoint_params"] = adjoint_params
    if settings.adjoint_method is not None:
        kwargs["adjoint_method"] = settings.adjoint_method
    if settings.adjoint_tolerance is not None:
        adjoint_rtol, adjoint_atol = settings.adjoint_tolerance
        if not isinstance(adjoint_rtol, tuple):
            check_rtol_for_dtype(adjoint_rtol, request.state_dtype, "adjoint rtol")
    elif request.choice.per_element:
        adjoint_rtol, adjoint_atol = rtol, atol  # torchdiffeq's default: the forward solve's, as given
    else:
        adjoint_rtol = _adjoint_tolerance(rtol, adjoint_params)
        adjoint_atol = _adjoint_tolerance(atol, adjoint_params)
    kwargs["adjoint_rtol"], kwargs["adjoint_atol"] = adjoint_rtol, adjoint_atol
    if settings.adjoint_options is None:  # torchdiffeq then derives the adjoint's options from options
        kwargs["adjoint_options"] = None
        return settings.options.get("max_num_steps")
    kwargs["adjoint_options"] = {k: v for k, v in settings.adjoint_options.items() if k != "max_num_steps"}
    return settings.adjoint_options.get("max_num_steps")


def adjoint_parameters(func: Callable[..., Any], adjoint_params: Any) -> tuple[torch.Tensor, ...]:
    """The parameters the adjoint solve differentiates: as given, or those of an ``nn.Module`` field
    (torchdiffeq's own search, which also finds them in a ``DataParallel`` replica)."""
    if adjoint_params is not None:
        return tuple(adjoint_params)
    if not isinstance(func, nn.Module):
        raise AdjointParamsError(
            "adjoint=True needs the field's parameters: pass adjoint_params=(tensors...) for a "
            f"field that is not an nn.Module (got {type(func).__name__}); adjoint_params=() if it has none"
        )
    return tuple(find_parameters(func))


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
        return _per_element(tol.to(control), y0)
    tensors = y0 if isinstance(y0, tuple) else (y0,)
    scalar = torch.tensor(tol, dtype=control, device=tensors[0].device)
    expanded = tuple(scalar.expand(tensor.shape) for tensor in tensors)
    return tuple(e.reshape(-1) for e in expanded) if isinstance(y0, tuple) else expanded[0]


def _per_element(tol: float | torch.Tensor, y0: State) -> TorchdiffeqTolerance:
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


def _adjoint_tolerance(tol: TorchdiffeqTolerance, adjoint_params: tuple[torch.Tensor, ...]) -> TorchdiffeqTolerance:
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


def _translate_failure(exc: AssertionError, field: CountingField, record: SolveRecord) -> SolveError:
    """The typed error for an ``assert`` torchdiffeq raised that the field's own checks did not
    pre-empt (a fallback: the step guard runs before torchdiffeq's asserts)."""
    message = str(exc)
    t_reached = time_of(field.last_t)
    record.t_reached = t_reached
    where = f"(solve with {describe(record)}) at t={t_reached:.6g}"
    # A NaN/inf stage makes the error ratio NaN; torchdiffeq then replaces the NaN step size by
    # min_step (0 by default) and fails with "underflow in dt 0.0", so a zero step is a non-finite sign.
    nan_step = field.last_dt is not None and not bool(field.last_dt > 0)
    if nan_step or non_finite(field.last_output) or "non-finite" in message:
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
