"""Does the learned 1-D density integrate to one as the solver tolerance tightens? (Sec. 4.2, App. C-D, Fig. 2a)

A 1-D CNF (one CNFBlock, MLPODENet field, exact trace, float64) is fitted to the three-Gaussian
mixture of App. C with its tolerance learned by a GaussianGate(MLPGate(1)) trained by REINFORCE
alongside the flow. Then the density ``p(x) = N(z(1); 0, 1) * |dz(1)/dx|`` is integrated

* by a Riemann sum on a fine grid, the whole grid solved as one batch, and
* by ``scipy.integrate.quad`` over the real line (one solve per abscissa) as a cross-check,
  by default only at the tight tolerances 1e-8, 1e-6, 1e-4 (at loose ones the solver's output is
  rough in ``x`` and quad subdivides for minutes),

for fixed evaluation tolerances ``rtol = atol = 1e-8, 1e-7, ..., 1e-1`` and for the learned
tolerance evaluated at the gate's mean (App. D). Note that torchdiffeq's error norm is the RMS
over the whole batch, so the grid solve's step sizes are set by the grid as a whole.

    python benchmarks/density_integral.py                     # ~1-3 min on 2 CPU cores
    python benchmarks/density_integral.py --iterations 200 --quad-tolerances   # quicker look

Writes docs/results/density_integral.json and docs/results/density_integral.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import integrate

from tolgate import FixedTolerance, GatedSolver, GaussianGate, MLPGate, RunningMeanBaseline, reinforce_loss
from tolgate_flows.cnf import CNFBlock
from tolgate_flows.data import THREE_GAUSSIANS, GaussianMixture1D
from tolgate_flows.odefuncs import MLPODENet

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
TOLERANCES = [10.0**-k for k in range(8, 0, -1)]  # 1e-8 ... 1e-1, one per decade
THRESHOLDS = (1e-3, 1e-4)


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the feature dims: ``(batch, dim) -> (batch,)``."""
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(dim=1)


def log_density(block: CNFBlock, x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` ``(batch,)`` of ``x`` ``(batch, dim)``: solve ``x -> z(1)`` and add the density change."""
    z, neg_log_det = block(x)
    return standard_normal_log_density(z) - neg_log_det


def evaluate_at(block: CNFBlock, tolerance: float | None) -> None:
    """Put ``block`` in eval mode at a fixed ``rtol = atol = tolerance``, or at the gate's mean if ``None``."""
    block.eval()
    block.solver.eval_policy = None if tolerance is None else FixedTolerance(tolerance)


@torch.no_grad()
def riemann_integral(block: CNFBlock, low: float, high: float, n_points: int) -> tuple[float, dict]:
    """Midpoint Riemann sum of ``p`` over ``[low, high]``, every point in one batched solve.

    Returns the integral and the solve's statistics (NFE, tolerance used)."""
    dx = (high - low) / n_points
    grid = low + dx * (torch.arange(n_points, dtype=torch.float64) + 0.5)
    density = log_density(block, grid.unsqueeze(1)).exp()
    record = block.solver.records[-1]
    stats = {"nfe": record.nfe_forward, "rtol": float(record.rtol)}
    return float(density.sum() * dx), stats


@torch.no_grad()
def quad_integral(block: CNFBlock, points: tuple[float, ...], accuracy: float) -> tuple[float, float, int]:
    """``scipy.integrate.quad`` of ``p`` over the real line (one solve per abscissa).

    The line is split at ``points`` (the mixture's means) so each adaptive piece sees one bump.
    ``accuracy`` is quad's ``epsabs = epsrel``: ask for no more than the integrand has, which is
    about the solver tolerance (as ``x`` moves, the solver's step sequence jumps, and the
    computed density with it); asking for more makes quad subdivide to its limit.
    Returns ``(integral, quad's error estimate, number of density evaluations)``.
    """
    calls = [0]

    def density(x: float) -> float:
        calls[0] += 1
        return float(log_density(block, torch.tensor([[x]], dtype=torch.float64)).exp())

    edges = [-math.inf, *sorted(points), math.inf]
    total, error = 0.0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)  # loose tolerances are rough
        for a, b in itertools.pairwise(edges):
            value, err = integrate.quad(density, a, b, epsabs=accuracy, epsrel=accuracy, limit=50)
            total, error = total + value, error + err
    return total, error, calls[0]


def build_model(hidden: int, initial_log10: float) -> CNFBlock:
    """1-D CNF whose solver's tolerance is a learned ``GaussianGate(MLPGate(1))``, in float64."""
    gate = GaussianGate(MLPGate(1), low=1e-8, high=1e-1, initial_log10=initial_log10)
    solver = GatedSolver(gate, eval_policy=None)
    return CNFBlock(MLPODENet(1, hidden=hidden, n_layers=2), solver, divergence="exact").double()


def train(block: CNFBlock, mixture: GaussianMixture1D, args: argparse.Namespace) -> list[dict]:
    """Maximum likelihood for the flow plus the REINFORCE term for the gate (Eq. 6-7)."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(block.parameters(), lr=args.lr)
    baseline = RunningMeanBaseline()
    history = []
    start = time.time()
    block.train()
    for step in range(1, args.iterations + 1):
        x = mixture.sample(args.batch, generator).double()
        nll = -log_density(block, x).mean()
        record = block.solver.records[-1]
        loss = nll + reinforce_loss([record], nll, args.alpha, baseline)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.iterations:
            entry = {
                "step": step,
                "nll": float(nll.detach()),
                "log10_tolerance": float(record.log10_tolerance),
                "nfe_forward": record.nfe_forward,
                "nfe_backward": record.nfe_backward,
                "seconds": time.time() - start,
            }
            history.append(entry)
            print(
                f"step {step:5d}  nll {entry['nll']:.4f}  log10 tol {entry['log10_tolerance']:+.2f}  "
                f"nfe {entry['nfe_forward']}+{entry['nfe_backward']}  {entry['seconds']:.0f}s",
                flush=True,
            )
    return history


def largest_safe_tolerance(rows: list[dict], threshold: float) -> float | None:
    """Largest tolerance such that it and every tighter one have ``|1 - integral| < threshold``."""
    safe = None
    for row in sorted(rows, key=lambda r: r["tolerance"]):
        if row["riemann_error"] >= threshold:
            break
        safe = row["tolerance"]
    return safe


def plot(result: dict, mixture: GaussianMixture1D, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["fixed"]
    tols = [r["tolerance"] for r in rows]
    fig, (ax, ax_density) = plt.subplots(1, 2, figsize=(10, 4))
    ax.loglog(tols, [max(r["riemann_error"], 1e-16) for r in rows], "o-", label="Riemann sum (grid, one batch)")
    quad_rows = [r for r in rows if "quad_error" in r]
    if quad_rows:
        quad_tols = [r["tolerance"] for r in quad_rows]
        ax.loglog(quad_tols, [max(r["quad_error"], 1e-16) for r in quad_rows], "s", label="scipy quad (real line)")
    learned = result["learned"]
    ax.loglog([learned["tolerance"]], [max(learned["riemann_error"], 1e-16)], "r*", ms=14, label="learned (gate mean)")
    ax.axhline(1e-3, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("solver tolerance (rtol = atol)")
    ax.set_ylabel("|1 - integral of p(x)|")
    ax.set_title("Learned 1-D density: numerical error vs tolerance")
    ax.legend(fontsize=8)
    grid = np.array(result["density_curve"]["x"])
    ax_density.plot(grid, mixture.density(torch.from_numpy(grid)).numpy(), label="data (mixture)")
    ax_density.plot(grid, result["density_curve"]["p"], label="CNF, tol 1e-5")
    ax_density.set_xlabel("x")
    ax_density.set_title("Densities (App. C, Fig. 8)")
    ax_density.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=1e-3, help="REINFORCE price per forward evaluation")
    parser.add_argument("--gate-init", type=float, default=-5.0, help="initial log10 tolerance of the gate")
    parser.add_argument("--grid-points", type=int, default=8000)
    parser.add_argument("--grid-range", type=float, nargs=2, default=(-20.0, 20.0))
    parser.add_argument(
        "--quad-tolerances",
        type=float,
        nargs="*",
        default=[1e-8, 1e-6, 1e-4],
        help="tolerances at which to cross-check with scipy.integrate.quad (one solve per abscissa: slow)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "density_integral.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "density_integral.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mixture = THREE_GAUSSIANS
    block = build_model(args.hidden, args.gate_init)
    history = train(block, mixture, args)
    low, high = args.grid_range

    rows = []
    for tol in TOLERANCES:
        evaluate_at(block, tol)
        t0 = time.time()
        value, stats = riemann_integral(block, low, high, args.grid_points)
        row = {"tolerance": tol, "riemann": value, "riemann_error": abs(1 - value), "riemann_nfe": stats["nfe"]}
        if tol in args.quad_tolerances:
            q, q_err, calls = quad_integral(block, mixture.means, accuracy=max(tol / 10, 1e-10))
            row.update(quad=q, quad_error=abs(1 - q), quad_estimate=q_err, quad_calls=calls)
        row["seconds"] = time.time() - t0
        rows.append(row)
        print(
            f"tol {tol:.0e}: Riemann {value:.8f} (|1-I| {row['riemann_error']:.2e}, nfe {stats['nfe']})"
            + (f"  quad {row['quad']:.8f} (|1-I| {row['quad_error']:.2e})" if "quad" in row else ""),
            flush=True,
        )

    evaluate_at(block, None)  # the gate's mean tolerance for the grid batch (App. D)
    value, stats = riemann_integral(block, low, high, args.grid_points)
    learned = {
        "tolerance": stats["rtol"],
        "riemann": value,
        "riemann_error": abs(1 - value),
        "riemann_nfe": stats["nfe"],
    }
    print(f"learned tol {stats['rtol']:.2e}: Riemann {value:.8f} (|1-I| {learned['riemann_error']:.2e})")

    evaluate_at(block, 1e-5)
    curve_x = torch.linspace(-6.0, 6.0, 481, dtype=torch.float64)
    with torch.no_grad():
        curve_p = log_density(block, curve_x.unsqueeze(1)).exp()
    safe = {f"{t:.0e}": largest_safe_tolerance(rows, t) for t in THRESHOLDS}
    result = {
        "description": "1-D CNF on a three-Gaussian mixture: |1 - integral of the learned density| vs tolerance",
        "command": " ".join(["python", *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "png")},
        "mixture": {"weights": mixture.weights, "means": mixture.means, "stds": mixture.stds},
        "grid": {"low": low, "high": high, "points": args.grid_points, "rule": "midpoint"},
        "training": history,
        "fixed": rows,
        "learned": learned,
        "largest_tolerance_with_error_below": safe,
        "density_curve": {"x": curve_x.tolist(), "p": curve_p.tolist()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, mixture, args.png)
    for threshold, tol in safe.items():
        print(f"|1 - integral| < {threshold} for every tolerance <= {tol}")
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
