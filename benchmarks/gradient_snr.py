"""Issue 9: the signal-to-noise ratio of the gate gradient, paper estimator (Eq. 7) against the probe estimator.

At one fixed model state (a vector CNF of :mod:`tolgate_flows.testbed`, its flow trained for
``warmup_iterations`` at a fixed 1e-5 while its Gaussian gates stay at their initialisation:
``log10(rtol) ~ N(-5, 0.5^2)``), each estimator produces ``repeats`` independent estimates of the
gradient of its surrogate with respect to every gate's parameters, one fresh training batch each,
with no optimiser step in between (``torch.autograd.grad``: nothing accumulates in ``.grad``):

* ``paper``: :func:`tolgate.reinforce_loss` on the training solve itself (train mode, the gates
  draw one tolerance per block per batch), return ``-(L - alpha/N sum NFE)`` with a
  :class:`tolgate.RunningMeanBaseline` warmed up on ``baseline_batches`` batches first and updated
  by every estimate, as it is in training.
* ``probe-K``: :meth:`tolgate.ProbedGateEstimator.loss` with ``K`` draws on the batch's first
  ``probe_rows`` rows (a reference solve plus ``K`` draws, common random numbers, leave-one-out
  baseline), for each ``K`` in ``draws``. A round gives every ``K`` the same noise seed, and a
  draw's generator depends on the seed and its index only, so ``probe-2``'s draws are the first two
  of ``probe-4``'s: the ``K`` compare on common random numbers.

The two surrogates are gradients of *different* objectives (the paper's ``L + alpha * mean NFE``;
the probe's ``NFE / NFE_ref`` plus a penalty on solver error over budget), so their means are not
comparable; the SNR is scale-free and says how many estimates it takes to know the direction.

Per gate, on the component along the gate's mean (``net.head.bias[0]``: it shifts ``mu`` of
``log10 rtol`` one for one) and on the whole flattened gate gradient ``g`` (``(R, P)``):

* ``snr = ||mean||^2 / trace(cov)``: the SNR of *one* estimate (the mean of ``m`` estimates has
  ``m`` times it). Its sample value is biased up by about ``1/R`` (``E||mean_hat||^2 = ||mu||^2 +
  trace(cov)/R``): ``snr_debiased = max(0, snr - 1/R)`` removes that, ``noise_floor = 1/R`` is what
  an estimator with no signal at all reads, and ``snr_ci95`` is a bootstrap interval over the ``R``.
* ``sign_agreement``: the fraction of estimates whose bias component has the sign of the mean (for
  the whole vector: a positive inner product with the mean of the *other* estimates);
  ``sign_agreement_gaussian = Phi(sqrt(snr))`` is what Gaussian noise at that SNR would give.
* cost per estimate: forward evaluations, the rows each evaluation carried, the same work in
  evaluations of a full training batch (``nfe * rows / batch``), and wall seconds. Estimators run
  interleaved on the same batches, so the machine's load falls on all of them alike. The paper
  estimator's evaluations are the training solve itself (no work beyond training); the probe
  estimator's are extra.

    python benchmarks/gradient_snr.py --repeats 80           # the committed run: 12 min on 2 busy cores
    python benchmarks/gradient_snr.py --quick --out /tmp/snr # a smoke: R = 5, short warm-up (~30 s)

Writes ``<out>/summary.json`` (default docs/results/gradient_snr) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tolgate import (
    FixedTolerance,
    GaussianGate,
    ProbedGateEstimator,
    RunningMeanBaseline,
    collect_records,
    gated_solvers,
    reinforce_loss,
    use_policies,
)
from tolgate_flows.data import derived_seed
from tolgate_flows.testbed import TestbedConfig, batch_at, build, train_step
from tolgate_flows.tolerance import ToleranceConfig, ToleranceLearner
from tolgate_flows.vector_flows import VectorFlow

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "gradient_snr"
# The model settings of benchmarks/learned_tolerance.py's TESTBED_PRESETS for these two testbeds.
PRESETS: dict[str, dict] = {
    "8gaussians": {"testbed": "8gaussians", "kind": "cnf", "n_blocks": 2, "hidden": 32, "batch": 256},
    "1d": {"testbed": "1d", "kind": "cnf", "n_blocks": 1, "hidden": 64, "batch": 512, "float64": True},
}
PAPER = "paper"
_PAPER_STREAM, _PROBE_STREAM, _BOOTSTRAP_STREAM = 7, 8, 9


@dataclass
class SNRSettings:
    """One measurement. ``testbed``: a key of :data:`PRESETS`; ``model``: overrides of its
    :class:`~tolgate_flows.testbed.TestbedConfig` settings (tests shrink the model with it).

    ``repeats`` estimates per estimator; ``warmup_iterations`` of flow training at
    ``warmup_tol`` first; ``baseline_batches`` paper estimates to warm the running baseline.
    ``alpha``, ``baseline_momentum``: Eq. 7's price per evaluation and the baseline's momentum.
    ``draws``, ``probe_rows``, ``reference_tol``, ``fraction``, ``penalty``: the probe estimator's.
    ``bootstrap``: resamples for the SNR's confidence interval.
    """

    testbed: str = "8gaussians"
    repeats: int = 100
    warmup_iterations: int = 200
    warmup_tol: float = 1e-5
    baseline_batches: int = 20
    alpha: float = 0.01
    baseline_momentum: float = 0.9
    draws: tuple[int, ...] = (2, 4, 8)
    probe_rows: int = 64
    reference_tol: float = 1e-5
    fraction: float = 0.1
    penalty: float = 1.0
    seed: int = 0
    bootstrap: int = 1000
    model: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.testbed not in PRESETS:
            raise ValueError(f"testbed must be one of {tuple(PRESETS)}, got {self.testbed!r}")
        for name, least in (
            ("repeats", 3),
            ("warmup_iterations", 0),
            ("baseline_batches", 1),
            ("probe_rows", 2),
            ("bootstrap", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not self.draws:
            raise ValueError("draws must name at least one K for the probe estimator")
        self.draws = tuple(self.draws)
        for k in self.draws:
            ProbedGateEstimator(k, self.reference_tol, self.fraction, self.penalty)  # validates them
        if self.probe_rows > self.testbed_config().batch:
            raise ValueError(f"probe_rows {self.probe_rows} exceeds the batch {self.testbed_config().batch}")

    def testbed_config(self) -> TestbedConfig:
        """The model: the preset, ``model`` overrides, gates that explore (paper estimator) from 1e-5."""
        tolerance = ToleranceConfig(
            mode="learned",
            estimator="paper",
            train_tol=1e-5,
            alpha=self.alpha,
            baseline_momentum=self.baseline_momentum,
        )
        return TestbedConfig(**{**PRESETS[self.testbed], **self.model}, seed=self.seed, tolerance=tolerance)

    @property
    def estimators(self) -> list[str]:
        return [PAPER] + [f"probe-{k}" for k in self.draws]


@dataclass
class Estimate:
    """One gradient estimate. ``gradients``: per gate, the flattened gradient ``(P_g,)`` of the
    surrogate in the gate's parameters (float64); ``bias``: per gate, its ``head.bias[0]``
    component. ``nfe_forward``: evaluations made to produce it, each on ``rows`` samples;
    ``seconds``: wall time; ``log10_tolerance``: per gate, the tolerance drawn (mean over draws);
    ``extra``: estimator-specific numbers (task loss, error over budget)."""

    gradients: list[torch.Tensor]
    bias: list[float]
    nfe_forward: int
    rows: int
    seconds: float
    log10_tolerance: list[float]
    extra: dict[str, float] = field(default_factory=dict)


def gates_of(model: VectorFlow) -> list[GaussianGate]:
    """Every solver's Gaussian gate, in block order."""
    gates = [solver.policy for solver in gated_solvers(model)]
    if not all(isinstance(g, GaussianGate) for g in gates):
        raise TypeError(f"every solver needs a GaussianGate policy, got {[type(g).__name__ for g in gates]}")
    return gates


def _mean_bias_index(gate: GaussianGate) -> int:
    """Position of ``net.head.bias[0]`` (the entry that shifts ``mu``) in the flattened parameters."""
    head = getattr(gate.net, "head", None)
    if head is None or not isinstance(getattr(head, "bias", None), torch.Tensor):
        raise TypeError(f"the gate network {type(gate.net).__name__} has no linear head with a bias")
    offset = 0
    for p in gate.parameters():
        if p is head.bias:
            return offset
        offset += p.numel()
    raise ValueError("the gate's head bias is not among its parameters")


def _gate_gradients(surrogate: torch.Tensor, gates: list[GaussianGate]) -> list[torch.Tensor]:
    """Per gate, ``d surrogate / d parameters`` flattened to ``(P_g,)``, float64; zeros where unused."""
    params = [list(g.parameters()) for g in gates]
    flat = [p for ps in params for p in ps]
    grads = torch.autograd.grad(surrogate, flat, allow_unused=True) if surrogate.requires_grad else [None] * len(flat)
    out, at = [], 0
    for ps in params:
        pieces = [
            (torch.zeros_like(p) if g is None else g).detach().double().reshape(-1)
            for p, g in zip(ps, grads[at : at + len(ps)], strict=True)
        ]
        out.append(torch.cat(pieces))
        at += len(ps)
    return out


def warm_up(model: VectorFlow, config: TestbedConfig, iterations: int, tolerance: float) -> dict:
    """Train the flow (not the gates) for ``iterations`` on the testbed's batches ``0..iterations-1``
    with every solve at the fixed ``tolerance``; return the last 10% of iterations' mean NLL and the time."""
    gate_ids = {id(p) for g in gates_of(model) for p in g.parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if id(p) not in gate_ids], lr=config.lr)
    learner = ToleranceLearner(ToleranceConfig(mode="fixed"))  # plain loss.backward(), no probes
    fixed = FixedTolerance(tolerance)
    start, nll = time.perf_counter(), []
    with use_policies(model, lambda solver: fixed):
        for i in range(iterations):
            nll.append(train_step(model, optimizer, learner, [fixed], config, i).nll)
    tail = nll[-max(1, iterations // 10) :]
    final_nll = statistics.fmean(tail) if tail else None
    return {"iterations": iterations, "final_train_nll": final_nll, "seconds": time.perf_counter() - start}


def paper_estimate(
    model: VectorFlow,
    config: TestbedConfig,
    gates: list[GaussianGate],
    baseline: RunningMeanBaseline,
    batch: int,
    seed: int,
) -> Estimate:
    """Eq. 7 on the training solve of batch ``batch``: train mode, gates draw from the global RNG
    (seeded with ``seed``), return ``-(L - alpha/N sum NFE)`` against the running ``baseline``."""
    x, y = batch_at(config, batch)
    torch.manual_seed(seed)
    start = time.perf_counter()
    model.train()
    with collect_records(model) as records:
        out = model(x, y)
    task_loss = model.objective(out, y, config.beta).mean()
    surrogate = reinforce_loss(records, task_loss.detach(), config.tolerance.alpha, baseline=baseline)
    gradients = _gate_gradients(surrogate, gates)
    seconds = time.perf_counter() - start
    # The training step's own backward (not timed: training pays it with or without the estimate).
    # Without it the flow's graph is never released: tolgate's NFE-counting hook holds it in a
    # reference cycle that the garbage collector cannot see (~50 MB per 1-D solve otherwise).
    task_loss.backward()
    model.zero_grad(set_to_none=True)
    return Estimate(
        gradients=gradients,
        bias=[float(g[_mean_bias_index(gate)]) for g, gate in zip(gradients, gates, strict=True)],
        nfe_forward=sum(r.nfe_forward for r in records),
        rows=x.shape[0],
        seconds=seconds,
        log10_tolerance=[r.mean_log10_tolerance for r in records],
        extra={"task_loss": float(task_loss.detach())},
    )


def probe_estimate(
    model: VectorFlow,
    config: TestbedConfig,
    gates: list[GaussianGate],
    estimator: ProbedGateEstimator,
    rows: int,
    batch: int,
    noise_seed: int,
) -> Estimate:
    """:meth:`ProbedGateEstimator.loss` on the first ``rows`` rows of batch ``batch``."""
    x, y = batch_at(config, batch)
    probe_x, probe_y = x[:rows], None if y is None else y[:rows]

    def objective() -> torch.Tensor:
        return model.objective(model(probe_x, probe_y), probe_y, config.beta)

    start = time.perf_counter()
    surrogate, report = estimator.loss(model, objective, noise_seed, config.batch)
    gradients = _gate_gradients(surrogate, gates)
    seconds = time.perf_counter() - start
    budget = report.budget
    return Estimate(
        gradients=gradients,
        bias=[float(g[_mean_bias_index(gate)]) for g, gate in zip(gradients, gates, strict=True)],
        nfe_forward=report.probe_nfe_forward,
        rows=report.rows,
        seconds=seconds,
        log10_tolerance=report.log10_tolerance.mean(dim=0).tolist(),
        extra={
            "error_over_budget": float(report.error.mean() / budget) if budget > 0 else math.inf,
            "draws_over_budget": float((report.error > budget).double().mean()),
        },
    )


def _snr(samples: torch.Tensor) -> float:
    """``||mean||^2 / trace(cov)`` of ``samples`` ``(R, P)``; 0 when every sample is equal to zero."""
    mean = samples.mean(dim=0)
    trace = float(samples.var(dim=0, unbiased=True).sum())
    power = float(mean.pow(2).sum())
    if trace > 0:
        return power / trace
    return 0.0 if power == 0 else math.inf


def gradient_stats(samples: torch.Tensor, bootstrap: int, generator: torch.Generator) -> dict:
    """SNR and friends of ``R`` gradient estimates ``samples`` ``(R, P)`` (``P = 1``: one component).

    Keys: ``mean`` (``P = 1`` only) ``std`` (per-estimate, ``sqrt(trace cov)``), ``standard_error``
    (of the mean, ``std / sqrt(R)``), ``snr``, ``snr_debiased``, ``noise_floor``, ``snr_ci95``
    (bootstrap percentiles), ``sign_agreement`` (an exactly zero estimate does not agree),
    ``sign_agreement_nonzero`` (among the others), ``sign_agreement_gaussian``, ``zero_fraction``
    (estimates that are exactly zero: the probe estimator's when every draw earned the same).
    """
    repeats = samples.shape[0]
    mean = samples.mean(dim=0)
    std = math.sqrt(float(samples.var(dim=0, unbiased=True).sum()))
    snr = _snr(samples)
    # Order statistics rather than interpolated quantiles: a degenerate resample may read inf.
    resampled = sorted(_snr(samples[torch.randint(repeats, (repeats,), generator=generator)]) for _ in range(bootstrap))
    low, high = resampled[math.floor(0.025 * (bootstrap - 1))], resampled[math.ceil(0.975 * (bootstrap - 1))]
    if samples.shape[1] == 1:
        agree = (torch.sign(samples[:, 0]) == torch.sign(mean[0])) & (samples[:, 0] != 0)
    else:  # against the mean of the others, so an estimate does not vote for itself
        others = (mean[None, :] * repeats - samples) / (repeats - 1)
        agree = (samples * others).sum(dim=1) > 0
    nonzero = (samples != 0).any(dim=1)
    stats = {
        "std": std,
        "standard_error": std / math.sqrt(repeats),
        "snr": snr,
        "snr_debiased": max(0.0, snr - 1.0 / repeats),
        "noise_floor": 1.0 / repeats,
        "snr_ci95": [low, high],
        "sign_agreement": float(agree.double().mean()),
        "sign_agreement_nonzero": float(agree[nonzero].double().mean()) if bool(nonzero.any()) else 0.0,
        "sign_agreement_gaussian": 0.5 * (1.0 + math.erf(math.sqrt(snr / 2.0))) if math.isfinite(snr) else 1.0,
        "zero_fraction": float((samples == 0).all(dim=1).double().mean()),
    }
    if samples.shape[1] == 1:
        stats = {"mean": float(mean[0]), **stats}
    return stats


def _summary_stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def summarise(estimates: list[Estimate], batch: int, bootstrap: int, generator: torch.Generator) -> dict:
    """Per gate: the mean-direction component and the whole gradient; the cost per estimate; the raw
    per-estimate numbers (bias components, NFE, seconds, drawn tolerances, extras)."""
    gates = []
    for g in range(len(estimates[0].gradients)):
        full = torch.stack([e.gradients[g] for e in estimates])
        bias = torch.tensor([[e.bias[g]] for e in estimates], dtype=torch.float64)
        gates.append(
            {
                "mean_direction": gradient_stats(bias, bootstrap, generator),
                "full": {"parameters": full.shape[1], **gradient_stats(full, bootstrap, generator)},
            }
        )
    nfe = [float(e.nfe_forward) for e in estimates]
    rows = estimates[0].rows
    seconds = [e.seconds for e in estimates]
    extras = {key: [e.extra[key] for e in estimates] for key in estimates[0].extra}
    return {
        "gates": gates,
        "cost": {
            "nfe_forward": _summary_stats(nfe),
            "rows": rows,
            "batch_equivalent_nfe": statistics.fmean(nfe) * rows / batch,
            "seconds": _summary_stats(seconds),
        },
        "extras": {key: _summary_stats(values) for key, values in extras.items()},
        "per_estimate": {
            "bias": [e.bias for e in estimates],
            "nfe_forward": [e.nfe_forward for e in estimates],
            "seconds": seconds,
            "log10_tolerance": [e.log10_tolerance for e in estimates],
            **extras,
        },
    }


def measure(settings: SNRSettings, progress: Callable[[int, int], None] | None = None) -> dict:
    """Build and warm up the model, warm the paper baseline, then ``repeats`` rounds of one estimate
    per estimator on a fresh batch (the same batch for every estimator of a round, their order
    rotated from round to round); ``progress(done, repeats)`` after each round. Returns the
    testbed's results (see the module docstring).

    The global RNG is seeded by the run and restored afterwards."""
    config = settings.testbed_config()
    with torch.random.fork_rng():
        model = build(config)
        gates = gates_of(model)
        before = [torch.cat([p.detach().reshape(-1) for p in g.parameters()]).clone() for g in gates]
        warmup = warm_up(model, config, settings.warmup_iterations, settings.warmup_tol)
        baseline = RunningMeanBaseline(settings.baseline_momentum)
        first = settings.warmup_iterations
        for b in range(settings.baseline_batches):
            paper_estimate(model, config, gates, baseline, first + b, derived_seed(settings.seed, _PAPER_STREAM, b))
        first += settings.baseline_batches
        probes = {
            f"probe-{k}": ProbedGateEstimator(k, settings.reference_tol, settings.fraction, settings.penalty)
            for k in settings.draws
        }
        names = settings.estimators
        estimates: dict[str, list[Estimate]] = {name: [] for name in names}
        for r in range(settings.repeats):
            batch = first + r
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if name == PAPER:
                    seed = derived_seed(settings.seed, _PAPER_STREAM, settings.baseline_batches + r)
                    estimate = paper_estimate(model, config, gates, baseline, batch, seed)
                else:
                    noise_seed = derived_seed(settings.seed, _PROBE_STREAM, r) % (2**31)
                    estimate = probe_estimate(
                        model, config, gates, probes[name], settings.probe_rows, batch, noise_seed
                    )
                estimates[name].append(estimate)
            if progress is not None:
                progress(r + 1, settings.repeats)
        after = [torch.cat([p.detach().reshape(-1) for p in g.parameters()]) for g in gates]
        if not all(torch.equal(a, b) for a, b in zip(after, before, strict=True)):
            raise RuntimeError("a gate's parameters changed during the measurement")
    generator = torch.Generator().manual_seed(derived_seed(settings.seed, _BOOTSTRAP_STREAM))
    return {
        "testbed": settings.testbed,
        "settings": {**asdict(settings), "draws": list(settings.draws)},
        "config": asdict(config),
        "warmup": warmup,
        "gates": len(gates),
        "estimators": {name: summarise(estimates[name], config.batch, settings.bootstrap, generator) for name in names},
    }


def markdown_table(results: list[dict]) -> str:
    """One row per testbed, gate and estimator: SNR (mean direction and whole gradient), sign
    agreement, cost per estimate."""
    lines = [
        "| testbed | gate | estimator | SNR bias[0] [95% CI] | SNR full | sign agree | NFE x rows | batch-eq NFE | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, summary in result["estimators"].items():
            cost = summary["cost"]
            for g, gate in enumerate(summary["gates"]):
                bias, full = gate["mean_direction"], gate["full"]
                low, high = bias["snr_ci95"]
                lines.append(
                    f"| {result['testbed']} | {g} | {name} | {bias['snr']:.3g} [{low:.2g}, {high:.2g}] | "
                    f"{full['snr']:.3g} | {bias['sign_agreement']:.2f} | "
                    f"{cost['nfe_forward']['mean']:.0f} x {cost['rows']} | {cost['batch_equivalent_nfe']:.0f} | "
                    f"{cost['seconds']['median']:.3f} |"
                )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbeds", nargs="+", choices=tuple(PRESETS), default=list(PRESETS))
    p.add_argument("--repeats", type=int, default=100, help="estimates per estimator (R)")
    p.add_argument("--warmup", type=int, default=200, help="flow training iterations at fixed 1e-5 first")
    p.add_argument("--baseline-batches", type=int, default=20)
    p.add_argument("--draws", type=int, nargs="+", default=[2, 4, 8], help="K of the probe estimator")
    p.add_argument("--probe-rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke: R = 5, warm-up 20, baseline 5, bootstrap 200")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    repeats, warmup, baseline, bootstrap = args.repeats, args.warmup, args.baseline_batches, 1000
    if args.quick:
        repeats, warmup, baseline, bootstrap = 5, 20, 5, 200
    start = time.perf_counter()
    results = []
    for testbed in args.testbeds:
        settings = SNRSettings(
            testbed=testbed,
            repeats=repeats,
            warmup_iterations=warmup,
            baseline_batches=baseline,
            draws=tuple(args.draws),
            probe_rows=args.probe_rows,
            seed=args.seed,
            bootstrap=bootstrap,
        )

        def progress(done: int, total: int, testbed: str = testbed, tick: float = time.perf_counter()) -> None:
            if done % max(1, total // 10) == 0:
                print(
                    f"{testbed}: round {done}/{total} ({time.perf_counter() - tick:.0f} s)", file=sys.stderr, flush=True
                )

        results.append(measure(settings, progress))
    summary = {
        "command": "python benchmarks/gradient_snr.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,  # KiB on Linux
        "wall_seconds": time.perf_counter() - start,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown_table(results))
    print(f"\nwrote {args.out / 'summary.json'} in {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
