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

Per step there is one host synchronisation: a two-flag ``tolist()`` that says whether any row
crossed an output time or left the active set. The dense output of the steps that crossed output
times is evaluated once, after the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import LOW_PRECISION_DTYPES, control_dtype
from .errors import NonFiniteStateError, SolveError, StepBudgetExceeded, StepSizeUnderflow
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


def _stages(
    field: Field, rows: _Rows, tableau: ButcherTableau, t_end: float, broadcast: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """One attempted step for every active row: ``(t1, h, h_state, ks, y1)``.

    The step is clipped to land exactly on ``t_end``; ``h = t1 - t`` is the step actually taken,
    ``h_state`` the same as ``(active, 1, ..., 1)`` in the state's dtype, ``ks`` the stage
    derivatives. FSAL: the last stage is evaluated at ``(t1, y1)`` with ``y1`` the stage input.
    """
    t1 = torch.clamp(rows.t + rows.h, max=t_end)
    h = t1 - rows.t
    h_state = (h if h.dtype == rows.y.dtype else h.to(rows.y.dtype)).view(broadcast)
    ks = [rows.k0]
    for a_row, c in zip(tableau.a[1:], tableau.c[1:], strict=True):
        y_stage = torch.addcmul(rows.y, h_state, _combine(a_row, ks))
        t_stage = t1 if c == 1.0 else torch.add(rows.t, h, alpha=c)
        ks.append(field(t_stage, y_stage, rows.idx))
    return t1, h, h_state, ks, y_stage


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


def _failure(code: int, sample: int, t_reached: float, t: torch.Tensor, max_num_steps: int | None) -> SolveError:
    where = f"sample {sample} at t={t_reached:.6g} (solving from t={float(t[0]):.6g} to {float(t[-1]):.6g})"
    if code == int(SolveStatus.STEP_BUDGET_EXCEEDED):
        return StepBudgetExceeded(f"step budget max_num_steps={max_num_steps} exceeded by {where}")
    if code == int(SolveStatus.STEP_SIZE_UNDERFLOW):
        return StepSizeUnderflow(f"step size fell below 10 ulps of t for {where}")
    return NonFiniteStateError(f"NaN or inf state (initial, or from the vector field) for {where}")


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
) -> tuple[torch.Tensor, PerSampleStats]:
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

    Returns:
        ``ys`` ``(n_times, batch, *state)`` (NaN where a failed sample never got) and the stats.
    """
    time_dtype = torch.promote_types(torch.promote_types(y0.dtype, t.dtype), control_dtype(y0.dtype))
    direction = 1.0 if bool(t[-1] > t[0]) else -1.0
    times = t.to(time_dtype) * direction  # increasing in the integration direction
    t_start, t_end = float(times[0]), float(times[-1])
    dense = torch.tensor(tableau.dense, dtype=time_dtype, device=y0.device)
    results = _Results(y0, time_dtype)

    field = _in_solver_time(field, direction, time_dtype, y0.dtype)
    broadcast = (-1,) + (1,) * (y0.dim() - 1)
    batch, device = y0.shape[0], y0.device
    finite = torch.isfinite(y0.reshape(batch, -1)).all(1)
    start = torch.nonzero(finite).squeeze(1)
    if start.shape[0] < batch:
        if raise_on_failure:
            first_bad = int(torch.nonzero(~finite)[0])
            raise _failure(int(SolveStatus.NON_FINITE), first_bad, direction * t_start, t, max_num_steps)
        results.status[~finite] = int(SolveStatus.NON_FINITE)
        results.t_reached[~finite] = t_start
        if start.shape[0] == 0:
            return results.solution(times, dense), results.stats(tableau, direction)
    results.started[start] = True

    y = y0.index_select(0, start)
    active = start.shape[0]
    zeros = torch.zeros(active, dtype=torch.int64, device=device)
    t_now = torch.full((active,), t_start, dtype=time_dtype, device=device)
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
        next_output=torch.full_like(t_now, float(times[1])),
        last_accepted=torch.ones(active, dtype=torch.bool, device=device),
    )
    rows.h = _initial_step(field, rows, t_end - t_start, tableau.embedded_order, norm, broadcast)

    exponent = -0.5 / (tableau.embedded_order + 1)  # on the mean square: norm^(-1/(q+1))
    max_growth = torch.tensor(MAX_FACTOR, dtype=time_dtype, device=device)
    no_growth = torch.ones((), dtype=time_dtype, device=device)
    min_factor = torch.tensor(MIN_FACTOR, dtype=time_dtype, device=device)
    infinity = torch.tensor(float("inf"), dtype=time_dtype, device=device)
    last_time = times.shape[0] - 1
    # float16 overflows at 65504, within reach of a large step: reject such steps (a smaller one may
    # not overflow). Wider dtypes only overflow in a blow-up, and that fails anyway; the test at
    # exit below keeps an overflowed last step from passing as a success, at no cost per step.
    reject_overflow = y0.dtype in LOW_PRECISION_DTYPES

    while True:
        t1, h, h_state, ks, y1 = _stages(field, rows, tableau, t_end, broadcast)

        with torch.no_grad():
            error = _combine(tableau.b_error, ks) * h_state
            magnitude = torch.maximum(rows.y.abs(), y1.abs())
            scale = torch.addcmul(rows.atol, rows.rtol, magnitude.to(rows.rtol.dtype))  # error-control dtype
            error_sq = norm((error / scale).square())
            # NaN -> inf: a non-finite step is rejected and shrinks h by MIN_FACTOR.
            error_sq = torch.nan_to_num(
                error_sq if time_dtype == error_sq.dtype else error_sq.to(time_dtype), nan=float("inf")
            )
            if reject_overflow:
                # An overflowed state has the error scale atol + rtol |y1| = inf, so its scaled error
                # is 0 and the step would pass: reject it (the row maximum of the magnitude is NaN
                # or inf exactly then; amax propagates NaN).
                finite_state = torch.isfinite(magnitude.reshape(magnitude.shape[0], -1).amax(1))
                error_sq = torch.where(finite_state, error_sq, infinity)
            accept = error_sq < 1.0
            max_factor = torch.where(rows.last_accepted, max_growth, no_growth)
            h_next = h * torch.clamp(SAFETY * error_sq**exponent, min=min_factor, max=max_factor)
            t_next = torch.where(accept, t1, rows.t)
            attempts = rows.attempts + 1
            done = accept & (t1 == t_end)
            # The comparison is False for a NaN step, so a NaN step size also counts as underflow.
            underflow = ~(h_next >= 10 * (torch.nextafter(t_next, infinity) - t_next))
            finished = done | underflow
            if max_num_steps is not None:
                finished = finished | (attempts >= max_num_steps)
            crossed = t_next >= rows.next_output
            any_crossed, any_finished = torch.stack((crossed, finished)).any(1).tolist()

        outputs_done, next_output = rows.outputs_done, rows.next_output
        if any_crossed:  # with gradient: the crossing holds the stages the dense output needs
            crossing, outputs_done = _crossing(rows, t_next, h, times, y1, ks)
            results.crossings.append(crossing)
            next_output = times[outputs_done.clamp(max=last_time)]

        accept_state = accept.view(broadcast)
        rows = _Rows(
            idx=rows.idx,
            y=torch.where(accept_state, y1, rows.y),
            k0=torch.where(accept_state, ks[-1], rows.k0),
            t=t_next,
            h=h_next,
            rtol=rows.rtol,
            atol=rows.atol,
            attempts=attempts,
            accepted=rows.accepted + accept,
            outputs_done=outputs_done,
            next_output=next_output,
            last_accepted=accept,
        )
        if any_finished:
            leaving = torch.nonzero(finished).squeeze(1)
            codes = _status_codes(done, underflow, error_sq).index_select(0, leaving)
            final = rows.y.index_select(0, leaving).detach().abs().reshape(leaving.shape[0], -1).amax(1)
            codes = torch.where(torch.isfinite(final), codes, int(SolveStatus.NON_FINITE))
            failed = codes != int(SolveStatus.SUCCESS)
            if raise_on_failure and bool(failed.any()):
                bad = torch.nonzero(failed).squeeze(1)  # positions in `leaving`
                pos = int(bad[torch.argmin(rows.idx[leaving[bad]])])  # the lowest sample index
                row = int(leaving[pos])
                when = direction * float(rows.t[row])
                raise _failure(int(codes[pos]), int(rows.idx[row]), when, t, max_num_steps)
            results.finish(rows, leaving, codes)
            if leaving.shape[0] == rows.idx.shape[0]:
                break
            rows = rows.select(torch.nonzero(~finished).squeeze(1))

    return results.solution(times, dense), results.stats(tableau, direction)
