"""Probes: the same batch re-solved at other tolerances, on common random numbers, without grad.

A probe answers "what would this batch's objective have been at that tolerance?" with everything
else held fixed: the same samples, the same Hutchinson noise (the global RNG is forked and seeded
identically for every probe of a batch; gate draws use their own generators) and no dropout
(modules in eval mode). Differences between probes are then the solver's doing alone, which is
what both tolerance learners here need:

* :func:`calibrate` drives the deterministic :class:`~tolgate.policies.NoiseMatchedTolerance`.
* :class:`ProbedGateEstimator` is the low-variance REINFORCE estimator for Gaussian gates.

Quality is measured against a tight *reference* solve of the same probe, never by the objective
at the sampled tolerance itself: a loose solve can flatter the objective (the density of a flow
solved loosely need not integrate to one), and an estimator rewarded by that objective learns to
loosen for it. See docs/tolgate.md, "An honest return", for the derivation.

The objective is a closure ``() -> (batch,)`` tensor of per-sample losses (e.g. bits/dim plus
beta times cross-entropy of each sample of a probe subsample); it runs the model's forward pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .ladder import LadderGate
from .policies import FixedTolerance, GaussianGate, NoiseMatchedTolerance, Progress, ToleranceChoice, TolerancePolicy
from .records import SolveRecord
from .reinforce import leave_one_out_loss
from .scopes import collect_records, use_policies
from .solver import gated_solvers

Objective = Callable[[], torch.Tensor]


@dataclass
class Probe:
    """One probe: ``objective`` ``(batch,)`` (float64, detached), the solves it made, in order,
    and the same solves per solver of the module (in :func:`~tolgate.gated_solvers` order)."""

    objective: torch.Tensor
    records: list[SolveRecord]
    records_by_solver: list[list[SolveRecord]] = field(default_factory=list)

    @property
    def nfe_forward(self) -> int:
        """Evaluations of every solve of the probe together."""
        return sum(r.nfe_forward for r in self.records)

    def error_against(self, reference: Probe) -> float:
        """Solver error of this probe's objective: ``mean_i |L_i - L_i(reference)|``. The mean of
        absolute per-sample errors bounds the error of the batch mean and cannot cancel."""
        return float((self.objective - reference.objective).abs().mean())


def minibatch_noise(reference: Probe, batch_size: int) -> float:
    """Standard error of a training minibatch's mean objective, ``std(L) / sqrt(batch_size)``,
    estimated from the reference probe's per-sample objective."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if reference.objective.numel() < 2:
        raise ValueError("a probe needs at least 2 samples to estimate the minibatch noise")
    return float(reference.objective.std()) / math.sqrt(batch_size)


@contextlib.contextmanager
def _common_noise(seed: int, device: torch.device) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def run_probe(
    module: nn.Module,
    objective: Objective,
    policy_for: Callable[[nn.Module], TolerancePolicy],
    noise_seed: int,
) -> Probe:
    """Evaluate ``objective()`` under ``no_grad`` in eval mode, every solver of ``module`` at
    ``policy_for(solver)``, the global RNG seeded with ``noise_seed`` (restored afterwards)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with (
        torch.no_grad(),
        _eval_mode(module),
        use_policies(module, policy_for),
        collect_records(module) as records,
        contextlib.ExitStack() as per_solver,
        _common_noise(noise_seed, device),
    ):
        by_solver = [per_solver.enter_context(collect_records(solver)) for solver in gated_solvers(module)]
        values = objective()
    if values.dim() != 1:
        raise ValueError(
            f"a probe objective must return per-sample losses of shape (batch,), got {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()):
        raise ValueError("the probe objective is NaN or infinite: cannot measure the solver error")
    return Probe(values.detach().to(torch.float64), list(records), [list(solves) for solves in by_solver])


def reference_probe(module: nn.Module, objective: Objective, tolerance: float, noise_seed: int) -> Probe:
    """Every solve at the fixed ``tolerance`` (the tight reference)."""
    fixed = FixedTolerance(tolerance)
    return run_probe(module, objective, lambda solver: fixed, noise_seed)


@dataclass
class Calibration:
    """What :func:`calibrate` measured. Errors and noise in the objective's units."""

    tolerance_before: float
    tolerance_after: float
    error_current: float
    error_looser: float
    noise: float
    nfe_forward: int
    rows: int


def calibrate(
    policy: NoiseMatchedTolerance,
    module: nn.Module,
    objective: Objective,
    noise_seed: int,
    batch_size: int,
    reference_tol: float = 1e-5,
) -> Calibration:
    """One update of a :class:`NoiseMatchedTolerance` from three probes of the same batch: the
    reference at ``reference_tol``, the current tolerance and the next looser one.

    ``batch_size``: the *training* minibatch size (the noise SGD already tolerates). The probes'
    cost is in ``nfe_forward`` (evaluations on ``rows`` samples each), for honest accounting.
    """
    before = policy.current
    reference = reference_probe(module, objective, reference_tol, noise_seed)
    current = reference_probe(module, objective, before, noise_seed)
    looser = reference_probe(module, objective, policy.looser, noise_seed)
    noise = minibatch_noise(reference, batch_size)
    error_current, error_looser = current.error_against(reference), looser.error_against(reference)
    after = policy.update(error_current, error_looser, noise)
    return Calibration(
        tolerance_before=before,
        tolerance_after=after,
        error_current=error_current,
        error_looser=error_looser,
        noise=noise,
        nfe_forward=reference.nfe_forward + current.nfe_forward + looser.nfe_forward,
        rows=int(reference.objective.numel()),
    )


class _SeededDraw(TolerancePolicy):
    """A gate's draw (a :class:`GaussianGate`'s tolerance, a :class:`~tolgate.ladder.LadderGate`'s
    rung) from its own generator, with a differentiable ``log_prob`` even under the
    probe's ``no_grad``; other policies pass through unchanged."""

    def __init__(self, policy: TolerancePolicy, generator: torch.Generator, std: float | None) -> None:
        super().__init__()
        self.policy, self.generator, self.std = policy, generator, std

    def forward(self, context: torch.Tensor, progress: Progress) -> ToleranceChoice:
        if isinstance(self.policy, (GaussianGate, LadderGate)):
            with torch.enable_grad():
                return self.policy.draw(context, self.generator, self.std)
        return self.policy(context, progress)


@dataclass
class GateProbeReport:
    """What one :meth:`ProbedGateEstimator.loss` measured, per draw ``k`` and solve ``i``."""

    log10_tolerance: torch.Tensor  # (draws, solves) drawn log10 tolerances (batch-mean per-sample; NaN on a grid)
    nfe_forward: torch.Tensor  # (draws, solves)
    nfe_reference: torch.Tensor  # (solves,) at the reference tolerance
    error: torch.Tensor  # (draws,) solver error of the objective against the reference
    budget: float  # fraction * minibatch noise
    penalty: float  # the multiplier after this call
    rewards: torch.Tensor  # (draws, solves)
    probe_nfe_forward: int  # every evaluation the probes made (reference and draws)
    rows: int  # samples per probe


class ProbedGateEstimator:
    """Low-variance REINFORCE for :class:`~tolgate.policies.GaussianGate` tolerances.

    Per call, on one probe batch and common random numbers: a reference solve at
    ``reference_tol`` and ``draws`` joint draws of every gate. Draw ``k`` of solve ``i`` earns

        R_ki = -NFE_ki / NFE_i(ref)  -  penalty * max(0, err_k / budget - 1)

    where ``err_k = mean_b |L_b(g_k) - L_b(ref)|`` is the solver error of the objective and
    ``budget = fraction * std(L(ref)) / sqrt(batch_size)`` a fraction of the training minibatch's
    own noise. The first term is the paper's ``-NFE`` reward, made unit-free per solve; the second
    replaces the paper's ``-L`` in the return by the *change* in ``L`` that the tolerance caused,
    measured against a reference, so solver error that flatters ``L`` is penalised, never
    rewarded, and the batch-to-batch noise of ``L`` (common to every draw of one batch) is gone
    from the return. The score-function surrogate uses the leave-one-out baseline over the draws
    (:func:`tolgate.reinforce.leave_one_out_loss`), which is unbiased and needs no running state.

    ``penalty`` is a Lagrange multiplier of the constraint ``E[err] <= budget`` when
    ``multiplier_lr > 0``: after every call it takes a dual-ascent step
    ``penalty <- clip(penalty + multiplier_lr * (mean_k err_k / budget - 1), 0, max_penalty)``, so
    it grows while the draws break the budget and decays to 0 while they keep well inside it, where
    the return is the NFE alone. A fixed penalty (``multiplier_lr = 0``) keeps the mean on the safe
    side of the budget's edge by a margin set by the exploration spread (the hinge is convex);
    the multiplier lets the mean settle at the edge.

    Draws are ``N(mu, exploration_std^2)`` in ``log10`` units around each gate's mean (``None``:
    the gate's own sigma). The gate acts at its mean, so the spread is only the smoothing width of
    the gradient estimate; a learned one collapses, because the NFE is a step function of the
    tolerance and draws narrower than one step all cost the same.
    """

    def __init__(
        self,
        draws: int = 4,
        reference_tol: float = 1e-5,
        fraction: float = 0.1,
        penalty: float = 1.0,
        exploration_std: float | None = 0.3,
        multiplier_lr: float = 0.0,
        max_penalty: float = 100.0,
    ) -> None:
        if exploration_std is not None and not (math.isfinite(exploration_std) and exploration_std > 0):
            raise ValueError(f"exploration_std must be finite and > 0 (decades) or None, got {exploration_std!r}")
        if not isinstance(draws, int) or draws < 2:
            raise ValueError(f"draws must be an int >= 2 (the leave-one-out baseline needs two), got {draws!r}")
        FixedTolerance(reference_tol)  # validates it
        if not (math.isfinite(fraction) and fraction > 0):
            raise ValueError(f"fraction must be finite and > 0, got {fraction!r}")
        if not (math.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"penalty must be finite and >= 0, got {penalty!r}")
        self.draws, self.reference_tol, self.fraction, self.penalty = draws, reference_tol, fraction, penalty
        for value, name in ((multiplier_lr, "multiplier_lr"), (max_penalty, "max_penalty")):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        self.exploration_std, self.multiplier_lr, self.max_penalty = exploration_std, multiplier_lr, max_penalty

    def loss(
        self, module: nn.Module, objective: Objective, noise_seed: int, batch_size: int
    ) -> tuple[torch.Tensor, GateProbeReport]:
        """The surrogate (shape ``()``, gradient only in the gates) and what the probes measured;
        with ``multiplier_lr > 0`` also one dual step of ``penalty``.

        ``noise_seed`` seeds the probes' Hutchinson noise and, derived from it, each draw's gate
        generator; ``batch_size`` is the training minibatch size."""
        reference = reference_probe(module, objective, self.reference_tol, noise_seed)
        budget = self.fraction * minibatch_noise(reference, batch_size)
        probes = [self._draw(module, objective, noise_seed, k) for k in range(self.draws)]
        nfe_reference = torch.tensor([float(r.nfe_forward) for r in reference.records], dtype=torch.float64)
        nfe = torch.tensor([[float(r.nfe_forward) for r in p.records] for p in probes], dtype=torch.float64)
        error = torch.tensor([p.error_against(reference) for p in probes], dtype=torch.float64)
        over_budget = (error / budget - 1.0).clamp(min=0.0) if budget > 0 else (error > 0).to(torch.float64)
        rewards = -nfe / nfe_reference - self.penalty * over_budget[:, None]
        surrogate = self._surrogate(probes, rewards)
        if self.multiplier_lr > 0 and budget > 0:  # dual ascent on E[err] <= budget
            step = self.multiplier_lr * (float((error / budget).mean()) - 1.0)
            self.penalty = min(max(self.penalty + step, 0.0), self.max_penalty)
        report = GateProbeReport(
            log10_tolerance=torch.tensor([[_log10_or_nan(r) for r in p.records] for p in probes], dtype=torch.float64),
            nfe_forward=nfe,
            nfe_reference=nfe_reference,
            error=error,
            budget=budget,
            rewards=rewards,
            penalty=self.penalty,
            probe_nfe_forward=reference.nfe_forward + sum(p.nfe_forward for p in probes),
            rows=int(reference.objective.numel()),
        )
        return surrogate, report

    def _draw(self, module: nn.Module, objective: Objective, noise_seed: int, k: int) -> Probe:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        generator = torch.Generator(device=device).manual_seed((noise_seed * 7919 + 104729 * (k + 1)) % (2**63))
        return run_probe(
            module, objective, lambda solver: _SeededDraw(solver.policy, generator, self.exploration_std), noise_seed
        )

    @staticmethod
    def _surrogate(probes: list[Probe], rewards: torch.Tensor) -> torch.Tensor:
        learned = [i for i, r in enumerate(probes[0].records) if r.log_prob is not None and r.log_prob.requires_grad]
        if not learned:
            return torch.zeros((), dtype=torch.float64)
        log_probs = torch.stack([torch.stack([p.records[i].log_prob.mean() for i in learned]) for p in probes])
        return leave_one_out_loss(log_probs, rewards[:, learned].to(log_probs.dtype))


def _log10_or_nan(record: SolveRecord) -> float:
    value = record.mean_log10_tolerance
    return math.nan if value is None else value
