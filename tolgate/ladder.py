"""The cost ladder: a block's solver settings from expensive to cheap, and the policy that stands on it.

A block's solve gets cheaper in two ways: a looser tolerance for an adaptive method, or a coarser
fixed grid. RNODE's fixed-grid RK4 saves most where the field is smooth, a loose dopri5 where it is
not, and which one wins depends on the data set and on how far training has gone. A
:class:`SolverLadder` puts both kinds on one ordered list of :class:`SolverSetting` rungs (by
default dopri5 at 1e-8 ... 1e-1, then RK4 with 8, 6, 4, 3, 2 and 1 steps over the block's time span),
so that one rule can walk it. A :class:`LadderPolicy` (one per block) answers every solve with the
setting of its current rung; :func:`tolgate.climb.climb` moves it, after a check against a tight
reference solve (see that module for the rule and its derivation). A :class:`LadderGate` learns
per-block departures from that rung with the probe estimator.

Cost order. An adaptive rung costs whatever its error control needs, so it is only known once
solved; a fixed-grid rung costs exactly ``stages x steps`` evaluations forward. The ladder is
ordered by accuracy within each method (looser tolerances, fewer steps further down), and
:meth:`SolverLadder.cheaper` skips a fixed-grid rung whose known cost is not below what the current
setting was measured to cost: RK4 with 8 steps (32 evaluations) is no saving on a block that
dopri5 at 1e-1 solves in 14.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NonFiniteToleranceError
from .policies import Progress, ToleranceChoice, TolerancePolicy, validate_grid_steps, validate_tolerance
from .torchdiffeq_backend import ADAPTIVE_METHODS

#: fixed-grid methods a rung may use, with their evaluations per step (torchdiffeq's explicit
#: Runge-Kutta grids; the Adams methods' cost and accuracy depend on their start-up and history)
GRID_STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}


@dataclass(frozen=True)
class SolverSetting:
    """One rung: an adaptive ``method`` at ``tolerance`` (``rtol = atol``), or a fixed-grid
    ``method`` (:data:`GRID_STAGES`) with ``steps`` equal steps over the solve's time span."""

    method: str
    tolerance: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.method in ADAPTIVE_METHODS:
            if self.tolerance is None or self.steps is not None:
                raise ValueError(
                    f"adaptive method {self.method!r} takes a tolerance and no steps; "
                    f"got tolerance={self.tolerance!r}, steps={self.steps!r}"
                )
            validate_tolerance(self.tolerance, "tolerance")
        elif self.method in GRID_STAGES:
            if self.steps is None or self.tolerance is not None:
                raise ValueError(
                    f"fixed-grid method {self.method!r} takes steps and no tolerance; "
                    f"got tolerance={self.tolerance!r}, steps={self.steps!r}"
                )
            validate_grid_steps(self.steps)
        else:
            raise ValueError(
                f"a rung's method must be adaptive {ADAPTIVE_METHODS} or a fixed grid {tuple(GRID_STAGES)}; "
                f"got {self.method!r}"
            )

    @property
    def adaptive(self) -> bool:
        return self.steps is None

    @property
    def nfe_forward(self) -> int | None:
        """Evaluations of one forward solve (fixed grid), ``None`` for an adaptive rung."""
        return None if self.steps is None else GRID_STAGES[self.method] * self.steps

    def choice(self) -> ToleranceChoice:
        """The :class:`~tolgate.policies.ToleranceChoice` of this setting (it names the method)."""
        if self.steps is not None:
            return ToleranceChoice(None, None, method=self.method, grid_steps=self.steps)
        log10 = torch.tensor(math.log10(self.tolerance), dtype=torch.float64)
        return ToleranceChoice(self.tolerance, self.tolerance, log10_tolerance=log10, method=self.method)

    @classmethod
    def parse(cls, text: str) -> SolverSetting:
        """``"dopri5:1e-5"`` (method:tolerance) or ``"rk4:4"`` (method:steps)."""
        method, sep, value = text.partition(":")
        if not sep:
            raise ValueError(f"a solver setting reads 'method:tolerance' or 'method:steps', got {text!r}")
        try:
            if method in GRID_STAGES:
                return cls(method, steps=int(value))
            return cls(method, tolerance=float(value))
        except ValueError as exc:
            raise ValueError(f"cannot read solver setting {text!r}: {exc}") from None

    def __str__(self) -> str:
        if self.steps is not None:
            return f"{self.method}:{self.steps}"
        return f"{self.method}:{self.tolerance:g}"


#: the evaluation protocol's setting (Section 4.2 of the paper): the default tight reference
REFERENCE_SETTING = SolverSetting("dopri5", 1e-5)


class SolverLadder(Sequence[SolverSetting]):
    """Rungs from expensive (index 0) to cheap: within one method, looser tolerances or fewer
    steps further down (``ValueError`` otherwise, or for a repeated rung)."""

    def __init__(self, settings: Sequence[SolverSetting]) -> None:
        settings = tuple(settings)
        if not settings:
            raise ValueError("a ladder needs at least one rung")
        for setting in settings:
            if not isinstance(setting, SolverSetting):
                raise TypeError(f"ladder rungs must be SolverSetting, got {type(setting).__name__}")
        if len(set(settings)) != len(settings):
            raise ValueError(f"a ladder's rungs must be distinct, got {[str(s) for s in settings]}")
        last_of: dict[str, SolverSetting] = {}
        for setting in settings:
            upper = last_of.get(setting.method)
            if upper is not None and _accuracy(upper) <= _accuracy(setting):
                raise ValueError(
                    f"rung {setting} below {upper} is not cheaper: within a method, tolerances must grow and "
                    "steps shrink down the ladder"
                )
            last_of[setting.method] = setting
        self.settings = settings

    @classmethod
    def default(
        cls,
        method: str = "dopri5",
        tolerances: Sequence[float] = tuple(10.0**-k for k in range(8, 0, -1)),
        grid_method: str = "rk4",
        grid_steps: Sequence[int] = (8, 6, 4, 3, 2, 1),
    ) -> SolverLadder:
        """``method`` at each of ``tolerances`` (tight to loose), then ``grid_method`` with each of
        ``grid_steps`` (many to few): dopri5 1e-8 ... 1e-1, then RK4 with 8, 6, 4, 3, 2, 1 steps.

        The grids between the powers of two (6 and 3 steps) are there for blocks whose error sits
        at the budget: without them a failed check at 2 steps doubles the block's cost (4 steps);
        measured on 8gaussians, 1.23x against 1.13x the hand-picked cost (docs/results.md)."""
        adaptive = [SolverSetting(method, tolerance=float(t)) for t in sorted(tolerances)]
        grids = [SolverSetting(grid_method, steps=int(n)) for n in sorted(grid_steps, reverse=True)]
        return cls(adaptive + grids)

    def __len__(self) -> int:
        return len(self.settings)

    def __getitem__(self, index):  # type: ignore[override]
        return self.settings[index]

    def __iter__(self) -> Iterator[SolverSetting]:
        return iter(self.settings)

    def index(self, setting: SolverSetting, start: int = 0, stop: int | None = None) -> int:
        """The rung of ``setting``; ``ValueError`` naming the rungs when it is not on the ladder."""
        try:
            return self.settings.index(setting, start, len(self) if stop is None else stop)
        except ValueError:
            raise ValueError(f"{setting} is not on the ladder {[str(s) for s in self]}") from None

    def cheaper(self, rung: int, nfe_now: float) -> list[int]:
        """The rungs below ``rung`` worth trying, expensive to cheap: adaptive rungs (their cost is
        unknown until solved) and fixed-grid rungs whose known cost is below ``nfe_now``, the
        current setting's measured forward evaluations per solve (see the module docstring)."""
        return [k for k in range(rung + 1, len(self)) if self[k].nfe_forward is None or self[k].nfe_forward < nfe_now]

    def __repr__(self) -> str:
        return f"SolverLadder([{', '.join(str(s) for s in self)}])"


def _accuracy(setting: SolverSetting) -> float:
    """Larger is more accurate: ``-log10(tolerance)`` or the number of steps."""
    return -math.log10(setting.tolerance) if setting.steps is None else float(setting.steps)


class FixedSetting(TolerancePolicy):
    """One :class:`SolverSetting` for every solve (the method included), e.g. the tight reference
    of a probe, or a rung held fixed."""

    def __init__(self, setting: SolverSetting) -> None:
        super().__init__()
        self.setting = setting

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        return self.setting.choice()

    def extra_repr(self) -> str:
        return str(self.setting)


class LadderPolicy(TolerancePolicy):
    """A block's place on a :class:`SolverLadder`: every solve gets the current rung's setting.

    ``start``: the first rung (a setting on the ladder or its index; default the first adaptive
    rung at 1e-5, the evaluation protocol's setting, or rung 0 if there is none). The rung is a
    buffer, so it is saved and restored with the model; :func:`tolgate.climb.climb` moves it
    (:meth:`move_to`), nothing else does.
    """

    def __init__(self, ladder: SolverLadder, start: SolverSetting | int | None = None) -> None:
        super().__init__()
        if not isinstance(ladder, SolverLadder):
            raise TypeError(f"ladder must be a SolverLadder, got {type(ladder).__name__}")
        self.ladder = ladder
        if start is None:
            start = REFERENCE_SETTING if REFERENCE_SETTING in ladder.settings else 0
        index = ladder.index(start) if isinstance(start, SolverSetting) else int(start)
        self.register_buffer("rung", torch.tensor(0, dtype=torch.int64))
        self.move_to(index)

    @property
    def index(self) -> int:
        """The current rung."""
        return int(self.rung)

    @property
    def setting(self) -> SolverSetting:
        return self.ladder[self.index]

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        return self.setting.choice()

    def move_to(self, rung: int) -> None:
        """Stand on ``rung`` (``ValueError`` off the ladder)."""
        if not 0 <= rung < len(self.ladder):
            raise ValueError(f"rung must be in [0, {len(self.ladder)}), got {rung!r}")
        self.rung.fill_(rung)

    def cheaper(self, nfe_now: float) -> list[int]:
        """The eligible rungs below this one (:meth:`SolverLadder.cheaper`), expensive to cheap."""
        return self.ladder.cheaper(self.index, nfe_now)

    def extra_repr(self) -> str:
        return f"rung={self.index} ({self.setting}) of {len(self.ladder)}"


class LadderGate(TolerancePolicy):
    """Learned per-block departures from an automatic rung: a gate network on top of a
    :class:`LadderPolicy` (``base``, still moved by :func:`tolgate.climb.climb`).

    A solve uses rung ``base.index + round(offset)`` (clipped to the ladder; positive offsets are
    cheaper), ``offset`` in rungs. The gate acts at its mean ``mu = mean_batch net(context)[:, 0]``
    (a network whose head outputs zero keeps the automatic choice) and :meth:`draw` samples
    ``offset ~ N(mu, std^2)`` for :class:`~tolgate.probes.ProbedGateEstimator`, whose reward
    (fewer evaluations, a penalty past the solver-error budget) teaches it where leaving the rule's
    rung pays. ``std`` is a constant smoothing width in rungs, as the estimator's
    ``exploration_std``: the rung is a step function of the offset, so a learned spread collapses.
    """

    def __init__(self, base: LadderPolicy, net: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, LadderPolicy):
            raise TypeError(f"base must be a LadderPolicy, got {type(base).__name__}")
        self.base, self.net = base, net

    @property
    def ladder(self) -> SolverLadder:
        return self.base.ladder

    def mean_offset(self, context: torch.Tensor) -> torch.Tensor:
        """``mu``, shape ``()``, in rungs (differentiable in the network's parameters)."""
        raw = self.net(context)
        if raw.dim() != 2 or raw.shape[1] < 1:
            raise ValueError(f"gate network must return shape (batch, k >= 1), got {tuple(raw.shape)}")
        mu = raw[:, 0].mean()
        if not bool(torch.isfinite(mu)):
            raise NonFiniteToleranceError("ladder gate network produced a non-finite offset (NaN or inf)")
        return mu

    def rung_at(self, offset: float) -> int:
        """The rung an offset of ``offset`` rungs from the base lands on."""
        return min(max(self.base.index + round(offset), 0), len(self.ladder) - 1)

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        with torch.no_grad():
            offset = float(self.mean_offset(context))
        return self.ladder[self.rung_at(offset)].choice()

    def draw(
        self, context: torch.Tensor, generator: torch.Generator | None = None, std: float | None = 1.0
    ) -> ToleranceChoice:
        """One draw of the offset (``std`` rungs; ``None``: 1), with the Gaussian ``log_prob`` of the
        continuous draw, differentiable in the network's parameters."""
        std = 1.0 if std is None else float(std)
        trainable = any(p.requires_grad for p in self.net.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() or trainable):
            mu = self.mean_offset(context)
            noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            value = (mu + std * noise).detach()
            log_prob = -0.5 * ((value - mu) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
        choice = self.ladder[self.rung_at(float(value))].choice()
        choice.log_prob = log_prob
        return choice

    def extra_repr(self) -> str:
        return f"base rung {self.base.index} ({self.base.setting})"
