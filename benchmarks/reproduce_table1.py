"""Issue 4's grid: the paper's comparison (Table 1, Figure 4) at CPU scale, with an honest protocol.

    python benchmarks/reproduce_table1.py --out runs/table1 --workers 2          # run (resumable)
    python benchmarks/reproduce_table1.py --out runs/table1 --report-only         # tables and figures

Every row uses the same architecture, optimiser, Hutchinson noise (Rademacher), epochs and seeds;
only the model and the training tolerance differ. Each run selects its epoch on the validation
split and every model is evaluated at the same fixed tolerance (``--eval-tol``, 1e-5), with one
Rademacher Hutchinson draw per image (the same for every model); the selected checkpoint is
re-evaluated at 1e-6 and 1e-7 (Section 4.2). Runs are subprocesses of the training entry point,
one per (row, seed); a finished run (its summary.json exists) is skipped, an interrupted one
resumes from its last checkpoint. Each run's metrics.jsonl and summary.json are copied to
``--results`` (docs/results/table1 by default) for the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "benchmarks" / "cifar_infocnf.py"

# row name -> (description, extra flags). Row numbers follow issue 4's table.
ROWS: dict[str, tuple[str, list[str]]] = {
    "1-ccnf-fixed-1e-5": ("CCNF, fixed 1e-5", ["--model", "ccnf", "--tolerance", "fixed", "--train-tol", "1e-5"]),
    "2-infocnf-fixed-1e-5": (
        "InfoCNF, fixed 1e-5",
        ["--model", "infocnf", "--tolerance", "fixed", "--train-tol", "1e-5"],
    ),
    "3-infocnf-learned": (
        "InfoCNF, learned (GaussianGate + REINFORCE)",
        ["--model", "infocnf", "--tolerance", "learned", "--estimator", "paper"],
    ),
    "4-infocnf-gate-mean": (
        "InfoCNF, fixed at the trained gates' mean (per block)",
        ["--model", "infocnf", "--tolerance", "gate-mean"],
    ),
    "5-infocnf-frozen": ("InfoCNF, gate frozen at random init", ["--model", "infocnf", "--tolerance", "frozen"]),
    "6a-infocnf-fixed-1e-4": (
        "InfoCNF, fixed 1e-4",
        ["--model", "infocnf", "--tolerance", "fixed", "--train-tol", "1e-4"],
    ),
    "6b-infocnf-fixed-1e-3": (
        "InfoCNF, fixed 1e-3",
        ["--model", "infocnf", "--tolerance", "fixed", "--train-tol", "1e-3"],
    ),
    "7-infocnf-fixed-1e-5-seminorm": (
        "InfoCNF, fixed 1e-5, seminorm adjoint",
        ["--model", "infocnf", "--tolerance", "fixed", "--train-tol", "1e-5", "--adjoint", "--seminorm"],
    ),
    "7b-infocnf-fixed-1e-5-adjoint": (
        "InfoCNF, fixed 1e-5, plain adjoint (the seminorm's reference)",
        ["--model", "infocnf", "--tolerance", "fixed", "--train-tol", "1e-5", "--adjoint"],
    ),
    "8a-cnf-fixed-1e-5": (
        "CNF (unconditional), fixed 1e-5",
        ["--model", "cnf", "--tolerance", "fixed", "--train-tol", "1e-5"],
    ),
    "8b-cnf-learned": (
        "CNF (unconditional), learned",
        ["--model", "cnf", "--tolerance", "learned", "--estimator", "paper"],
    ),
    "9-infocnf-learned-per-sample": (
        "InfoCNF, learned per-sample tolerances, per-sample solver (issue 6)",
        ["--model", "infocnf", "--tolerance", "learned", "--estimator", "paper", "--backend", "tolgate"],
    ),
}
# Issue 4's "principled changes to the estimator", run after the main grid.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "3b-infocnf-learned-reward-bwd": (
        "InfoCNF, learned, reward includes backward NFE",
        ["--model", "infocnf", "--tolerance", "learned", "--estimator", "paper", "--reward-backward-nfe"],
    ),
    "3c-infocnf-learned-alpha-0.1": (
        "InfoCNF, learned, alpha 0.1 (10x price per NFE)",
        ["--model", "infocnf", "--tolerance", "learned", "--estimator", "paper", "--alpha", "0.1"],
    ),
    "3d-infocnf-learned-nfe-only-return": (
        "InfoCNF, learned, return without the task loss (NFE price only)",
        ["--model", "infocnf", "--tolerance", "learned", "--estimator", "paper", "--reward-loss-weight", "0"],
    ),
}

# Issue 9's digits study: does a learned tolerance (probe estimator) or the deterministic
# noise-matched policy beat loosening? InfoCNF on the fixed-tolerance frontier extended to 1e-1,
# 30 epochs of the cpu preset (300 iterations). Run with --study (its own results folder).
STUDY: dict[str, tuple[str, list[str]]] = {
    **{
        f"s-fixed-1e-{k}": (
            f"InfoCNF, fixed 1e-{k}",
            ["--model", "infocnf", "--tolerance", "fixed", "--train-tol", f"1e-{k}"],
        )
        for k in (5, 3, 2, 1)
    },
    "s-learned-probe": ("InfoCNF, learned (probe estimator)", ["--model", "infocnf", "--tolerance", "learned"]),
    "s-adaptive": ("InfoCNF, noise-matched (deterministic)", ["--model", "infocnf", "--tolerance", "adaptive"]),
}

# Issue 12's digits study: training levers alone and stacked (RNODE: fixed-grid RK4 at h = 0.25,
# kinetic + Jacobian penalties at 0.01), same preset and 30 epochs as the tolerance study, whose
# fixed 1e-5 (FFJORD-style) and noise-matched rows it shares. Run with --levers.
_RNODE_PENALTIES = ["--kinetic", "0.01", "--jacobian", "0.01"]
_RK4 = ["--train-method", "rk4", "--train-step-size", "0.25"]
LEVERS: dict[str, tuple[str, list[str]]] = {
    "s-fixed-1e-5": STUDY["s-fixed-1e-5"],
    "s-adaptive": STUDY["s-adaptive"],
    "l-rnode": (
        "InfoCNF, RNODE: RK4 h=0.25 + kinetic + Jacobian",
        [*STUDY["s-fixed-1e-5"][1], *_RK4, *_RNODE_PENALTIES],
    ),
    "l-rnode-h0.5": (
        "InfoCNF, RNODE with RK4 h=0.5 (two steps) + kinetic + Jacobian",
        [*STUDY["s-fixed-1e-5"][1], "--train-method", "rk4", "--train-step-size", "0.5", *_RNODE_PENALTIES],
    ),
    "l-rnode-h1": (
        "InfoCNF, RNODE with RK4 h=1 (one step) + kinetic + Jacobian",
        [*STUDY["s-fixed-1e-5"][1], "--train-method", "rk4", "--train-step-size", "1.0", *_RNODE_PENALTIES],
    ),
    "l-adaptive-kj": (
        "InfoCNF, noise-matched tolerance + kinetic + Jacobian",
        [*STUDY["s-adaptive"][1], *_RNODE_PENALTIES],
    ),
    "l-rk4": ("InfoCNF, RK4 h=0.25 alone", [*STUDY["s-fixed-1e-5"][1], *_RK4]),
    "l-local-error": (
        "InfoCNF, fixed 1e-5 + local-error penalty 0.01",
        [*STUDY["s-fixed-1e-5"][1], "--local-error", "0.01"],
    ),
    "l-stiffness": ("InfoCNF, fixed 1e-5 + stiffness penalty 0.01", [*STUDY["s-fixed-1e-5"][1], "--stiffness", "0.01"]),
    "l-steer": ("InfoCNF, fixed 1e-5 + STEER b=0.5", [*STUDY["s-fixed-1e-5"][1], "--steer", "0.5"]),
    "l-seminorm": ("InfoCNF, fixed 1e-5, seminorm adjoint", [*STUDY["s-fixed-1e-5"][1], "--adjoint", "--seminorm"]),
    "l-kinetic-jacobian": ("InfoCNF, fixed 1e-5 + kinetic + Jacobian", [*STUDY["s-fixed-1e-5"][1], *_RNODE_PENALTIES]),
    # issue 16: the automatic policy on the ladder of tolerances and fixed grids, no step or tolerance by hand
    "a-auto": ("InfoCNF, automatic solver setting per block", ["--model", "infocnf", "--tolerance", "auto"]),
    "a-auto-rnode": (
        "InfoCNF, automatic solver setting per block + kinetic + Jacobian",
        ["--model", "infocnf", "--tolerance", "auto", *_RNODE_PENALTIES],
    ),
    "a-auto-learned-rnode": (
        "InfoCNF, learned departures from the automatic setting + kinetic + Jacobian",
        ["--model", "infocnf", "--tolerance", "auto-learned", *_RNODE_PENALTIES],
    ),
}

# Paper's Table 1 (CIFAR-10, batch 900) and the unconditional CNF of Section 4.4, for the side-by-side.
PAPER = {
    "1-ccnf-fixed-1e-5": "33.09 / 3.511 / 924",
    "2-infocnf-fixed-1e-5": "21.50 / 3.533 / 985",
    "3-infocnf-learned": "20.99 / 3.568 / 776",
    "8a-cnf-fixed-1e-5": "- / 3.37 / -",
    "8b-cnf-learned": "- / 3.37 / -15% NFE",
}


def run_one(name: str, flags: list[str], seed: int, args: argparse.Namespace) -> str:
    out = Path(args.out) / f"{name}-seed{seed}"
    if (out / "summary.json").exists():
        _collect(out, seed, args)
        return f"{out.name}: done before"
    extra = list(flags)
    if "gate-mean" in flags:
        extra += ["--gate-mean-from", str(Path(args.out) / f"3-infocnf-learned-seed{seed}")]
    cmd = [
        sys.executable,
        str(ENTRY),
        "--preset",
        args.preset,
        "--seed",
        str(seed),
        "--epochs",
        str(args.epochs),
        "--eval-tol",
        "1e-5",
        "--recheck-tols",
        "1e-6",
        "1e-7",
        "--no-progress",
        "--out",
        str(out),
        *extra,
        *args.common,
    ]
    if (out / "last.pt").exists():
        cmd.append("--resume")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "stdout.log").open("a") as log:
        done = subprocess.run(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
    if done.returncode != 0:
        return f"{out.name}: FAILED (exit {done.returncode}), see {out / 'stdout.log'}"
    _collect(out, seed, args)
    return f"{out.name}: finished"


def _collect(out: Path, seed: int, args: argparse.Namespace) -> None:
    """Copy a finished run's JSON (and, for the first seed, its figures) to the results folder."""
    dest = Path(args.results) / out.name
    dest.mkdir(parents=True, exist_ok=True)
    for file in ("summary.json", "metrics.jsonl", "config.json"):
        shutil.copy(out / file, dest / file)
    for file in ("tolerances.png", "samples.png", "curves.png"):
        if (out / file).exists() and seed == args.seeds[0]:
            shutil.copy(out / file, dest / file)


def load_summaries(results: Path, rows: dict) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for name in rows:
        runs = sorted(results.glob(f"{name}-seed*/summary.json"))
        if runs:
            found[name] = [json.loads(p.read_text()) for p in runs]
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/table1", help="run folders (checkpoints; not committed)")
    p.add_argument("--results", default=str(ROOT / "docs" / "results" / "table1"), help="JSON copies (committed)")
    p.add_argument("--preset", default="grid")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="*", help="subset of rows (default: the main grid; see --variants)")
    p.add_argument("--variants", action="store_true", help="run the estimator variants instead of the main grid")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (one CPU thread each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--study",
        action="store_true",
        help="issue 9's digits study (STUDY rows, preset cpu, 30 epochs) into docs/results/digits_tolerance",
    )
    p.add_argument(
        "--levers",
        action="store_true",
        help="issue 12's digits study (LEVERS rows, preset cpu, 30 epochs) into docs/results/digits_levers",
    )
    p.add_argument("--common", nargs=argparse.REMAINDER, default=[], help="flags passed to every run (last)")
    args = p.parse_args()
    if args.study or args.levers:
        args.preset, args.epochs = "cpu", 30
        if args.results == p.get_default("results"):
            args.results = str(ROOT / "docs" / "results" / ("digits_levers" if args.levers else "digits_tolerance"))
    all_rows = {**ROWS, **VARIANTS, **STUDY, **LEVERS}
    study = LEVERS if args.levers else STUDY
    if not args.report_only:
        names = args.rows or list(study if args.study or args.levers else VARIANTS if args.variants else ROWS)
        # learned runs first: the gate-mean rows read their gates' means
        order = sorted(names, key=lambda n: 0 if n.startswith("3-") else 2 if n.startswith("4-") else 1)
        jobs = [(n, s) for s in args.seeds for n in order]
        jobs.sort(key=lambda job: 0 if job[0].startswith("3-") else 2 if job[0].startswith("4-") else 1)
        with ThreadPoolExecutor(args.workers) as pool:
            for message in pool.map(lambda job: run_one(job[0], all_rows[job[0]][1], job[1], args), jobs):
                print(message, flush=True)
    if args.levers:
        from studies.levers_report import digits_report, digits_table, plot_digits

        try:
            report = digits_report(load_summaries(Path(args.results), LEVERS))
        except FileNotFoundError as exc:
            p.error(str(exc))
        report["command"] = " ".join(["python", *sys.argv])
        (Path(args.results) / "summary.json").write_text(json.dumps(report, indent=1))
        plot_digits(report, Path(args.results) / "levers.png")
        print(digits_table(report))
        return
    if args.study:
        from tolgate_flows.report import comparison_table

        print(comparison_table(load_summaries(Path(args.results), study)))
        return
    from studies.grid_report import write_report

    write_report(load_summaries(Path(args.results), all_rows), all_rows, PAPER, Path(args.results))


if __name__ == "__main__":
    main()
