"""Solver-aware penalties: what the adaptive solver itself measured, as differentiable losses.

Pal et al. (2021, "Opening the blackbox") regularise a neural ODE with the quantities its
adaptive solver computes anyway; minimising them trains a field that the solver can cross in
fewer steps. Built with ``GatedSolver(..., penalties=True)``, every adaptive solve's record holds

* ``record.local_error = sum_j E_j |h_j|``: ``E_j`` is the weighted error norm of accepted step
  ``j``, the very number the step-size controller compared with 1
  (``rms(err / (atol + rtol * max(|y0|, |y1|)))``; for a tuple state torchdiffeq's default, the
  largest of the per-tensor RMS), ``|h_j|`` its size in time units. Weighting by the step makes
  the sum an integral of the error density along the trajectory, not a step count.
* ``record.stiffness = sum_j rho_j |h_j|``: ``rho_j = ||f(Y_s) - f(Y_{s-1})|| / ||Y_s - Y_{s-1}||``
  over the step's last two stages, an estimate of the field's local Lipschitz constant (of its
  dominant eigenvalue for dopri5 and tsit5, whose last two stages share the time ``t + h``:
  Hairer & Wanner's stiffness test). ``rho h`` is what bounds an explicit method's stable step,
  so the sum estimates the steps that stability, not accuracy, forces.

Both are sums over the *accepted* steps of one solve (torchdiffeq steps past the last output time
and interpolates back, so its sums cover the steps taken, overshoot included; the per-sample
backend ends its last step on ``t[-1]``) and carry the graph
of the stages they are made of, so ``loss + lam * record.local_error`` backpropagates into the
field's parameters. The step sizes enter as constants: the gradient is that of the penalties
along the step sequence the solver chose.

Which backend offers what:

==================  ================================================================
``torchdiffeq``     shape ``()`` per solve (one step size for the batch, so one norm);
                    adaptive methods, ``adjoint=False`` (the adjoint method's forward
                    solve keeps no graph); fixed-grid methods have no error estimate:
                    ``None``. Per-element tolerances (``ToleranceChoice.per_element``)
                    are refused.
``per_sample``      shape ``(batch,)``: each sample's own steps and norm.
==================  ================================================================

On the torchdiffeq backend the stages are taken from the evaluations the counting field sees
(:class:`StageTape`), using the method's Butcher tableau; tests check ``E_j`` against
torchdiffeq's own error ratio.
"""

from __future__ import annotations

import torch

State = torch.Tensor | tuple[torch.Tensor, ...]
Tolerance = float | torch.Tensor


def _tensors(state: State) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _per_row(tol: Tolerance, like: torch.Tensor) -> Tolerance:
    """A ``(batch,)`` tolerance shaped to broadcast against ``like`` ``(batch, ...)``; floats as they are."""
    if isinstance(tol, torch.Tensor):
        return tol.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
    return tol


def weighted_error_norm(error: State, y0: State, y1: State, rtol: Tolerance, atol: Tolerance) -> torch.Tensor:
    """The step controller's error norm, shape ``()``: ``max`` over tensors of
    ``rms(error / (atol + rtol * max(|y0|, |y1|)))`` (torchdiffeq's default norm; for one tensor
    just the RMS). ``rtol``/``atol``: floats or per-sample ``(batch,)`` tensors."""
    norms = []
    for err, a, b in zip(_tensors(error), _tensors(y0), _tensors(y1), strict=True):
        scale = _per_row(atol, a) + _per_row(rtol, a) * torch.maximum(a.abs(), b.abs())
        norms.append(_floored_sqrt((err / scale).square().mean()))
    return norms[0] if len(norms) == 1 else torch.stack(norms).max()


def lipschitz_estimate(y_a: State, f_a: State, y_b: State, f_b: State, per_row: bool = False) -> torch.Tensor:
    """``||f_b - f_a|| / ||y_b - y_a||`` (Euclidean norms over all elements of the state), shape
    ``()``; with ``per_row`` one ratio per row of the batch, ``(batch,)``. A zero state difference
    gives 0 (up to the floor of :func:`_floored_sqrt`)."""

    def squared(a: State, b: State) -> torch.Tensor:
        parts = [
            (x - y).flatten(1 if per_row else 0).square().sum(-1) for x, y in zip(_tensors(a), _tensors(b), strict=True)
        ]
        return torch.stack(parts).sum(0)

    numerator = squared(f_b, f_a)
    denominator = squared(y_b, y_a)
    return _floored_sqrt(numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny))


def _floored_sqrt(square: torch.Tensor) -> torch.Tensor:
    """``sqrt`` with its argument floored at the dtype's smallest normal number: the square root's
    derivative at exactly 0 is infinite, and a field with two equal stages (a zero weight, say)
    would otherwise turn the whole gradient into NaN."""
    return square.clamp_min(torch.finfo(square.dtype).tiny).sqrt()


class StageTape:
    """Rebuilds each accepted step of a torchdiffeq Runge-Kutta solve from the field's evaluations
    and accumulates the penalties of the module docstring.

    The torchdiffeq backend calls :meth:`evaluated` on every forward evaluation and
    :meth:`step_started` / :meth:`accepted` / :meth:`rejected` from torchdiffeq's step callbacks. A step's stages
    are ``f0`` (the derivative at the step's start: the solve's first evaluation, then the last
    stage of the previous accepted step, first-same-as-last) and the evaluations after the step
    callback, in the tableau's order. ``sign`` is -1 when the solve runs backwards in time.
    """

    def __init__(
        self, c_sol: torch.Tensor, c_error: torch.Tensor, rtol: Tolerance, atol: Tolerance, sign: float
    ) -> None:
        self.c_sol = [float(c) for c in c_sol]
        self.c_error = [float(c) for c in c_error]
        self.rtol, self.atol, self.sign = rtol, atol, sign
        self.start: tuple[State, State] | None = None  # (y0, f0) of the step about to be taken
        self.stages: list[tuple[State, State]] = []
        self.local_error: torch.Tensor | None = None
        self.stiffness: torch.Tensor | None = None

    def evaluated(self, y: State, f: State) -> None:
        """One forward evaluation ``f = field(t, y)``."""
        self.stages.append((y, f))

    def step_started(self) -> None:
        """torchdiffeq's ``callback_step``: the evaluations so far precede the coming step."""
        if self.start is None:  # the solve's first evaluation is f(t0, y0); a second one probed the first step
            self.start = self.stages[0]
        elif self.stages:  # evaluations between an accepted step and this one: a re-evaluation at a jump time
            self.start = self.stages[-1]
        self.stages = []

    def rejected(self) -> None:
        """torchdiffeq's ``callback_reject_step``: the step's stages are dropped, ``f0`` stays."""
        self.stages = []

    def accepted(self, dt: float) -> None:
        """torchdiffeq's ``callback_accept_step`` for a step of size ``dt > 0`` (solver time)."""
        if self.start is None or not self.stages:
            return
        y0, f0 = self.start
        stages = [self.start, *self.stages]
        ks = [_tensors(f) for _, f in stages]
        h = self.sign * dt
        parts = tuple(zip(*ks, strict=True))  # per state tensor, its k of every stage
        y1 = tuple(a + h * _combine(self.c_sol, k) for a, k in zip(_tensors(y0), parts, strict=True))
        error = tuple(dt * _combine(self.c_error, k) for k in parts)
        if not isinstance(y0, tuple):
            y1, error = y1[0], error[0]
        norm = weighted_error_norm(error, y0, y1, self.rtol, self.atol)
        (y_a, f_a), (y_b, f_b) = stages[-2], stages[-1]
        rho = lipschitz_estimate(y_a, f_a, y_b, f_b)
        self.local_error = norm * dt if self.local_error is None else self.local_error + norm * dt
        self.stiffness = rho * dt if self.stiffness is None else self.stiffness + rho * dt
        self.start = stages[-1]
        self.stages = []


def _combine(weights: list[float], ks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    total = None
    for weight, k in zip(weights, ks, strict=True):
        if weight:
            total = weight * k if total is None else total + weight * k
    return total if total is not None else torch.zeros_like(ks[0])
