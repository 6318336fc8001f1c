"""The per-sample step loop: every row of the batch has its own time, step size and fate.

One loop serves every :class:`~tolgate.tableaux.ButcherTableau`. The rows still integrating form
the *active set*; the vector field only ever sees those rows, together with their original sample
indices ``idx``, and a row leaves the active set as soon as it reaches ``t[-1]`` or fails.

Step-size control, per row (the same rules as scipy's ``RK45``/``RK23``, so a sample solved here
takes the steps scipy would take):

* error norm: ``sqrt(mean over the row's state of (err / (atol + rtol * max(|y0|, |y1|)))^2)``,
  where ``err = h * sum_i b_error_i k_i``. The mean runs over this row only: an easy row cannot
  dilute a hard row's error, which is what couples samples in a batch-level solver.
* accept when the norm is below 1; the next step is
  ``h * clip(0.9 * norm^(-1/(q+1)), 0.2, 10)`` with ``q`` the embedded order, and after a
  rejection the accepted step may not grow (factor capped at 1).
* the step is clipped so that a row lands exactly on ``t[-1]``.
* initial step: Hairer, Norsett & Wanner, Sec. II.4 (two evaluations), per row.
* a row fails with step-size underflow when its next step is below 10 ulps of its time, and
  with a step budget when it has attempted ``max_num_steps`` steps. A step whose error is NaN or
  inf is rejected and shrinks the step by 0.2, which rescues an overflow caused by too large a
  step, and so is a 16-bit step whose new state overflowed; if the row underflows while its last
  attempt was still not finite, its status is ``NON_FINITE``, and so it is when it leaves with a
  state that is not finite.

Every failure is the loop's own test, none an ``assert``: budget, underflow and non-finite steps
are caught under ``python -O`` too, and no input can make the loop spin (each attempt either
advances a row, shrinks its step by at least ``MIN_FACTOR``, or ends it).

Precision: the error control (tolerance scale, scaled error, its mean square) runs in float32 for
a 16-bit state, and the solver's time in at least float32 (see :mod:`tolgate.checks`): in
float16 the scaled error overflows long before the error is large.

Step-size decisions are taken without gradient (``torch.no_grad``): the derivative of a solution
with respect to the step sizes is an artefact of the discretisation, not of the ODE. Everything
that builds a solution value is out-of-place (``torch.where``, ``index_select``, ``index_put``),
so the whole solve can be backpropagated through.

Solver-aware penalties (``integrate(..., penalties=True)``; :mod:`tolgate.penalties` defines them):
after the controller has decided, the accepted rows' terms are rebuilt *with* gradient from the
stage tensors that carry the graph, and summed per sample into ``(batch,)`` tensors in the
error-control dtype: ``local_error`` sums ``E h`` with ``E`` the controller's own error norm of
the step (the same function of the same stages, only differentiable), ``stiffness`` sums
``rho h`` with ``rho`` :func:`~tolgate.penalties.lipschitz_estimate` over the step's last two
stages. A rejected step adds nothing, neither value nor gradient (its stages, possibly not
finite, are never read), and a row that leaves keeps its sums. ``E`` is floored at the square
root of the dtype's smallest normal number, so a step with no error (a field that is constant
along it) has a finite gradient. Without penalties none of this runs.

Per step there is one host synchronisation: a two-flag ``tolist()`` that says whether any row
crossed an output time or left the active set (with penalties a second one, right after it: the
accepted rows' indices). The dense output of the steps that crossed output times is evaluated
once, after the loop.

The loop (:func:`integrate`) reads as its parts: :func:`_finite_start` and :func:`_first_rows`
set up the active set, :func:`_stages` attempts a step, :meth:`_Controller.decide` accepts or
rejects it, :func:`_advance` moves the rows, :func:`_retire` lets finished rows leave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import LOW_PRECISION_DTYPES, control_dtype
from .errors import NonFiniteStateError, SolveError, StepBudgetExceeded, StepSizeUnderflow
from .penalties import lipschitz_estimate
from .records import SolveStatus
from .sample_stats import PerSampleStats
from .tableaux import ButcherTableau

#: ``field(t: (active,), y: (active, *state), idx: (active,) int64) -> (active, *state)``
Field = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: squared scaled errors ``(active, *state)`` -> mean square per row ``(active,)``
MeanSquare = Callable[[torch.Tensor], torch.Tensor]

SAFETY = 0.9
MIN_FACTOR = 0.2
MAX_FACTOR = 10.0
INITIAL_STEP_EVALUATIONS = 2


def mean_square(scaled_sq: torch.Tensor) -> torch.Tensor:
    """The default norm: mean over each row's state, ``(active, *state) -> (active,)``."""
    return scaled_sq.reshape(scaled_sq.shape[0], -1).mean(1)


@dataclass
class _Rows:
    """Per-row solver state of the active set; every tensor's first dimension is ``active``."""

    idx: torch.Tensor  # original sample index (int64)
    y: torch.Tensor  # state at time t
    k0: torch.Tensor  # f(t, y), reused as the first stage (FSAL)
    t: torch.Tensor  # current time, in the integration direction
    h: torch.Tensor  # next step size to try (> 0)
    rtol: torch.Tensor  # (active, 1, ..., 1), error-control dtype
    atol: torch.Tensor  # (active, 1, ..., 1), error-control dtype
    attempts: torch.Tensor  # steps tried (int64)
    accepted: torch.Tensor  # steps accepted (int64)
    outputs_done: torch.Tensor  # output times already passed (int64); always < n_times while active
    next_output: torch.Tensor  # times[outputs_done]
    last_accepted: torch.Tensor  # the last attempt was accepted; after a rejection h may not grow (bool)

    def select(self, keep: torch.Tensor) -> _Rows:
        return _Rows(*(getattr(self, name).index_select(0, keep) for name in self.__dataclass_fields__))


@dataclass(frozen=True)
class _Problem:
    """What every part of the loop reads and none changes: the method, the times, the limits."""

    tableau: ButcherTableau
    norm: MeanSquare
    t: torch.Tensor  # (n_times,) the caller's output times, for messages
    times: torch.Tensor  # (n_times,) direction * t in the solver's time dtype: increasing
    t_start: float  # times[0]
    t_end: float  # times[-1]
    direction: float  # +1.0 forward in time, -1.0 backward
    max_num_steps: int | None
    raise_on_failure: bool
    broadcast: tuple[int, ...]  # (-1, 1, ..., 1): an (active,) tensor against (active, *state)

    @classmethod
    def create(
        cls,
        y0: torch.Tensor,
        t: torch.Tensor,
        tableau: ButcherTableau,
        norm: MeanSquare,
        max_num_steps: int | None,
        raise_on_failure: bool,
    ) -> _Problem:
        """The solver's time: ``t``'s dtype promoted with ``y0``'s, at least float32 (:mod:`tolgate.checks`)."""
        time_dtype = torch.promote_types(torch.promote_types(y0.dtype, t.dtype), control_dtype(y0.dtype))
        direction = 1.0 if bool(t[-1] > t[0]) else -1.0
        times = t.to(time_dtype) * direction
        broadcast = (-1,) + (1,) * (y0.dim() - 1)
        t_start, t_end = float(times[0]), float(times[-1])
        return cls(tableau, norm, t, times, t_start, t_end, direction, max_num_steps, raise_on_failure, broadcast)

    @property
    def time_dtype(self) -> torch.dtype:
        return self.times.dtype

    def failure(self, code: int, sample: int, t_reached: float) -> SolveError:
        """The typed exception of status ``code`` for ``sample``, which got to ``t_reached`` (user time)."""
        t = self.t
        where = f"sample {sample} at t={t_reached:.6g} (solving from t={float(t[0]):.6g} to {float(t[-1]):.6g})"
        if code == int(SolveStatus.STEP_BUDGET_EXCEEDED):
            return StepBudgetExceeded(f"step budget max_num_steps={self.max_num_steps} exceeded by {where}")
        if code == int(SolveStatus.STEP_SIZE_UNDERFLOW):
            return StepSizeUnderflow(f"step size fell below 10 ulps of t for {where}")
        return NonFiniteStateError(f"NaN or inf state (initial, or from the vector field) for {where}")


@dataclass
class _Crossing:
    """A step that passed output times: what its dense output needs, for each (row, time) pair."""

    time_index: torch.Tensor  # (pairs,) index into the output times
    sample: torch.Tensor  # (pairs,) original sample index
    t0: torch.Tensor  # (pairs,) start of the step
    h: torch.Tensor  # (pairs,) step size
    values: torch.Tensor  # (pairs, 2 + stages, *state): y0, y1, k_0 .. k_last


class _Results:
    """Full-batch outputs and statistics, filled in as rows cross output times or leave."""

    def __init__(self, y0: torch.Tensor, time_dtype: torch.dtype) -> None:
        batch, device = y0.shape[0], y0.device
        self.y0 = y0
        self.attempts = torch.zeros(batch, dtype=torch.int64, device=device)
        self.accepted = torch.zeros(batch, dtype=torch.int64, device=device)
        self.started = torch.zeros(batch, dtype=torch.bool, device=device)
        self.status = torch.full((batch,), int(SolveStatus.SUCCESS), dtype=torch.int64, device=device)
        self.t_reached = torch.zeros(batch, dtype=time_dtype, device=device)
        self.crossings: list[_Crossing] = []

    def finish(self, rows: _Rows, which: torch.Tensor, codes: torch.Tensor) -> None:
        sample = rows.idx[which]
        self.attempts[sample] = rows.attempts[which]
        self.accepted[sample] = rows.accepted[which]
        self.status[sample] = codes
        self.t_reached[sample] = rows.t[which]

    def solution(self, times: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``(n_times, batch, *state)``; times a failed sample never reached are NaN.

        Interpolates every recorded crossing at once:
        ``y(t0 + theta h) = y0 + h * sum_i k_i * sum_p dense[i, p] theta^(p+1)``.
        """
        y0 = self.y0
        batch = y0.shape[0]
        blank = torch.full((times.shape[0], *y0.shape), float("nan"), dtype=y0.dtype, device=y0.device)
        at_start = torch.zeros(batch, dtype=torch.int64, device=y0.device)
        ys = blank.index_put((at_start, torch.arange(batch, device=y0.device)), y0)
        if not self.crossings:
            return ys
        time_index, sample, t0, h, values = (
            torch.cat([getattr(c, name) for c in self.crossings]) for name in _Crossing.__dataclass_fields__
        )
        theta = (times[time_index] - t0) / h
        exponents = torch.arange(1, dense.shape[1] + 1, dtype=theta.dtype, device=theta.device)
        weights = ((theta.unsqueeze(1) ** exponents) @ dense.T).to(y0.dtype)  # (pairs, stages)
        broadcast = (-1,) + (1,) * (y0.dim() - 1)
        increment = (weights.view(*weights.shape, *broadcast[1:]) * values[:, 2:]).sum(1)
        interpolated = torch.addcmul(values[:, 0], h.to(y0.dtype).view(broadcast), increment)
        # At theta = 1 use the step's own y1, so the value at t[-1] is the integrator's state exactly.
        interpolated = torch.where((theta == 1).view(broadcast), values[:, 1], interpolated)
        return ys.index_put((time_index, sample), interpolated)

    def stats(self, tableau: ButcherTableau, direction: float) -> PerSampleStats:
        nfe = self.started * INITIAL_STEP_EVALUATIONS + (tableau.stages - 1) * self.attempts
        return PerSampleStats(
            method=tableau.name,
            nfe=nfe,
            n_accepted=self.accepted,
            n_rejected=self.attempts - self.accepted,
            status=self.status,
            t_reached=self.t_reached * direction,
        )


def _combine(weights: tuple[float, ...], ks: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i weights_i * ks_i``, skipping zero weights (one kernel per term)."""
    terms = [(w, k) for w, k in zip(weights, ks, strict=False) if w != 0.0]
    total = terms[0][1] * terms[0][0]
    for w, k in terms[1:]:
        total = total.add(k, alpha=w)
    return total


def _initial_step(
    field: Field,
    rows: _Rows,
    interval: float,
    embedded_order: int,
    norm: MeanSquare,
    broadcast: tuple[int, ...],
) -> torch.Tensor:
    """Hairer, Norsett & Wanner (Solving ODEs I, Sec. II.4), row by row, as scipy's
    ``select_initial_step``: ``(active,)`` first step sizes. One evaluation (``f0`` is ``rows.k0``;
    ``rows.h`` is not read)."""
    with torch.no_grad():
        y, f0 = rows.y, rows.k0
        scale = torch.addcmul(rows.atol, rows.rtol, y.abs().to(rows.rtol.dtype))  # error-control dtype
        d0 = norm((y / scale).square()).sqrt()
        d1 = norm((f0 / scale).square()).sqrt()
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1).clamp(max=interval)
        y1 = torch.addcmul(y, h0.to(y.dtype).view(broadcast), f0)
        f1 = field(rows.t + h0.to(rows.t.dtype), y1, rows.idx)
        d2 = norm(((f1 - f0) / scale).square()).sqrt() / h0
        flat = (d1 <= 1e-15) & (d2 <= 1e-15)
        h1 = torch.where(
            flat,
            torch.clamp(h0 * 1e-3, min=1e-6),
            (0.01 / torch.maximum(d1, d2)) ** (1.0 / (embedded_order + 1)),
        )
        return torch.minimum(100 * h0, h1).clamp(max=interval).to(rows.t.dtype)


@dataclass(frozen=True)
class PerSamplePenalties:
    """The solver-aware penalties of one per-sample solve (:mod:`tolgate.penalties`), per sample.

    ``local_error``: ``(batch,)`` sum of ``E h`` over each sample's accepted steps; ``stiffness``:
    ``(batch,)`` sum of ``rho h``. Error-control dtype, in the graph of the solve; 0 for a sample
    that took no step.
    """

    local_error: torch.Tensor
    stiffness: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, dtype: torch.dtype, device: torch.device) -> PerSamplePenalties:
        """The penalties of a solve that took no step: zeros ``(batch,)``."""
        zeros = torch.zeros(batch, dtype=dtype, device=device)
        return cls(zeros, zeros.clone())


@dataclass(frozen=True)
class _Step:
    """One attempted step of every active row, built with gradient; tensors ``(active, ...)``."""

    t1: torch.Tensor  # (active,) end of the step, clipped to t_end
    h: torch.Tensor  # (active,) t1 - t, the step actually taken (> 0)
    h_state: torch.Tensor  # h as (active, 1, ..., 1) in the state's dtype
    ks: list[torch.Tensor]  # the stage derivatives k_0 .. k_last, each (active, *state)
    y_penultimate: torch.Tensor  # (active, *state) input of the last-but-one stage
    y1: torch.Tensor  # (active, *state) input of the last stage: the new state (FSAL)


def _stages(field: Field, rows: _Rows, tableau: ButcherTableau, t_end: float, broadcast: tuple[int, ...]) -> _Step:
    """One attempted step for every active row.

    The step is clipped to land exactly on ``t_end``. FSAL: the last stage is evaluated at
    ``(t1, y1)`` with ``y1`` the stage input.
    """
    t1 = torch.clamp(rows.t + rows.h, max=t_end)
    h = t1 - rows.t
    h_state = (h if h.dtype == rows.y.dtype else h.to(rows.y.dtype)).view(broadcast)
    ks = [rows.k0]
    y_previous, y_stage = rows.y, rows.y
    for a_row, c in zip(tableau.a[1:], tableau.c[1:], strict=True):
        y_previous, y_stage = y_stage, torch.addcmul(rows.y, h_state, _combine(a_row, ks))
        t_stage = t1 if c == 1.0 else torch.add(rows.t, h, alpha=c)
        ks.append(field(t_stage, y_stage, rows.idx))
    return _Step(t1, h, h_state, ks, y_previous, y_stage)


def _error_mean_square(
    norm: MeanSquare, error: torch.Tensor, magnitude: torch.Tensor, rtol: torch.Tensor, atol: torch.Tensor
) -> torch.Tensor:
    """The controller's squared error norm, ``(rows,)`` in the error-control dtype:
    ``norm((error / (atol + rtol * magnitude))^2)``, ``magnitude = max(|y0|, |y1|)`` ``(rows, *state)``."""
    scale = torch.addcmul(atol, rtol, magnitude.to(rtol.dtype))  # error-control dtype
    return norm((error / scale).square())


@dataclass(frozen=True)
class _Decision:
    """The controller's verdict on a step, per active row (no gradient)."""

    error_sq: torch.Tensor  # (active,) mean square scaled error in the time dtype; inf if not finite
    accept: torch.Tensor  # (active,) bool
    h_next: torch.Tensor  # (active,) the next step size to try
    t_next: torch.Tensor  # (active,) t1 where accepted, else t
    attempts: torch.Tensor  # (active,) int64, steps tried including this one
    done: torch.Tensor  # (active,) bool: accepted and at t_end
    underflow: torch.Tensor  # (active,) bool: the next step is below 10 ulps of t (or NaN)
    finished: torch.Tensor  # (active,) bool: done, underflow or out of budget
    any_crossed: bool  # some row passed an output time
    any_finished: bool  # some row leaves the active set


@dataclass(frozen=True)
class _Controller:
    """The step-size rules of the module docstring for one solve; constants in the time dtype."""

    norm: MeanSquare
    b_error: tuple[float, ...]
    exponent: float  # on the mean square: norm^(-1/(q+1))
    t_end: float
    max_num_steps: int | None
    reject_overflow: bool
    max_growth: torch.Tensor
    no_growth: torch.Tensor
    min_factor: torch.Tensor
    infinity: torch.Tensor

    @classmethod
    def create(cls, problem: _Problem, state_dtype: torch.dtype, device: torch.device) -> _Controller:
        """The controller of ``problem`` for a state of ``state_dtype`` on ``device``."""

        def constant(value: float) -> torch.Tensor:
            return torch.tensor(value, dtype=problem.time_dtype, device=device)

        tableau = problem.tableau
        return cls(
            norm=problem.norm,
            b_error=tableau.b_error,
            exponent=-0.5 / (tableau.embedded_order + 1),
            t_end=problem.t_end,
            max_num_steps=problem.max_num_steps,
            # float16 overflows at 65504, within reach of a large step: reject such steps (a smaller
            # one may not overflow). Wider dtypes only overflow in a blow-up, and that fails anyway;
            # the test at exit (_retire) keeps an overflowed last step from passing as a success.
            reject_overflow=state_dtype in LOW_PRECISION_DTYPES,
            max_growth=constant(MAX_FACTOR),
            no_growth=constant(1.0),
            min_factor=constant(MIN_FACTOR),
            infinity=constant(float("inf")),
        )

    def decide(self, rows: _Rows, step: _Step) -> _Decision:
        """Accept or reject every row's step and choose its next step size, without gradient."""
        with torch.no_grad():
            error_sq = self._error_sq(rows, step)
            accept = error_sq < 1.0
            max_factor = torch.where(rows.last_accepted, self.max_growth, self.no_growth)
            h_next = step.h * torch.clamp(SAFETY * error_sq**self.exponent, min=self.min_factor, max=max_factor)
            t_next = torch.where(accept, step.t1, rows.t)
            attempts = rows.attempts + 1
            done = accept & (step.t1 == self.t_end)
            # The comparison is False for a NaN step, so a NaN step size also counts as underflow.
            underflow = ~(h_next >= 10 * (torch.nextafter(t_next, self.infinity) - t_next))
            finished = done | underflow
            if self.max_num_steps is not None:
                finished = finished | (attempts >= self.max_num_steps)
            crossed = t_next >= rows.next_output
            any_crossed, any_finished = torch.stack((crossed, finished)).any(1).tolist()
        return _Decision(
            error_sq, accept, h_next, t_next, attempts, done, underflow, finished, any_crossed, any_finished
        )

    def _error_sq(self, rows: _Rows, step: _Step) -> torch.Tensor:
        """The mean square scaled error of every row's step, ``(active,)`` in the time dtype."""
        error = _combine(self.b_error, step.ks) * step.h_state
        magnitude = torch.maximum(rows.y.abs(), step.y1.abs())
        error_sq = _error_mean_square(self.norm, error, magnitude, rows.rtol, rows.atol)
        # NaN -> inf: a non-finite step is rejected and shrinks h by MIN_FACTOR.
        time_dtype = self.infinity.dtype
        error_sq = torch.nan_to_num(
            error_sq if time_dtype == error_sq.dtype else error_sq.to(time_dtype), nan=float("inf")
        )
        if self.reject_overflow:
            # An overflowed state has the error scale atol + rtol |y1| = inf, so its scaled error
            # is 0 and the step would pass: reject it (the row maximum of the magnitude is NaN
            # or inf exactly then; amax propagates NaN).
            finite_state = torch.isfinite(magnitude.reshape(magnitude.shape[0], -1).amax(1))
            error_sq = torch.where(finite_state, error_sq, self.infinity)
        return error_sq


class _PenaltySums:
    """Per-sample running sums of the penalties (module docstring), ``(batch,)`` in ``dtype``."""

    def __init__(
        self, tableau: ButcherTableau, norm: MeanSquare, batch: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.b_error = tableau.b_error
        self.norm = norm
        self.local_error = torch.zeros(batch, dtype=dtype, device=device)
        self.stiffness = torch.zeros(batch, dtype=dtype, device=device)

    def add(self, rows: _Rows, step: _Step, accept: torch.Tensor) -> None:
        """Add the terms of the accepted rows of ``step``, with gradient (``accept``: ``(active,)``)."""
        kept = torch.nonzero(accept).squeeze(1)
        if kept.shape[0] == 0:
            return
        ks = [k.index_select(0, kept) for k in step.ks]
        y0, y1 = rows.y.index_select(0, kept), step.y1.index_select(0, kept)
        error = _combine(self.b_error, ks) * step.h_state.index_select(0, kept)
        magnitude = torch.maximum(y0.abs(), y1.abs())
        rtol, atol = rows.rtol.index_select(0, kept), rows.atol.index_select(0, kept)
        mean_sq = _error_mean_square(self.norm, error, magnitude, rtol, atol)
        dtype = self.local_error.dtype
        # The floor keeps sqrt's derivative finite at an error of exactly 0.
        error_norm = mean_sq.clamp_min(torch.finfo(dtype).tiny).sqrt()
        y_a = step.y_penultimate.index_select(0, kept).to(dtype)
        rho = lipschitz_estimate(y_a, ks[-2].to(dtype), y1.to(dtype), ks[-1].to(dtype), per_row=True)
        h = step.h.index_select(0, kept).to(dtype)
        sample = rows.idx.index_select(0, kept)
        self.local_error = self.local_error.index_add(0, sample, error_norm * h)
        self.stiffness = self.stiffness.index_add(0, sample, rho * h)

    def totals(self) -> PerSamplePenalties:
        """The sums so far."""
        return PerSamplePenalties(self.local_error, self.stiffness)


def _crossing(
    rows: _Rows, t_next: torch.Tensor, h: torch.Tensor, times: torch.Tensor, y1: torch.Tensor, ks: list
) -> tuple[_Crossing, torch.Tensor]:
    """The (row, output time) pairs the step just taken passed; and each row's new outputs_done."""
    outputs_now = torch.searchsorted(times, t_next, right=True)
    time_indices = torch.arange(times.shape[0], device=times.device)
    passed = (time_indices >= rows.outputs_done.unsqueeze(1)) & (time_indices < outputs_now.unsqueeze(1))
    which, time_index = torch.nonzero(passed).unbind(1)
    values = torch.stack([rows.y, y1, *ks], 1).index_select(0, which)
    crossing = _Crossing(time_index, rows.idx[which], rows.t[which], h[which], values)
    return crossing, outputs_now


def _in_solver_time(field: Field, direction: float, time_dtype: torch.dtype, state_dtype: torch.dtype) -> Field:
    """The field as the loop sees it: time runs forward (``tau = direction * t``), and the user's
    field gets ``t`` in the state's dtype (as torchdiffeq does) while the loop keeps its own time
    in the promoted dtype."""
    if direction > 0 and time_dtype == state_dtype:
        return field

    def oriented(tau: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = field((tau * direction).to(state_dtype), y, idx)
        return out if direction > 0 else -out

    return oriented


def _status_codes(done: torch.Tensor, underflow: torch.Tensor, error_sq: torch.Tensor) -> torch.Tensor:
    """Why each row stopped: it reached the end; its step underflowed while its last attempt was
    finite, or not finite; otherwise (neither) its step budget ran out."""
    failure = torch.where(
        underflow,
        torch.where(torch.isinf(error_sq), int(SolveStatus.NON_FINITE), int(SolveStatus.STEP_SIZE_UNDERFLOW)),
        int(SolveStatus.STEP_BUDGET_EXCEEDED),
    )
    return torch.where(done, int(SolveStatus.SUCCESS), failure)


def _finite_start(y0: torch.Tensor, problem: _Problem, results: _Results) -> torch.Tensor:
    """The rows that start, ``(started,)`` int64: those whose ``y0`` is finite. The others are
    recorded as ``NON_FINITE`` at the first time, or raise under ``raise_on_failure``."""
    batch = y0.shape[0]
    finite = torch.isfinite(y0.reshape(batch, -1)).all(1)
    start = torch.nonzero(finite).squeeze(1)
    if start.shape[0] < batch:
        if problem.raise_on_failure:
            first_bad = int(torch.nonzero(~finite)[0])
            raise problem.failure(int(SolveStatus.NON_FINITE), first_bad, problem.direction * problem.t_start)
        results.status[~finite] = int(SolveStatus.NON_FINITE)
        results.t_reached[~finite] = problem.t_start
    results.started[start] = True
    return start


def _first_rows(
    field: Field,
    y0: torch.Tensor,
    start: torch.Tensor,
    rtol: torch.Tensor,
    atol: torch.Tensor,
    problem: _Problem,
) -> _Rows:
    """The active set at the first time, rows ``start`` ``(active,)`` of ``y0`` ``(batch, *state)``:
    ``f(t0, y0)`` evaluated and the initial step chosen (two evaluations)."""
    y = y0.index_select(0, start)
    active, device, broadcast = start.shape[0], y0.device, problem.broadcast
    zeros = torch.zeros(active, dtype=torch.int64, device=device)
    t_now = torch.full((active,), problem.t_start, dtype=problem.time_dtype, device=device)
    k0 = field(t_now, y, start)
    if k0.shape != y.shape:
        raise ValueError(f"the vector field returned shape {tuple(k0.shape)} for a state of shape {tuple(y.shape)}")
    rows = _Rows(
        idx=start,
        y=y,
        k0=k0,
        t=t_now,
        h=t_now,  # placeholder, replaced just below
        rtol=rtol.index_select(0, start).view(broadcast),
        atol=atol.index_select(0, start).view(broadcast),
        attempts=zeros,
        accepted=zeros,
        outputs_done=torch.ones_like(zeros),
        next_output=torch.full_like(t_now, float(problem.times[1])),
        last_accepted=torch.ones(active, dtype=torch.bool, device=device),
    )
    interval = problem.t_end - problem.t_start
    rows.h = _initial_step(field, rows, interval, problem.tableau.embedded_order, problem.norm, broadcast)
    return rows


def _advance(rows: _Rows, step: _Step, decision: _Decision, problem: _Problem, results: _Results) -> _Rows:
    """The active set after ``step``: accepted rows move to ``t1``, every row takes its next step
    size, and the output times the step passed are recorded for the dense output."""
    outputs_done, next_output = rows.outputs_done, rows.next_output
    if decision.any_crossed:  # with gradient: the crossing holds the stages the dense output needs
        crossing, outputs_done = _crossing(rows, decision.t_next, step.h, problem.times, step.y1, step.ks)
        results.crossings.append(crossing)
        next_output = problem.times[outputs_done.clamp(max=problem.times.shape[0] - 1)]
    accept = decision.accept
    accept_state = accept.view(problem.broadcast)
    return _Rows(
        idx=rows.idx,
        y=torch.where(accept_state, step.y1, rows.y),
        k0=torch.where(accept_state, step.ks[-1], rows.k0),
        t=decision.t_next,
        h=decision.h_next,
        rtol=rows.rtol,
        atol=rows.atol,
        attempts=decision.attempts,
        accepted=rows.accepted + accept,
        outputs_done=outputs_done,
        next_output=next_output,
        last_accepted=accept,
    )


def _retire(rows: _Rows, decision: _Decision, problem: _Problem, results: _Results) -> _Rows | None:
    """Record the rows that finished with this step and drop them from the active set (``rows``:
    already advanced); ``None`` when no row is left. Raises the failing sample's exception under
    ``raise_on_failure``."""
    leaving = torch.nonzero(decision.finished).squeeze(1)
    codes = _status_codes(decision.done, decision.underflow, decision.error_sq).index_select(0, leaving)
    final = rows.y.index_select(0, leaving).detach().abs().reshape(leaving.shape[0], -1).amax(1)
    codes = torch.where(torch.isfinite(final), codes, int(SolveStatus.NON_FINITE))
    if problem.raise_on_failure:
        _raise_first_failure(rows, leaving, codes, problem)
    results.finish(rows, leaving, codes)
    if leaving.shape[0] == rows.idx.shape[0]:
        return None
    return rows.select(torch.nonzero(~decision.finished).squeeze(1))


def _raise_first_failure(rows: _Rows, leaving: torch.Tensor, codes: torch.Tensor, problem: _Problem) -> None:
    """Raise for the lowest sample index among the ``leaving`` rows whose ``codes`` are failures."""
    failed = codes != int(SolveStatus.SUCCESS)
    if not bool(failed.any()):
        return
    bad = torch.nonzero(failed).squeeze(1)  # positions in `leaving`
    pos = int(bad[torch.argmin(rows.idx[leaving[bad]])])  # the lowest sample index
    row = int(leaving[pos])
    raise problem.failure(int(codes[pos]), int(rows.idx[row]), problem.direction * float(rows.t[row]))


def _step_until_done(
    field: Field, rows: _Rows, problem: _Problem, results: _Results, penalties: _PenaltySums | None
) -> None:
    """Step the active set until every row has left it, recording into ``results`` (and ``penalties``)."""
    controller = _Controller.create(problem, rows.y.dtype, rows.y.device)
    while True:
        step = _stages(field, rows, problem.tableau, problem.t_end, problem.broadcast)
        decision = controller.decide(rows, step)
        if penalties is not None:
            penalties.add(rows, step, decision.accept)
        rows = _advance(rows, step, decision, problem, results)
        if decision.any_finished:
            remaining = _retire(rows, decision, problem, results)
            if remaining is None:
                return
            rows = remaining


def integrate(
    field: Field,
    y0: torch.Tensor,
    t: torch.Tensor,
    rtol: torch.Tensor,
    atol: torch.Tensor,
    tableau: ButcherTableau,
    max_num_steps: int | None,
    raise_on_failure: bool,
    norm: MeanSquare = mean_square,
    penalties: bool = False,
) -> tuple[torch.Tensor, PerSampleStats, PerSamplePenalties | None]:
    """Solve every row of ``y0`` over the output times ``t`` with its own steps.

    Args:
        field: the vector field, see :data:`Field`.
        y0: ``(batch, *state)``.
        t: ``(n_times >= 2,)`` strictly monotone output times (validated by the caller); its
            dtype, promoted with ``y0``'s (and at least float32), is the dtype of the solver's time.
        rtol, atol: ``(batch,)`` positive finite tolerances in the error-control dtype
            (:func:`tolgate.checks.control_dtype` of ``y0``'s dtype).
        tableau: the method.
        max_num_steps: attempted steps allowed per sample, or ``None`` for no budget.
        raise_on_failure: raise the failing sample's typed exception at once (the lowest index
            among those failing on the same step) instead of recording its status.
        norm: mean of squared scaled errors per row (the default averages over the row's state).
        penalties: also sum the solver-aware penalties per sample (module docstring).

    Returns:
        ``ys`` ``(n_times, batch, *state)`` (NaN where a failed sample never got), the stats, and
        with ``penalties`` the :class:`PerSamplePenalties` (``(batch,)`` each), else ``None``.
    """
    problem = _Problem.create(y0, t, tableau, norm, max_num_steps, raise_on_failure)
    results = _Results(y0, problem.time_dtype)
    sums = _PenaltySums(tableau, norm, y0.shape[0], rtol.dtype, y0.device) if penalties else None
    start = _finite_start(y0, problem, results)
    if start.shape[0] > 0:
        field = _in_solver_time(field, problem.direction, problem.time_dtype, y0.dtype)
        _step_until_done(field, _first_rows(field, y0, start, rtol, atol, problem), problem, results, sums)
    dense = torch.tensor(tableau.dense, dtype=problem.time_dtype, device=y0.device)
    ys = results.solution(problem.times, dense)
    return ys, results.stats(tableau, problem.direction), None if sums is None else sums.totals()
