"""Where a tolerance is chosen: fixed, scheduled, and learned (Gaussian gate) policies.

Every policy answers one question: given the solve's context (what the gate reads, by default
the initial state ``y0``) and the training progress, which ``rtol``/``atol`` should this solve
use, and with what log-probability was it drawn? The answer is a :class:`ToleranceChoice`.

Learned tolerances are drawn in ``log10`` space (Section 3 of the InfoCNF paper models the
tolerance as Gaussian): tolerances span many orders of magnitude, and a Gaussian in log space
gives every decade the same resolution and keeps every sample positive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import NonFiniteToleranceError

Tolerance = float | torch.Tensor


@dataclass(frozen=True)
class Progress:
    """Training progress as policies see it: optimiser steps taken and (fractional) epochs."""

    step: int = 0
    epoch: float = 0.0

    def value(self, unit: Literal["step", "epoch"]) -> float:
        if unit == "step":
            return float(self.step)
        if unit == "epoch":
            return float(self.epoch)
        raise ValueError(f"progress unit must be 'step' or 'epoch', got {unit!r}")


@dataclass
class ToleranceChoice:
    """A policy's answer for one solve.

    ``rtol``/``atol``: float, or tensor of shape ``(batch,)`` (one tolerance per sample); ``None``
    for a choice that sets only ``step_size``.
    ``log10_tolerance``: the drawn ``log10(rtol)`` (detached), shape ``()`` or ``(batch,)``.
    ``log_prob``: log-density of the draw, differentiable in the gate's parameters, or ``None``.
    ``step_size``: for fixed-grid methods (``euler``, ``rk4``, ...), the step size in time units,
    passed to torchdiffeq as ``options["step_size"]``; the same knob as the tolerance, one level
    down: a policy that chooses it is an ordinary policy (see :class:`FixedStepSize`).
    ``per_element``: ``rtol``/``atol`` are in torchdiffeq's own layout (a tensor broadcastable to
    the state, or a tuple with one per state tensor) and go to torchdiffeq unchanged, unvalidated
    (how :func:`tolgate.odeint` passes a caller's tensor tolerances through).
    ``method``: the method of this solve, chosen by the policy (a rung of a
    :class:`~tolgate.ladder.SolverLadder`); ``None`` keeps the solver's own (``method``, or
    ``eval_method`` in eval mode).
    ``grid_steps``: for fixed-grid methods, the number of equal steps over the solve's time span
    ``[t[0], t[-1]]`` (the grid is ``linspace``, so the last step is not a rounding sliver);
    exclusive with ``step_size``.
    """

    rtol: Tolerance | None
    atol: Tolerance | None
    log10_tolerance: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None
    step_size: float | None = None
    per_element: bool = False
    method: str | None = None
    grid_steps: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` unless the choice can be solved with (see the fields)."""
        if self.grid_steps is not None:
            validate_grid_steps(self.grid_steps)
            if self.step_size is not None:
                raise ValueError(
                    f"a choice sets step_size={self.step_size!r} or grid_steps={self.grid_steps!r}, not both"
                )
            if self.rtol is None and self.atol is None:
                return
        if self.step_size is not None:
            _validate_step_size(self.step_size)
            if self.rtol is None and self.atol is None:
                return
        if self.per_element:
            return
        if self.rtol is None or self.atol is None:
            raise ValueError("a choice without rtol/atol must set step_size or grid_steps (a fixed-grid policy)")
        validate_tolerance(self.rtol, "rtol")
        validate_tolerance(self.atol, "atol")


def _validate_step_size(step_size: float) -> None:
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
        raise TypeError(f"step_size must be a float (time units), got {type(step_size).__name__}")
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be finite and > 0, got {step_size!r}")


def validate_grid_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"grid_steps must be an int (steps over the time span), got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"grid_steps must be >= 1, got {steps!r}")


def _validate_atol_ratio(atol_ratio: float) -> None:
    if not math.isfinite(atol_ratio) or atol_ratio <= 0:
        raise ValueError(f"atol_ratio must be finite and > 0, got {atol_ratio!r}")


def validate_tolerance(value: Tolerance, name: str) -> None:
    """Raise ``ValueError`` unless every element of ``value`` is finite and in ``(0, 1]``."""
    if isinstance(value, torch.Tensor):
        bad = ~torch.isfinite(value) | (value <= 0) | (value > 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must be finite and in (0, 1]; got {value[bad].flatten()[:4].tolist()}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0 or value > 1:
        raise ValueError(f"{name} must be finite and in (0, 1]; got {value!r}")


class TolerancePolicy(nn.Module):
    """Interface: ``policy(context, progress) -> ToleranceChoice``.

    ``deterministic`` is the policy's choice without exploration noise, used in evaluation when a
    :class:`~tolgate.GatedSolver` has ``eval_policy=None`` (Appendix D of the paper).
    """

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        raise NotImplementedError

    def deterministic(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        return self(context, progress)


class FixedTolerance(TolerancePolicy):
    """The same ``rtol`` and ``atol`` (default: ``atol = rtol``) for every solve."""

    def __init__(self, rtol: float, atol: float | None = None) -> None:
        super().__init__()
        atol = rtol if atol is None else atol
        validate_tolerance(rtol, "rtol")
        validate_tolerance(atol, "atol")
        self.rtol, self.atol = float(rtol), float(atol)

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        return ToleranceChoice(self.rtol, self.atol)

    @classmethod
    def from_gate(cls, gate: GaussianGate, contexts: Iterable[torch.Tensor]) -> FixedTolerance:
        """The ablation "fixed at the trained gate's mean": ``10 ** mean(log10 tolerance)``.

        ``contexts`` is an iterable of gate inputs, one per solve. The mean runs over the gate's
        deterministic choices (:meth:`GaussianGate.deterministic`): one per context for
        ``reduction="mean"``, one per sample for ``"none"``; so the fixed tolerance is the geometric
        mean of the tolerances the gate would choose without exploration noise.
        """
        mean_log10 = gate.mean_log10_tolerance(contexts)
        return cls(10.0**mean_log10, gate.atol_ratio * 10.0**mean_log10)

    def extra_repr(self) -> str:
        return f"rtol={self.rtol:g}, atol={self.atol:g}"


class FixedStepSize(TolerancePolicy):
    """The same step size for every solve, for fixed-grid methods (``rk4``, ``euler``, ...): the
    RNODE-style setting, where the cost of a solve is set by the step rather than a tolerance.

    ``step_size``: time units, > 0. The solve takes ``ceil((t[-1] - t[0]) / step_size)`` steps
    (torchdiffeq's grid: the last step is shortened to end at ``t[-1]``). Refused by adaptive methods.
    """

    def __init__(self, step_size: float) -> None:
        super().__init__()
        _validate_step_size(step_size)
        self.step_size = float(step_size)

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        return ToleranceChoice(None, None, step_size=self.step_size)

    def extra_repr(self) -> str:
        return f"step_size={self.step_size:g}"


class ScheduledTolerance(TolerancePolicy):
    """Tolerance as a function of training progress: the "manually tuned" baselines (Sec. 4.4-4.5).

    ``schedule`` maps progress (in ``unit``: optimiser steps or epochs) to ``rtol``;
    ``atol = atol_ratio * rtol``. See :meth:`log_linear` and :meth:`piecewise`.
    """

    def __init__(
        self,
        schedule: Callable[[float], float],
        unit: Literal["step", "epoch"] = "epoch",
        atol_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        Progress().value(unit)  # validates the unit
        _validate_atol_ratio(atol_ratio)
        self.schedule, self.unit, self.atol_ratio = schedule, unit, atol_ratio

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        rtol = float(self.schedule(progress.value(self.unit)))
        atol = self.atol_ratio * rtol
        validate_tolerance(rtol, "scheduled rtol")
        validate_tolerance(atol, "scheduled atol")
        return ToleranceChoice(rtol, atol)

    @classmethod
    def log_linear(
        cls, start: float, end: float, duration: float, unit: Literal["step", "epoch"] = "epoch"
    ) -> ScheduledTolerance:
        """Interpolate ``log10(tolerance)`` linearly from ``start`` to ``end`` over ``duration``."""
        return cls(LogLinearSchedule(start, end, duration), unit)

    @classmethod
    def piecewise(
        cls, boundaries: Sequence[float], values: Sequence[float], unit: Literal["step", "epoch"] = "epoch"
    ) -> ScheduledTolerance:
        """``values[k]`` while ``boundaries[k-1] <= progress < boundaries[k]``; one more value than boundaries."""
        return cls(PiecewiseSchedule(boundaries, values), unit)


class LogLinearSchedule:
    """``progress -> tolerance``: ``log10`` linear from ``start`` to ``end`` over ``duration``, then
    ``end``. An object rather than a closure, so solvers using it pickle and ``torch.save``."""

    def __init__(self, start: float, end: float, duration: float) -> None:
        validate_tolerance(start, "start")
        validate_tolerance(end, "end")
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration):
            raise ValueError(f"duration must be a finite number > 0, got {duration!r}")
        if duration <= 0:
            raise ValueError(f"duration must be > 0, got {duration!r}")
        self.log10_start, self.log10_end, self.duration = math.log10(start), math.log10(end), float(duration)

    def __call__(self, progress: float) -> float:
        frac = min(max(progress / self.duration, 0.0), 1.0)
        return 10.0 ** (self.log10_start + frac * (self.log10_end - self.log10_start))


class PiecewiseSchedule:
    """``progress -> values[k]`` while ``boundaries[k-1] <= progress < boundaries[k]`` (picklable)."""

    def __init__(self, boundaries: Sequence[float], values: Sequence[float]) -> None:
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"need len(values) == len(boundaries) + 1, got {len(values)} and {len(boundaries)}")
        if any(not math.isfinite(b) for b in boundaries):
            raise ValueError(f"boundaries must be finite, got {list(boundaries)}")
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"boundaries must be increasing, got {list(boundaries)}")
        for v in values:
            validate_tolerance(v, "piecewise value")
        self.boundaries, self.values = [float(b) for b in boundaries], [float(v) for v in values]

    def __call__(self, progress: float) -> float:
        return self.values[sum(progress >= b for b in self.boundaries)]


class GaussianGate(TolerancePolicy):
    """A learned tolerance: ``log10(rtol) ~ N(mu, sigma^2)`` with ``(mu, log sigma)`` from a network.

    ``net(context)`` returns ``(batch, 2)``: offsets of the mean of ``log10(rtol)`` from
    ``initial_log10`` and of ``log(sigma)`` from ``log(initial_std)`` (both in log10 units), so a
    network whose head outputs zero starts at ``rtol = 10**initial_log10``.

    ``reduction="mean"`` (the paper's choice) averages ``mu`` and ``log sigma`` over the batch and
    draws one tolerance per solve (``log_prob`` shape ``()``); ``reduction="none"`` draws one per
    sample (shape ``(batch,)``), for per-element tolerances or the per-sample backend.

    The draw is clipped to ``[log10(low), log10(high)]`` and detached. Its ``log_prob`` is that of
    the *censored* Gaussian: the density inside the interval and the tail mass ``log Phi`` at a
    clipped end, so the score stays correct when the gate pushes against a bound. It is
    differentiable in both ``mu`` and ``sigma``, unlike the original research code, whose
    log-probability scored only the noise and gave the gate no gradient.

    ``explore=False`` makes the gate *act* at its mean (no draw, no ``log_prob``): the setting for
    the probe estimator (:class:`~tolgate.probes.ProbedGateEstimator`), which explores on probes of
    the batch and leaves the training solve at the policy's best guess. :meth:`draw` always draws.

    A draw's ``log_prob`` is differentiable whenever the gate has trainable parameters, even under
    ``torch.no_grad``: a draw exists to be scored, and a training-mode solve run under ``no_grad``
    (a probe, a cheap forward) would otherwise hand REINFORCE a ``log_prob`` without grad and the
    gate's signal would vanish without an error. Only the gate's small network is recorded; the
    solve itself keeps the caller's grad mode. A frozen gate's ``log_prob`` never requires grad.

    ``initial_log10`` must lie in ``[log10(low), log10(high)]``: a mean outside the interval
    clips every draw to the bound, where the censored ``log_prob`` is a flat tail and the gate
    would start with almost no gradient.
    """

    def __init__(
        self,
        net: nn.Module,
        low: float = 1e-8,
        high: float = 1e-1,
        reduction: Literal["mean", "none"] = "mean",
        initial_log10: float = -5.0,
        initial_std: float = 0.5,
        atol_ratio: float = 1.0,
        explore: bool = True,
    ) -> None:
        super().__init__()
        validate_tolerance(low, "low")
        validate_tolerance(high, "high")
        if not low < high:
            raise ValueError(f"need low < high, got low={low!r}, high={high!r}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if not (math.isfinite(initial_std) and initial_std > 0):
            raise ValueError(f"initial_std must be finite and > 0, got {initial_std!r}")
        log10_low, log10_high = math.log10(low), math.log10(high)
        if not (math.isfinite(initial_log10) and log10_low <= initial_log10 <= log10_high):
            raise ValueError(
                f"initial_log10 must lie in [log10(low), log10(high)] = [{log10_low:g}, {log10_high:g}] "
                f"(low={low!r}, high={high!r}), got {initial_log10!r}: outside it every draw is clipped to "
                "the bound and the gate starts without a useful gradient"
            )
        self.net = net
        self.log10_low, self.log10_high = log10_low, log10_high
        self.reduction = reduction
        self.initial_log10, self.initial_log_std = float(initial_log10), math.log(initial_std)
        _validate_atol_ratio(atol_ratio)
        self.atol_ratio = float(atol_ratio)
        self.explore = bool(explore)

    def freeze(self) -> GaussianGate:
        """Stop learning: the ablation "gate frozen at its random initialisation". Returns self."""
        for p in self.net.parameters():
            p.requires_grad_(False)
        return self

    def distribution(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` of ``log10(rtol)``, each of shape ``()`` or ``(batch,)`` per the reduction."""
        raw = self.net(context)
        if raw.dim() != 2 or raw.shape[1] != 2:
            raise ValueError(f"gate network must return shape (batch, 2), got {tuple(raw.shape)}")
        if not bool(torch.isfinite(raw).all()):
            raise NonFiniteToleranceError("gate network produced a non-finite output (NaN or inf)")
        mu = self.initial_log10 + raw[:, 0]
        log_sigma = (self.initial_log_std + raw[:, 1]).clamp(-7.0, 2.0)
        if self.reduction == "mean":
            mu, log_sigma = mu.mean(), log_sigma.mean()
        return mu, log_sigma.exp()

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        if not self.explore:
            return self.deterministic(context, progress)
        return self.draw(context)

    def draw(
        self, context: torch.Tensor, generator: torch.Generator | None = None, std: float | None = None
    ) -> ToleranceChoice:
        """One draw from the gate, with ``log_prob``; ``generator`` (on the context's device) keeps
        the draw off the global RNG stream, so probes can share their Hutchinson noise.

        ``std`` (decades) replaces the gate's own sigma by a constant: ``log_prob`` then depends on
        the mean only. The probe estimator uses it: a gate that acts at its mean needs sigma only as
        the smoothing width of its gradient estimate, and a learned sigma collapses (the NFE is a
        step function of the tolerance, so narrow draws all cost the same and the signal vanishes).

        The distribution is computed with grad enabled when the gate has trainable parameters, so
        ``log_prob`` stays differentiable under ``torch.no_grad`` (see the class docstring)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() or self._trainable()):
            mu, sigma = self.distribution(context)
            if std is not None:
                sigma = torch.full_like(mu, std)
            noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            draw = (mu + sigma * noise).detach()
            log10_tol = draw.clamp(self.log10_low, self.log10_high)
            log_prob = censored_normal_log_prob(log10_tol, mu, sigma, self.log10_low, self.log10_high)
        return self._choice(log10_tol, log_prob)

    def _trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def deterministic(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        mu, _ = self.distribution(context)
        return self._choice(mu.detach().clamp(self.log10_low, self.log10_high), None)

    def _choice(self, log10_tol: torch.Tensor, log_prob: torch.Tensor | None) -> ToleranceChoice:
        rtol: Tolerance
        if log10_tol.dim() == 0:
            rtol = 10.0 ** float(log10_tol)
            atol: Tolerance = self.atol_ratio * rtol
        else:
            rtol = torch.pow(10.0, log10_tol.double())
            atol = self.atol_ratio * rtol
        return ToleranceChoice(rtol, atol, log10_tolerance=log10_tol, log_prob=log_prob)

    @torch.no_grad()
    def mean_log10_tolerance(self, contexts: Iterable[torch.Tensor]) -> float:
        """Mean of the deterministic (clipped) ``log10`` tolerance over ``contexts``, one per solve
        (``reduction="mean"``) or per sample (``"none"``)."""
        total, count = 0.0, 0
        for context in contexts:
            chosen = self.deterministic(context, Progress()).log10_tolerance
            total += float(chosen.double().sum())
            count += chosen.numel()
        if count == 0:
            raise ValueError("contexts is empty: cannot estimate the gate's mean tolerance")
        return total / count


class NoiseMatchedTolerance(TolerancePolicy):
    """The loosest tolerance whose solver error in the loss stays below a fraction of the
    minibatch's own noise: a deterministic, non-RL adaptive policy.

    The rule is the "norm test" of dynamic sample-size methods (Byrd et al. 2012) applied to the
    solver: SGD already tolerates the minibatch's sampling error ``std(L) / sqrt(batch)``, so a
    deterministic solver error well below it costs nothing measurable, and any accuracy beyond
    that is wasted work. :func:`tolgate.probes.calibrate` measures both on a probe of the batch
    (a tight reference solve and solves at the current and the next looser tolerance, on common
    random numbers) and calls :meth:`update`, which moves ``log10(rtol)`` one ``step`` looser when
    the looser tolerance stays within budget and one step tighter when the current one does not.

    One instance may serve every solver of a model (one tolerance for all blocks). The current
    tolerance is a buffer, so it is saved and restored with the model.
    """

    def __init__(
        self,
        initial: float = 1e-5,
        low: float = 1e-8,
        high: float = 1e-1,
        step: float = 0.5,
        fraction: float = 0.1,
        atol_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        for value, name in ((initial, "initial"), (low, "low"), (high, "high")):
            validate_tolerance(value, name)
        if not low <= initial <= high:
            raise ValueError(f"need low <= initial <= high, got {low!r}, {initial!r}, {high!r}")
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"step (decades) must be finite and > 0, got {step!r}")
        if not (math.isfinite(fraction) and fraction > 0):
            raise ValueError(f"fraction must be finite and > 0, got {fraction!r}")
        _validate_atol_ratio(atol_ratio)
        self.log10_low, self.log10_high = math.log10(low), math.log10(high)
        self.step, self.fraction, self.atol_ratio = float(step), float(fraction), float(atol_ratio)
        self.register_buffer("log10_tolerance", torch.tensor(math.log10(initial), dtype=torch.float64))

    @property
    def current(self) -> float:
        """The tolerance (``rtol``) every solve uses now."""
        return 10.0 ** float(self.log10_tolerance)

    @property
    def looser(self) -> float:
        """The candidate one ``step`` looser (clipped to ``high``)."""
        return 10.0 ** min(float(self.log10_tolerance) + self.step, self.log10_high)

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        rtol = self.current
        return ToleranceChoice(rtol, self.atol_ratio * rtol, log10_tolerance=self.log10_tolerance.clone())

    def update(self, error_current: float, error_looser: float, noise: float) -> float:
        """Move by one step from the measured solver errors (same units as ``noise``, the
        standard error of the training minibatch's loss); return the new tolerance."""
        for value, name in ((error_current, "error_current"), (error_looser, "error_looser"), (noise, "noise")):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        budget = self.fraction * noise
        log10 = float(self.log10_tolerance)
        if error_current > budget:
            log10 -= self.step
        elif error_looser <= budget:
            log10 += self.step
        self.log10_tolerance.fill_(min(max(log10, self.log10_low), self.log10_high))
        return self.current

    def extra_repr(self) -> str:
        return f"rtol={self.current:.3g}, step={self.step:g} decades, fraction={self.fraction:g}"


def censored_normal_log_prob(
    value: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """Log-likelihood of ``value = clip(N(mu, sigma^2), low, high)`` (density inside, mass at the ends)."""
    z = (value - mu) / sigma
    inside = -0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    at_low = torch.special.log_ndtr((low - mu) / sigma)
    at_high = torch.special.log_ndtr((mu - high) / sigma)
    return torch.where(value <= low, at_low, torch.where(value >= high, at_high, inside))
