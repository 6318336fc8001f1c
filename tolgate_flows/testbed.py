"""Fast testbeds for tolerance policies: one seeded training run of a vector CNF on a toy density.

A run is a pure function of its :class:`TestbedConfig`. The flow's initial weights come from
``seed`` and are the same in every tolerance mode (:func:`~tolgate_flows.vector_flows.build_vector_flow`
builds the fields before any gate), the batch of iteration ``i`` is drawn from ``(seed, i)``, and
the test set from a constant seed shared by every run. Runs that differ only in their tolerance
therefore see the same data (common random numbers) and are scored on the same test samples.

What :func:`run_testbed` reports (``summary.json``), and why:

* Cost of training: forward and backward NFE per iteration (summed over blocks, averaged over the
  run), and the probes' forward evaluations in training-batch equivalents
  (:attr:`~tolgate_flows.tolerance.ProbeCost.nfe_equivalent`, averaged per iteration);
  ``nfe_total`` is forward plus probes: the work the policy spends to train the flow.
* ``final_log10_tolerance``: per block, the mean log10 tolerance of the last 10% of iterations.
* ``final_train_nll``: the NLL at the training tolerance over the last 10% of iterations. A loose
  solve can flatter it; ``test_nll_at_used_tol`` (held-out set, the final training tolerance per
  block) against ``test_nll`` (same set, the fixed ``eval_tol``) shows whether it did.
* ``integral_at_used_tol`` / ``integral_at_eval_tol``: the model's density integrated over the
  testbed's box; a density solved loosely need not integrate to one.
* ``ladder_evaluation``: held-out NLL and NFE at every rung of the evaluation ladder
  (:mod:`~tolgate_flows.cheapest_eval`). ``final_settings``: each solve's last setting; in the
  ladder modes ``log.jsonl`` has ``rungs`` and ``*_at_used_tol`` is at the last rung.
* Levers (:mod:`.levers`: RNODE, solver penalties, STEER, fixed-grid training): the training loss
  adds the weighted penalties (:func:`~tolgate_flows.levers.with_penalties`) and ``log.jsonl``
  reports each penalty's value per iteration (``kinetic, jacobian, local_error, stiffness``;
  ``None`` when off); evaluation is untouched (``eval_tol`` with the adaptive ``method``, ``T =
  1``). A fixed-grid run has no training tolerance: its ``*_at_used_tol`` keys are ``None``.

Every key: ``testbed, kind, mode, estimator, seed, iterations``; ``nfe_forward, nfe_backward,
probe_nfe_equivalent, nfe_total`` (per iteration); ``final_log10_tolerance`` (per block),
``final_train_nll, final_train_cross_entropy`` (nats; ``None`` for cnf); at ``eval_tol``
``test_nll`` (``-log p(x|y)``), ``test_nll_marginal`` (``-log p(x)``), ``test_error``,
``test_nfe_forward``; at the final training tolerance ``test_nll_at_used_tol,
test_error_at_used_tol``; ``integral_at_eval_tol, integral_at_used_tol``; ``penalties``
(per penalty, its mean value per iteration over the run, ``None`` when off);
``seconds_per_iteration`` (training, probes included), ``wall_seconds`` (the whole run);
``config`` (``asdict`` of the :class:`TestbedConfig`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tolgate import (
    FixedSetting,
    FixedTolerance,
    MLPGate,
    SolverLadder,
    SolverSetting,
    TolerancePolicy,
    collect_records,
    gated_solvers,
    set_progress,
    use_policies,
)

from .cheapest_eval import RungEvaluation, evaluate_ladder
from .data import ToyData, derived_seed, toy_data
from .levers import PENALTIES, LeverConfig, PenaltyValues, check_compatible, with_penalties
from .models import ModelKind
from .tolerance import LADDER_MODES, ToleranceConfig, ToleranceLearner, make_optimizer, policy_factory, solver_ladder
from .vector_flows import VectorFlow, VectorFlowConfig, build_vector_flow, density_integral

_BATCH_STREAM = 1
_TEST_SEED = derived_seed(2, 0)  # one held-out set for every seed and every arm
_FINAL_FRACTION = 0.1


@dataclass
class TestbedConfig:
    """One run: testbed, model, optimiser and tolerance settings.

    ``testbed``: a name in :data:`~tolgate_flows.data.TESTBEDS`; ``kind``: cnf, ccnf or infocnf
    (the conditional kinds need a labelled testbed). ``lr`` is the flow's Adam step, ``gate_lr``
    the gates'. ``beta`` weighs the cross-entropy (nats) against the NLL (nats). ``eval_tol``:
    the fixed tolerance of every test solve; ``eval_size`` test samples. ``grid_points`` per
    axis of the density integral (``None``: 2000 in 1-D, 200 in 2-D: steps of 0.01 and 0.1).
    ``float64``: model and data in double precision. ``log_every``: iterations per line of
    ``log.jsonl``. ``max_num_steps``: step budget of every solve. ``adjoint``: backward pass by the
    adjoint method, ``seminorm``: with the seminorm (needs ``adjoint``). ``levers``: RNODE, solver
    penalties, STEER, fixed-grid training (:mod:`.levers`; a fixed grid needs tolerance mode fixed).
    """

    __test__ = False  # not a pytest test class, whatever its name

    testbed: str = "8gaussians"
    kind: ModelKind = "cnf"
    n_blocks: int = 2
    hidden: int = 32
    n_layers: int = 2
    batch: int = 256
    iterations: int = 1000
    lr: float = 1e-2
    gate_lr: float = 1e-2
    beta: float = 1.0
    seed: int = 0
    eval_tol: float = 1e-5
    eval_size: int = 2000
    grid_points: int | None = None
    float64: bool = False
    log_every: int = 50
    max_num_steps: int | None = 1000
    adjoint: bool = False
    seminorm: bool = False
    tolerance: ToleranceConfig = field(default_factory=ToleranceConfig)
    levers: LeverConfig = field(default_factory=LeverConfig)

    def __post_init__(self) -> None:
        data = toy_data(self.testbed)
        if self.kind != "cnf" and not data.labelled:
            raise ValueError(f"a {self.kind} model needs a labelled testbed; {self.testbed!r} has no labels")
        for name in ("batch", "iterations", "eval_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")
        FixedTolerance(self.eval_tol)  # validates it
        self.model_config()  # validates the model settings
        check_compatible(self.levers, adjoint=self.adjoint, per_sample=False, tolerance_mode=self.tolerance.mode)

    @classmethod
    def from_dict(cls, values: dict) -> TestbedConfig:
        """Inverse of ``dataclasses.asdict`` (the nested tolerance and lever settings included)."""
        values = dict(values)
        values["tolerance"] = ToleranceConfig(**values.get("tolerance", {}))
        values["levers"] = LeverConfig.from_dict(values.get("levers", {}))
        return cls(**values)

    @property
    def data(self) -> ToyData:
        return toy_data(self.testbed)

    @property
    def points_per_axis(self) -> int:
        if self.grid_points is not None:
            return self.grid_points
        return 2000 if self.data.dim == 1 else 200

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.float64 else torch.float32

    def model_config(self) -> VectorFlowConfig:
        data = self.data
        return VectorFlowConfig(
            kind=self.kind,
            dim=data.dim,
            n_classes=data.n_classes,
            n_blocks=self.n_blocks,
            hidden=self.hidden,
            n_layers=self.n_layers,
            max_num_steps=self.max_num_steps,
            adjoint=self.adjoint,
            seminorm=self.seminorm,
            levers=self.levers,
        )


@dataclass
class StepStats:
    """What one training iteration measured. NFE summed over blocks; ``log10_tolerance`` per
    block (``None`` on a fixed grid); ``nll`` and ``cross_entropy`` (``None`` for cnf) batch means
    in nats; ``penalties`` the levers' values before weighting; ``settings`` each training solve's
    solver setting (``record.setting``), before the iteration's probes moved anything."""

    nfe_forward: int
    nfe_backward: int
    probe_nfe_equivalent: float
    log10_tolerance: list[float | None]
    nll: float
    cross_entropy: float | None
    seconds: float
    penalties: PenaltyValues = field(default_factory=PenaltyValues)
    settings: list[str] = field(default_factory=list)


def batch_at(config: TestbedConfig, iteration: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training batch of ``iteration``: ``(x (batch, dim), y (batch,) or None)``, a pure
    function of ``(seed, iteration)``."""
    x, y = config.data.sample(config.batch, derived_seed(config.seed, _BATCH_STREAM, iteration))
    return x.to(config.dtype), y


def held_out_set(config: TestbedConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The held-out set: ``eval_size`` samples from a constant seed (the same for every run)."""
    x, y = config.data.sample(config.eval_size, _TEST_SEED)
    return x.to(config.dtype), y


def build(config: TestbedConfig) -> VectorFlow:
    """The run's model: seeded by ``config.seed``, eval policy ``FixedTolerance(eval_tol)``."""
    torch.manual_seed(config.seed)
    factory = policy_factory(config.tolerance, gate_net=lambda size: MLPGate(size))
    model = build_vector_flow(config.model_config(), factory, eval_policy=FixedTolerance(config.eval_tol))
    return model.to(config.dtype)


def train_step(
    model: VectorFlow,
    optimizer: torch.optim.Optimizer,
    learner: ToleranceLearner,
    policies: Sequence[TolerancePolicy],
    config: TestbedConfig,
    iteration: int,
) -> StepStats:
    """One iteration: forward, backward of the objective plus the levers' penalties (plus the
    paper estimator's surrogate, whose return sees the objective alone), the probes on the
    batch's first ``probe_size`` rows, the optimiser step."""
    start = time.perf_counter()
    x, y = batch_at(config, iteration)
    set_progress(model, iteration, iteration / config.iterations)
    model.train()
    with collect_records(model) as records:
        out = model(x, y)
    loss = model.objective(out, y, config.beta).mean()
    total, penalties = with_penalties(loss, config.levers, out.regularisers, records)
    optimizer.zero_grad(set_to_none=True)
    learner.backward(total, records, loss.detach())
    rows = config.tolerance.probe_size
    probe_x, probe_y = x[:rows], None if y is None else y[:rows]

    def probe_objective() -> torch.Tensor:
        return model.objective(model(probe_x, probe_y), probe_y, config.beta)

    cost = learner.probe(model, iteration, probe_objective, config.batch, policies)
    optimizer.step()
    cross_entropy = None if out.logits is None else float(F.cross_entropy(out.logits.detach(), y))
    return StepStats(
        nfe_forward=sum(r.nfe_forward for r in records),
        nfe_backward=sum(r.nfe_backward for r in records),
        probe_nfe_equivalent=cost.nfe_equivalent,
        log10_tolerance=[r.mean_log10_tolerance for r in records],
        nll=float(-out.log_px.detach().mean()),
        cross_entropy=cross_entropy,
        seconds=time.perf_counter() - start,
        penalties=penalties,
        settings=[r.setting for r in records],
    )


@dataclass
class HeldOutMetrics:
    """Held-out metrics at one tolerance: ``nll`` ``-log p(x|y)`` (``-log p(x)`` for cnf) and
    ``nll_marginal`` ``-log p(x)``, batch means in nats; ``error`` of the classifier (``None``
    for cnf); ``nfe_forward`` of every block together."""

    nll: float
    nll_marginal: float
    error: float | None
    nfe_forward: int


@torch.no_grad()
def evaluate(model: VectorFlow, x: torch.Tensor, y: torch.Tensor | None) -> HeldOutMetrics:
    """Eval mode, at the solvers' current tolerance (``eval_policy``, unless an override of
    :func:`tolgate.use_policies` is active). ``x``: ``(B, dim)``; ``y``: ``(B,)`` or ``None``."""
    model.eval()
    with collect_records(model) as records:
        out = model(x, y)
    return HeldOutMetrics(
        nll=float(-out.log_px.mean()),
        nll_marginal=float(-model.marginal_log_px(out).mean()),
        error=None if out.logits is None else float((out.logits.argmax(1) != y).double().mean()),
        nfe_forward=sum(r.nfe_forward for r in records),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _window(stats: Sequence[StepStats], iteration: int, ladder: SolverLadder | None = None) -> dict:
    """Means over ``stats``; ``rungs``: each solve's mean rung on ``ladder`` (the ladder modes')."""
    blocks = zip(*(s.log10_tolerance for s in stats), strict=True)
    return {
        "iteration": iteration,
        "nll": _mean([s.nll for s in stats]),
        "cross_entropy": _mean([s.cross_entropy for s in stats]),
        "nfe_forward": _mean([s.nfe_forward for s in stats]),
        "nfe_backward": _mean([s.nfe_backward for s in stats]),
        "probe_nfe_equivalent": _mean([s.probe_nfe_equivalent for s in stats]),
        "log10_tolerance": [_mean(b) for b in blocks],
        **{name: _mean([getattr(s.penalties, name) for s in stats]) for name in PENALTIES},
        "seconds_per_iteration": _mean([s.seconds for s in stats]),
        "settings": stats[-1].settings,
        "rungs": None if ladder is None else _mean_rungs(stats, ladder),
    }


@dataclass
class Training:
    """A run's trainable state: the flow, its optimiser, the tolerance learner and the gates' policies."""

    config: TestbedConfig
    model: VectorFlow
    optimizer: torch.optim.Optimizer
    learner: ToleranceLearner
    policies: list[TolerancePolicy]

    @classmethod
    def start(cls, config: TestbedConfig) -> Training:
        """The state at iteration 0 (seeds the global RNG with ``config.seed``, see :func:`build`)."""
        model = build(config)
        optimizer = make_optimizer(model, config.lr, config.gate_lr)
        learner = ToleranceLearner(config.tolerance, seed=config.seed)
        return cls(config, model, optimizer, learner, [solver.policy for solver in gated_solvers(model)])

    def step(self, iteration: int) -> StepStats:
        """One training iteration (:func:`train_step`)."""
        return train_step(self.model, self.optimizer, self.learner, self.policies, self.config, iteration)


def run_testbed(config: TestbedConfig, out_dir: str | Path) -> dict:
    """Train, evaluate, and write ``log.jsonl`` (a line per ``log_every`` iterations) and
    ``summary.json`` under ``out_dir``; return the summary (keys: see the module docstring).

    The global RNG is seeded by the run and restored afterwards."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.random.fork_rng():
        training = Training.start(config)
        ladder = solver_ladder(config.tolerance) if config.tolerance.mode in LADDER_MODES else None
        stats: list[StepStats] = []
        with (out / "log.jsonl").open("w") as log:
            for iteration in range(config.iterations):
                stats.append(training.step(iteration))
                if (iteration + 1) % config.log_every == 0 or iteration + 1 == config.iterations:
                    window = stats[-((iteration % config.log_every) + 1) :]
                    log.write(json.dumps(_window(window, iteration + 1, ladder)) + "\n")
                    log.flush()
        summary = _summarise(training.model, config, stats)
    summary["wall_seconds"] = time.perf_counter() - start
    temporary = out / "summary.json.tmp"
    temporary.write_text(json.dumps(summary, indent=1))
    temporary.replace(out / "summary.json")  # a summary on disk is a finished run
    return summary


def _mean_rungs(stats: Sequence[StepStats], ladder: SolverLadder) -> list[float | None]:
    per_solve = zip(*(s.settings for s in stats), strict=True)
    return [_mean([ladder.index(SolverSetting.parse(setting)) for setting in solve]) for solve in per_solve]


def _ladder_evaluation(model: VectorFlow, x: torch.Tensor, y: torch.Tensor | None) -> list[RungEvaluation]:
    def at_rung() -> tuple[float, float]:
        metrics = evaluate(model, x, y)
        return metrics.nll, metrics.nfe_forward

    return evaluate_ladder(model, at_rung)


def _summarise(model: VectorFlow, config: TestbedConfig, stats: Sequence[StepStats]) -> dict:
    final = _window(stats[-max(1, math.ceil(_FINAL_FRACTION * len(stats))) :], len(stats))
    run = _window(stats, len(stats))
    x, y = held_out_set(config)
    data = config.data
    at_eval = evaluate(model, x, y)
    integral_at_eval = density_integral(model, *data.box, config.points_per_axis)
    at_used: HeldOutMetrics | None = None
    integral_at_used: float | None = None
    used: dict[int, TolerancePolicy] | None = None
    if config.tolerance.mode in LADDER_MODES:  # the rung each block trained on last
        ended = [FixedSetting(SolverSetting.parse(setting)) for setting in stats[-1].settings]
        used = {id(s): policy for s, policy in zip(gated_solvers(model), ended, strict=True)}
    elif config.levers.train_method is None:  # a fixed grid in training used no tolerance
        used = {
            id(s): FixedTolerance(10.0**t) for s, t in zip(gated_solvers(model), final["log10_tolerance"], strict=True)
        }
    if used is not None:
        with use_policies(model, lambda solver: used[id(solver)]):
            at_used = evaluate(model, x, y)
            integral_at_used = density_integral(model, *data.box, config.points_per_axis)
    return {
        "testbed": config.testbed,
        "kind": config.kind,
        "mode": config.tolerance.mode,
        "estimator": config.tolerance.estimator,
        "seed": config.seed,
        "iterations": len(stats),
        "nfe_forward": run["nfe_forward"],
        "nfe_backward": run["nfe_backward"],
        "probe_nfe_equivalent": run["probe_nfe_equivalent"],
        "nfe_total": run["nfe_forward"] + run["probe_nfe_equivalent"],
        "final_log10_tolerance": final["log10_tolerance"],
        "final_settings": final["settings"],
        "final_train_nll": final["nll"],
        "final_train_cross_entropy": final["cross_entropy"],
        "test_nll": at_eval.nll,
        "test_nll_marginal": at_eval.nll_marginal,
        "test_error": at_eval.error,
        "test_nfe_forward": at_eval.nfe_forward,
        "test_nll_at_used_tol": None if at_used is None else at_used.nll,
        "test_error_at_used_tol": None if at_used is None else at_used.error,
        "integral_at_eval_tol": integral_at_eval,
        "integral_at_used_tol": integral_at_used,
        "penalties": {name: run[name] for name in PENALTIES},
        "ladder_evaluation": [e.as_dict() for e in _ladder_evaluation(model, x, y)],
        "seconds_per_iteration": run["seconds_per_iteration"],
        "config": asdict(config),
    }
