"""Error and cost against tolerance for each adaptive method, measured against scipy.

For every method and every tolerance ``rtol = atol`` in 1e-3, 1e-4, ..., 1e-9, each problem of a
fixed set is solved with ``GatedSolver(FixedTolerance(rtol), method)`` and compared with
``scipy.integrate.solve_ivp(DOP853, rtol=atol=1e-13)`` by :func:`tolgate.testing.compare_with_reference`:
the error is ``max |y - y_ref| / (atol + rtol |y_ref|)`` over output times and components, so
1.0 means "off by exactly the tolerance". Reported per (method, tolerance): the worst and the
median error over problems and the mean forward NFE.

Problems (float64, outputs at 5 evenly spaced times on [0, 2], so most outputs fall inside a step
and come from the method's interpolant): 6 stable linear systems of dims 1, 2, 3, 5, 8, 8 built
like the test strategy's (numpy seed 0), Lotka-Volterra (rates 1.5, 1, 3, 1 from (1, 1)) and a
damped pendulum (g/L = 9.81, damping 0.5, from 2.5 rad at rest).

One extra row, ``bosh3+step_t``, passes ``options={"step_t": t}`` so steps end on the output times:
it isolates the error of torchdiffeq's bosh3 interpolant (see docs/tolgate.md).

Run: ``python benchmarks/solver_accuracy.py`` (a few minutes on 2 cores; the second-order
methods need ~10^4 steps per problem at 1e-9); writes ``docs/results/solver_accuracy.json`` and
``docs/results/solver_accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no display backend needed

from tolgate.testing import (
    DampedPendulum,
    LinearField,
    LotkaVolterra,
    ODEProblem,
    compare_with_reference,
    stable_linear_matrix,
)

F64 = torch.float64
TOLERANCES = [10.0**-k for k in range(3, 10)]
VARIANTS = {  # label -> (method, use step_t)
    "dopri5": ("dopri5", False),
    "bosh3": ("bosh3", False),
    "fehlberg2": ("fehlberg2", False),
    "adaptive_heun": ("adaptive_heun", False),
    "bosh3+step_t": ("bosh3", True),
}


def problems() -> list[ODEProblem]:
    rng = np.random.default_rng(0)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    out = []
    for dim in (1, 2, 3, 5, 8, 8):
        rotation, damping = (torch.from_numpy(rng.uniform(-1, 1, (dim, dim))) for _ in range(2))
        matrix = stable_linear_matrix(rotation, damping, decay=float(rng.uniform(0.1, 1.0)))
        y0 = torch.from_numpy(rng.uniform(-2, 2, dim))
        out.append(ODEProblem(f"linear{dim}", LinearField(matrix), y0, t))
    out.append(ODEProblem("lotka_volterra", LotkaVolterra(), torch.tensor([1.0, 1.0], dtype=F64), t))
    out.append(ODEProblem("damped_pendulum", DampedPendulum(), torch.tensor([2.5, 0.0], dtype=F64), t))
    return out


def measure(label: str, rtol: float, cases: list[ODEProblem]) -> dict:
    method, step_t = VARIANTS[label]
    errors, nfes = [], []
    for problem in cases:
        options = {"step_t": problem.t} if step_t else None
        result = compare_with_reference(problem.field, problem.y0, problem.t, method, rtol, options=options)
        errors.append(result.error)
        nfes.append(result.nfe)
    return {
        "method": label,
        "rtol": rtol,
        "max_error_x_tol": max(errors),
        "median_error_x_tol": statistics.median(errors),
        "mean_nfe": statistics.fmean(nfes),
        "per_problem_error_x_tol": errors,
        "per_problem_nfe": nfes,
    }


def plot(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4.2))
    ax_err, ax_nfe = fig.subplots(1, 2)
    for label in VARIANTS:
        mine = [r for r in rows if r["method"] == label]
        tol = [r["rtol"] for r in mine]
        style = "--" if "+" in label else "-"
        ax_err.loglog(tol, [r["max_error_x_tol"] for r in mine], style, marker="o", label=label)
        ax_nfe.loglog(tol, [r["mean_nfe"] for r in mine], style, marker="o", label=label)
    ax_err.axhline(1.0, color="grey", lw=0.8)
    ax_err.set(xlabel="rtol = atol", ylabel="worst error / (atol + rtol |y|)", title="Error in units of tolerance")
    ax_nfe.set(xlabel="rtol = atol", ylabel="mean forward NFE", title="Cost")
    for ax in (ax_err, ax_nfe):
        ax.invert_xaxis()
        ax.grid(True, which="major", alpha=0.3)
    ax_err.legend(fontsize=8)
    fig.suptitle("Adaptive methods vs scipy DOP853 (1e-13), 8 problems, outputs at 5 times on [0, 2]")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/solver_accuracy.json"))
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = problems()
    rows = []
    print(f"{'method':14} {'rtol':>7} {'worst err':>10} {'median err':>11} {'mean NFE':>9}")
    for label in args.methods:
        for rtol in TOLERANCES:
            row = measure(label, rtol, cases)
            rows.append(row)
            print(
                f"{label:14} {rtol:7.0e} {row['max_error_x_tol']:10.3g} {row['median_error_x_tol']:11.3g} "
                f"{row['mean_nfe']:9.1f}",
                flush=True,
            )
    result = {
        "command": "python " + " ".join(sys.argv),
        "environment": {
            "torch": torch.__version__,
            "torchdiffeq": metadata.version("torchdiffeq"),
            "scipy": metadata.version("scipy"),
            "python": platform.python_version(),
        },
        "problems": [p.name for p in cases],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
