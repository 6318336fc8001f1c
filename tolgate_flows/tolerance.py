"""How a training run chooses and learns its ODE tolerances: one place for every mode.

Modes (``TOLERANCE_MODES``):

* ``fixed``, ``scheduled``: the tolerance is given (a constant, or log-linear over the epochs).
* ``learned``: a :class:`~tolgate.GaussianGate` per block, trained by one of two estimators:
  ``probe`` (default; :class:`tolgate.ProbedGateEstimator`: several draws on a probe of the same
  batch, common random numbers, leave-one-out baseline, quality measured against a tight
  reference solve; the gate *acts* at its mean) or ``paper`` (Eq. 7 on the training solve
  itself: one draw per block per batch, return ``-(L - alpha/N sum NFE)``).
* ``frozen``: the same gates, never trained (the ablation "learned or merely looser?").
* ``gate-mean``: a fixed tolerance per block at a learned run's gate means (the other ablation).
* ``adaptive``: :class:`tolgate.NoiseMatchedTolerance`, one tolerance for every block, moved by
  :func:`tolgate.calibrate` to the loosest one whose solver error stays below a fraction of the
  minibatch noise. Deterministic, no RL.
* ``auto``: a :class:`tolgate.LadderPolicy` per block on a cost ladder of tolerances *and* fixed
  grids (``ladder``; default dopri5 at every decade from ``tolerance_low`` to ``tolerance_high``,
  then RK4 with 8, 6, 4, 3, 2, 1 steps), moved by :func:`tolgate.climb`: a block goes down only while
  the solver error of the objective against a dopri5 reference at ``reference_tol`` stays within
  ``budget_fraction`` of the minibatch noise, and back up as soon as a check fails. No step or
  tolerance is set by hand.
* ``auto-learned``: the same automatic rungs, with a :class:`tolgate.LadderGate` per block that
  learns departures from them (the probe estimator, draws ``ladder_exploration_std`` rungs wide).

:class:`ToleranceLearner` is what a training loop calls: :meth:`~ToleranceLearner.backward`
replaces ``loss.backward()``, :meth:`~ToleranceLearner.probe` runs after it every
``probe_every`` steps. Probe cost is returned, so runs can report it next to the training NFE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tolgate import (
    FixedTolerance,
    GaussianGate,
    LadderGate,
    LadderPolicy,
    NoiseMatchedTolerance,
    ProbedGateEstimator,
    RunningMeanBaseline,
    ScheduledTolerance,
    SolveRecord,
    SolverLadder,
    SolverSetting,
    TolerancePolicy,
    calibrate,
    climb,
    reinforce_loss,
)
from tolgate.probes import Objective

TOLERANCE_MODES = ("fixed", "scheduled", "learned", "frozen", "gate-mean", "adaptive", "auto", "auto-learned")
#: the modes that climb the ladder of solver settings
LADDER_MODES = ("auto", "auto-learned")
ESTIMATORS = ("probe", "paper")
# (block index, gate input size: channels or features) -> that block's policy.
PolicyFactory = Callable[[int, int], TolerancePolicy]


@dataclass
class ToleranceConfig:
    """Every knob of the tolerance side of a run (see the module docstring for the modes).

    ``train_tol``: the fixed tolerance, and where schedules, gates and the adaptive policy start.
    ``alpha``, ``baseline_momentum``, ``reward_loss_weight``, ``reward_backward_nfe``: the paper
    estimator's Eq. 6-7 settings. ``probe_*``, ``budget_fraction``, ``penalty``: the probe
    estimator's and the adaptive policy's; ``reference_tol`` is their tight reference solve;
    ``exploration_std`` the probe estimator's spread of draws around each gate's mean (decades);
    ``penalty`` the initial Lagrange multiplier of its solver-error budget and ``multiplier_lr``
    the multiplier's dual-ascent step (0: a fixed penalty). ``ladder``: the ``auto`` mode's rungs,
    expensive to cheap, as ``method:tolerance`` or ``method:steps`` (``None``: the default ladder,
    see the module docstring); every block starts at dopri5 ``train_tol``.
    ``ladder_exploration_std``: ``auto-learned``'s spread of gate draws around the gate's mean, in rungs.
    """

    mode: str = "fixed"
    train_tol: float = 1e-5
    schedule_end_tol: float = 1e-4
    epochs: int = 1
    gate_mean_log10: list[float] | None = None
    per_sample: bool = False
    estimator: str = "probe"
    alpha: float = 0.01
    baseline_momentum: float = 0.9
    reward_loss_weight: float = 1.0
    reward_backward_nfe: bool = False
    probe_every: int = 10
    probe_size: int = 32
    probe_draws: int = 4
    budget_fraction: float = 0.1
    penalty: float = 1.0
    multiplier_lr: float = 0.0
    exploration_std: float = 0.3
    reference_tol: float = 1e-5
    adaptive_step: float = 0.5
    tolerance_low: float = 1e-8
    tolerance_high: float = 1e-1
    ladder: list[str] | None = None
    ladder_exploration_std: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in TOLERANCE_MODES:
            raise ValueError(f"tolerance mode must be one of {TOLERANCE_MODES}, got {self.mode!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.mode == "gate-mean" and not self.gate_mean_log10:
            raise ValueError("tolerance 'gate-mean' needs gate_mean_log10 (per block), e.g. from --gate-mean-from")
        for name in ("train_tol", "schedule_end_tol", "reference_tol", "tolerance_low", "tolerance_high"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if not self.tolerance_low <= self.train_tol <= self.tolerance_high:
            raise ValueError(
                f"train_tol {self.train_tol!r} must lie in [tolerance_low, tolerance_high] = "
                f"[{self.tolerance_low!r}, {self.tolerance_high!r}]"
            )
        for name, least in (("probe_every", 1), ("probe_size", 2), ("probe_draws", 2), ("epochs", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("alpha", "penalty", "multiplier_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        for name in ("budget_fraction", "adaptive_step", "exploration_std", "ladder_exploration_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if self.mode in LADDER_MODES:
            if self.per_sample:
                raise ValueError(
                    f"tolerance mode {self.mode!r} climbs a ladder with fixed-grid rungs, which the per-sample backend "
                    "cannot solve: use the torchdiffeq backend"
                )
            ladder = solver_ladder(self)
            if self.start_setting not in ladder.settings:
                raise ValueError(f"auto mode starts at {self.start_setting}, which is not on the ladder {ladder}")

    @property
    def start_setting(self) -> SolverSetting:
        """Where every block of the ``auto`` mode starts: dopri5 at ``train_tol``."""
        return SolverSetting("dopri5", tolerance=self.train_tol)

    @property
    def reference_setting(self) -> SolverSetting:
        """The probes' tight reference (and the evaluation protocol): dopri5 at ``reference_tol``."""
        return SolverSetting("dopri5", tolerance=self.reference_tol)

    @property
    def probes(self) -> bool:
        """Does this configuration run probes (probe estimator or adaptive policy)?"""
        return self.mode in ("adaptive", *LADDER_MODES) or (self.mode == "learned" and self.estimator == "probe")


def solver_ladder(config: ToleranceConfig) -> SolverLadder:
    """The ``auto`` mode's ladder: ``config.ladder`` read rung by rung, or the default: dopri5 at
    every decade from ``tolerance_low`` to ``tolerance_high`` (and at ``train_tol``), then RK4
    with 8, 6, 4, 3, 2 and 1 steps."""
    if config.ladder is not None:
        return SolverLadder([SolverSetting.parse(text) for text in config.ladder])
    low, high = math.ceil(math.log10(config.tolerance_low) - 1e-9), math.floor(math.log10(config.tolerance_high) + 1e-9)
    tolerances = {10.0**k for k in range(low, high + 1)} | {config.train_tol}
    return SolverLadder.default(tolerances=sorted(tolerances))


def policy_factory(config: ToleranceConfig, gate_net: Callable[[int], nn.Module]) -> PolicyFactory:
    """``(block_index, gate_input_size) -> TolerancePolicy`` for ``config.mode``; ``gate_net(size)``
    builds a gate network (e.g. ``ConvGate`` for images, ``MLPGate`` for vectors)."""
    # One adaptive policy for every block: it is shared state, a single tolerance.
    adaptive = NoiseMatchedTolerance(
        initial=config.train_tol,
        low=config.tolerance_low,
        high=config.tolerance_high,
        step=config.adaptive_step,
        fraction=config.budget_fraction,
    )

    def make(index: int, size: int) -> TolerancePolicy:
        if config.mode == "fixed":
            return FixedTolerance(config.train_tol)
        if config.mode == "scheduled":
            return ScheduledTolerance.log_linear(config.train_tol, config.schedule_end_tol, config.epochs, "epoch")
        if config.mode == "gate-mean":
            if index >= len(config.gate_mean_log10):
                raise ValueError(f"gate_mean_log10 has {len(config.gate_mean_log10)} entries; block {index} has none")
            return FixedTolerance(10.0 ** config.gate_mean_log10[index])
        if config.mode == "adaptive":
            return adaptive
        if config.mode in LADDER_MODES:
            automatic = LadderPolicy(solver_ladder(config), start=config.start_setting)
            return automatic if config.mode == "auto" else LadderGate(automatic, gate_net(size))
        gate = GaussianGate(
            gate_net(size),
            low=config.tolerance_low,
            high=config.tolerance_high,
            initial_log10=math.log10(config.train_tol),
            reduction="none" if config.per_sample else "mean",
            explore=not (config.mode == "learned" and config.estimator == "probe"),
        )
        return gate.freeze() if config.mode == "frozen" else gate

    return make


@dataclass
class ProbeCost:
    """What a step's probes measured and cost. ``nfe_forward``: evaluations on ``rows`` samples
    each; ``nfe_equivalent``: the same work in evaluations of a full training batch."""

    nfe_forward: int = 0
    rows: int = 0
    nfe_equivalent: float = 0.0
    error: float | None = None
    budget: float | None = None
    tolerance: float | None = None
    settings: list[str] | None = None


class ToleranceLearner:
    """The tolerance side of a training step, per :class:`ToleranceConfig`."""

    def __init__(self, config: ToleranceConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.baseline = RunningMeanBaseline(config.baseline_momentum)
        # auto-learned's gates draw whole rungs; the tolerance gates draw decades
        spread = config.ladder_exploration_std if config.mode == "auto-learned" else config.exploration_std
        self.estimator = ProbedGateEstimator(
            draws=config.probe_draws,
            reference_tol=config.reference_tol,
            fraction=config.budget_fraction,
            penalty=config.penalty,
            exploration_std=spread,
            multiplier_lr=config.multiplier_lr,
        )

    @property
    def paper_estimator(self) -> bool:
        return self.config.mode == "learned" and self.config.estimator == "paper"

    def backward(self, loss: torch.Tensor, records: Sequence[SolveRecord], reward_loss: torch.Tensor) -> None:
        """``loss.backward()``, plus the paper's REINFORCE surrogate (Eq. 7) when that estimator
        is on. ``reward_loss``: the task loss as the return sees it (detached; a scalar, or
        ``(batch,)`` for per-sample credit)."""
        if not self.paper_estimator:
            loss.backward()
            return
        reward_loss = self.config.reward_loss_weight * reward_loss.detach()
        if self.config.reward_backward_nfe:  # backward NFE exist only after the first backward
            loss.backward()
            reinforce_loss(records, reward_loss, self.config.alpha, self.baseline, include_backward=True).backward()
        else:
            (loss + reinforce_loss(records, reward_loss, self.config.alpha, self.baseline)).backward()

    def probe(
        self, model: nn.Module, step: int, objective: Objective, batch_size: int, policies: Sequence[TolerancePolicy]
    ) -> ProbeCost:
        """Every ``probe_every`` steps: calibrate the adaptive policy, or add the probe
        estimator's gradient to the gates' ``.grad``. Call after :meth:`backward`, before the
        optimiser step. ``objective``: per-sample objective of the probe rows; ``batch_size``:
        the training minibatch's; ``policies``: the model's solvers' policies."""
        if not self.config.probes or step % self.config.probe_every != 0:
            return ProbeCost()
        noise_seed = (self.seed * 1_000_003 + step) % (2**31)
        if self.config.mode in LADDER_MODES:
            climbed = climb(
                model,
                objective,
                noise_seed,
                batch_size,
                reference=self.config.reference_setting,
                fraction=self.config.budget_fraction,
                turn=step // self.config.probe_every,
            )
            nfe, rows = climbed.nfe_forward, climbed.rows
            if self.config.mode == "auto-learned":  # then the gates learn departures from the new rungs
                surrogate, probe_report = self.estimator.loss(model, objective, noise_seed, batch_size)
                surrogate.backward()
                nfe += probe_report.probe_nfe_forward
            return ProbeCost(
                nfe, rows, nfe * rows / batch_size, climbed.error, climbed.budget, settings=climbed.settings_after
            )
        if self.config.mode == "adaptive":
            policy = next(p for p in policies if isinstance(p, NoiseMatchedTolerance))
            report = calibrate(policy, model, objective, noise_seed, batch_size, self.config.reference_tol)
            error, budget, tolerance = report.error_current, policy.fraction * report.noise, report.tolerance_after
            nfe, rows = report.nfe_forward, report.rows
        else:
            surrogate, probe_report = self.estimator.loss(model, objective, noise_seed, batch_size)
            surrogate.backward()
            error, budget = float(probe_report.error.mean()), probe_report.budget
            tolerance = 10.0 ** float(probe_report.log10_tolerance.mean())
            nfe, rows = probe_report.probe_nfe_forward, probe_report.rows
        return ProbeCost(nfe, rows, nfe * rows / batch_size, error, budget, tolerance)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline.state_dict(), "penalty": self.estimator.penalty}

    def load_state_dict(self, state: dict) -> None:
        self.baseline.load_state_dict(state["baseline"])
        self.estimator.penalty = float(state.get("penalty", self.config.penalty))


def make_optimizer(model: nn.Module, lr: float, gate_lr: float) -> torch.optim.Adam:
    """Adam over the trainable parameters; the gates' in their own group at ``gate_lr``: the
    policy's step size is a separate choice from the flow's (its signal is much noisier)."""
    gate_ids = {id(p) for m in model.modules() if isinstance(m, (GaussianGate, LadderGate)) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in gate_ids], "lr": lr}]
    gates = [p for p in trainable if id(p) in gate_ids]
    if gates:
        groups.append({"params": gates, "lr": gate_lr})
    return torch.optim.Adam(groups)
