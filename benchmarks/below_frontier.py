"""Can a learned policy land *below* the fixed-tolerance frontier? Blocks of very different difficulty.

A chain of gated solves ``y_i = solve(f_i, y_{i-1})``, ``f_i(y) = omega_i * J y + 0.1 sin(y)`` (a
rotation at frequency ``omega_i`` plus a mild nonlinearity), with the per-sample objective
``L = sum_i w_i * |y_i(1)|^2``. The fast blocks (large ``omega``) cost many steps and barely count
(small ``w``); the slow blocks are cheap and count fully. One fixed tolerance for every block has
to be tight enough for the blocks that count and so pays for accuracy nobody uses in the blocks
that do not; per-block gates trained by :class:`tolgate.ProbedGateEstimator` can loosen only
those. Nothing else is trained, so the comparison is about the policy alone.

Quality is the solver error of the objective against a tight reference (``mean |L - L_ref|``),
measured on a held-out batch with every policy at its deterministic choice, and compared with the
budget the estimator was given (``fraction`` of the minibatch noise).

    python benchmarks/below_frontier.py --seeds 0 1 2 3 4      # ~15 min on one CPU core

Writes docs/results/below_frontier/summary.json and frontier.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from tolgate import (
    FixedTolerance,
    GatedSolver,
    GaussianGate,
    LadderGate,
    LadderPolicy,
    MLPGate,
    NoiseMatchedTolerance,
    ProbedGateEstimator,
    SolverLadder,
    SolverSetting,
    calibrate,
    climb,
    use_policies,
)
from tolgate.probes import minibatch_noise, reference_probe, run_probe

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "below_frontier"
FIXED = [10.0 ** (-k / 2) for k in range(14, 1, -1)]  # 1e-7 ... 1e-1, half decades


class Rotation(nn.Module):
    """``dy/dt = omega * J y + 0.1 sin(y)`` on ``(batch, 2)``."""

    def __init__(self, omega: float) -> None:
        super().__init__()
        self.omega = omega

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.omega * torch.stack([-y[:, 1], y[:, 0]], dim=1) + 0.1 * torch.sin(y)


class Chain(nn.Module):
    """Blocks in sequence; ``objective(y0)`` is ``sum_i w_i |y_i(1)|^2`` per sample, ``(batch,)``."""

    def __init__(self, omegas: list[float], weights: list[float], make_policy) -> None:
        super().__init__()
        self.fields = nn.ModuleList(Rotation(w) for w in omegas)
        self.solvers = nn.ModuleList(GatedSolver(make_policy(), eval_policy=None) for _ in omegas)
        self.weights = weights

    def objective(self, y0: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([0.0, 1.0], dtype=y0.dtype)
        y, total = y0, torch.zeros(y0.shape[0], dtype=y0.dtype)
        for field, solver, weight in zip(self.fields, self.solvers, self.weights, strict=True):
            y = solver(field, y, t)[-1]
            total = total + weight * y.pow(2).sum(dim=1)
        return total


def batch(seed: int, step: int, size: int) -> torch.Tensor:
    return torch.randn(size, 2, generator=torch.Generator().manual_seed(seed * 100_003 + step), dtype=torch.float64)


def measure(chain: Chain, y0: torch.Tensor, policy_for, reference_tol: float, batch_size: int) -> dict:
    """NFE per block and solver error of the objective at ``policy_for``'s (deterministic) choices."""

    def objective() -> torch.Tensor:
        return chain.objective(y0)

    reference = reference_probe(chain, objective, reference_tol, 0)
    probe = run_probe(chain, objective, policy_for, 0)
    return {
        "nfe_per_block": [r.nfe_forward for r in probe.records],
        "nfe": probe.nfe_forward,
        "error": probe.error_against(reference),
        "budget_noise": minibatch_noise(reference, batch_size),
        "log10_tolerance": [r.mean_log10_tolerance for r in probe.records],
        "settings": [r.setting for r in probe.records],
    }


def run_ladder(args: argparse.Namespace, seed: int, learned: bool) -> dict:
    """The automatic ladder policy per block (``climb`` every step), and with ``learned`` a
    :class:`LadderGate` per block trained on top of it by the probe estimator (issue 16, item 3)."""
    torch.manual_seed(seed)
    held_out = batch(seed, -1, args.eval_batch)
    reference = SolverSetting("dopri5", args.reference_tol)
    ladder = SolverLadder.default()

    def policy() -> LadderPolicy | LadderGate:
        automatic = LadderPolicy(ladder, start=SolverSetting("dopri5", 10.0**args.start_log10))
        return LadderGate(automatic, MLPGate(2)).double() if learned else automatic

    chain = Chain(args.omegas, args.weights, policy)
    gates = [s.policy for s in chain.solvers if isinstance(s.policy, LadderGate)]
    optimizer = torch.optim.Adam([p for g in gates for p in g.parameters()], lr=args.gate_lr) if gates else None
    estimator = ProbedGateEstimator(
        draws=args.draws, reference_tol=args.reference_tol, fraction=args.fraction, exploration_std=1.0
    )
    probe_nfe = 0
    for step in range(args.iterations):
        y0 = batch(seed, step, args.batch)

        def objective(y0: torch.Tensor = y0) -> torch.Tensor:
            return chain.objective(y0)

        report = climb(
            chain, objective, seed * 7 + step, args.batch, reference=reference, fraction=args.fraction, turn=step
        )
        probe_nfe += report.nfe_forward
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            surrogate, probed = estimator.loss(chain, objective, seed * 7 + step, args.batch)
            surrogate.backward()
            optimizer.step()
            probe_nfe += probed.probe_nfe_forward
    return {
        **measure(chain, held_out, lambda s: s.policy, args.reference_tol, args.batch),
        "probe_nfe_per_step": probe_nfe / args.iterations,
    }


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    torch.manual_seed(seed)
    held_out = batch(seed, -1, args.eval_batch)

    def gate() -> GaussianGate:
        return GaussianGate(MLPGate(2), initial_log10=args.start_log10, explore=False).double()

    chain = Chain(args.omegas, args.weights, gate)
    gates = [s.policy for s in chain.solvers]
    optimizer = torch.optim.Adam([p for g in gates for p in g.parameters()], lr=args.gate_lr)
    estimator = ProbedGateEstimator(
        draws=args.draws, reference_tol=args.reference_tol, fraction=args.fraction, penalty=args.penalty
    )
    start = time.time()
    for step in range(args.iterations):
        y0 = batch(seed, step, args.batch)
        optimizer.zero_grad(set_to_none=True)
        surrogate, _ = estimator.loss(chain, lambda y0=y0: chain.objective(y0), seed * 7 + step, args.batch)
        surrogate.backward()
        optimizer.step()
    learned_seconds = time.time() - start
    learned = measure(chain, held_out, lambda s: s.policy, args.reference_tol, args.batch)

    adaptive_policy = NoiseMatchedTolerance(initial=10.0**args.start_log10, fraction=args.fraction).double()
    with use_policies(chain, lambda s: adaptive_policy):
        for step in range(args.adaptive_iterations):
            y0 = batch(seed, step, args.batch)
            calibrate(
                adaptive_policy,
                chain,
                lambda y0=y0: chain.objective(y0),
                seed * 7 + step,
                args.batch,
                args.reference_tol,
            )
    adaptive = measure(chain, held_out, lambda s: adaptive_policy, args.reference_tol, args.batch)

    frontier = []
    for tol in FIXED:
        fixed = FixedTolerance(tol)
        frontier.append(
            {"tolerance": tol, **measure(chain, held_out, lambda s, fixed=fixed: fixed, args.reference_tol, args.batch)}
        )
    auto = run_ladder(args, seed, learned=False)
    auto_learned = run_ladder(args, seed, learned=True)
    budget = args.fraction * learned["budget_noise"]
    within = [f for f in frontier if f["error"] <= budget]
    best_fixed = min(within, key=lambda f: f["nfe"]) if within else None
    return {
        "seed": seed,
        "budget": budget,
        "learned": learned,
        "adaptive": adaptive,
        "auto": auto,
        "auto_learned": auto_learned,
        "frontier": frontier,
        "best_fixed": best_fixed,
        "learned_over_best_fixed_nfe": learned["nfe"] / best_fixed["nfe"] if best_fixed else None,
        "auto_learned_over_auto_nfe": auto_learned["nfe"] / auto["nfe"],
        "learned_seconds": learned_seconds,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for k, r in enumerate(results):
        label = (lambda s: s) if k == 0 else (lambda s: None)
        ax.loglog(
            [f["nfe"] for f in r["frontier"]],
            [max(f["error"] / r["budget"], 1e-6) for f in r["frontier"]],
            "-",
            color="gray",
            alpha=0.6,
            label=label("fixed tolerance (1e-7 ... 1e-1)"),
        )
        ax.loglog(
            [r["learned"]["nfe"]],
            [max(r["learned"]["error"] / r["budget"], 1e-6)],
            "r*",
            ms=12,
            label=label("learned per-block gates (probe estimator)"),
        )
        ax.loglog(
            [r["adaptive"]["nfe"]],
            [max(r["adaptive"]["error"] / r["budget"], 1e-6)],
            "bs",
            ms=7,
            label=label("adaptive (one tolerance, noise-matched)"),
        )
        for key, marker, name in (
            ("auto", "g^", "automatic ladder (tolerances and grids)"),
            ("auto_learned", "mv", "learned departures from it"),
        ):
            ax.loglog([r[key]["nfe"]], [max(r[key]["error"] / r["budget"], 1e-6)], marker, ms=8, label=label(name))
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="solver-error budget")
    ax.set_xlabel("forward NFE per pass (all blocks)")
    ax.set_ylabel("solver error of the objective / budget")
    ax.set_title("Blocks of different difficulty: below the fixed frontier?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--omegas", type=float, nargs="+", default=[1.0, 8.0, 1.0, 8.0])
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 1e-3, 1.0, 1e-3])
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--adaptive-iterations", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--penalty", type=float, default=1.0)
    p.add_argument("--reference-tol", type=float, default=1e-7)
    p.add_argument("--start-log10", type=float, default=-5.0)
    p.add_argument("--gate-lr", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if len(args.omegas) != len(args.weights):
        p.error(f"--omegas and --weights need one entry per block, got {len(args.omegas)} and {len(args.weights)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        r = run_seed(args, seed)
        results.append(r)
        best = r["best_fixed"]
        print(
            f"seed {seed}: learned nfe {r['learned']['nfe']} err/budget {r['learned']['error'] / r['budget']:.2f} "
            f"tol {[round(v, 2) for v in r['learned']['log10_tolerance']]} | adaptive nfe {r['adaptive']['nfe']} "
            f"err/budget {r['adaptive']['error'] / r['budget']:.2f} | auto nfe {r['auto']['nfe']} "
            f"err/budget {r['auto']['error'] / r['budget']:.2f} {r['auto']['settings']} | auto+learned nfe "
            f"{r['auto_learned']['nfe']} err/budget {r['auto_learned']['error'] / r['budget']:.2f} "
            f"{r['auto_learned']['settings']} | best fixed "
            + ("-" if best is None else f"{best['tolerance']:.1e} nfe {best['nfe']}"),
            flush=True,
        )
    ratios = [r["learned_over_best_fixed_nfe"] for r in results if r["learned_over_best_fixed_nfe"] is not None]
    summary = {
        "command": "python benchmarks/below_frontier.py "
        + " ".join(f"--seeds {' '.join(map(str, args.seeds))}".split()),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "learned_over_best_fixed_nfe": {
            "mean": statistics.mean(ratios) if ratios else None,
            "std": statistics.stdev(ratios) if len(ratios) > 1 else None,
        },
        "learned_within_budget": sum(r["learned"]["error"] <= r["budget"] for r in results),
        "auto_within_budget": sum(r["auto"]["error"] <= r["budget"] for r in results),
        "auto_learned_within_budget": sum(r["auto_learned"]["error"] <= r["budget"] for r in results),
        "auto_learned_over_auto_nfe": {
            "mean": statistics.mean(r["auto_learned_over_auto_nfe"] for r in results),
            "std": statistics.stdev(r["auto_learned_over_auto_nfe"] for r in results) if len(results) > 1 else None,
        },
        "seeds": results,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(results, args.out / "frontier.png")
    keys = ("learned_over_best_fixed_nfe", "learned_within_budget", "auto_within_budget", "auto_learned_over_auto_nfe")
    print(json.dumps({k: summary[k] for k in keys}))


if __name__ == "__main__":
    main()
