"""Issue 9, item 4: tolerance policies on fast testbeds, many iterations and five seeds per arm.

    python benchmarks/learned_tolerance.py --workers 2                  # the whole grid (resumable), then the report
    python benchmarks/learned_tolerance.py --testbeds 8gaussians --arms fixed-1e-5 learned-probe --seeds 0 \\
        --iterations 50 --out /tmp/lt                                    # a smoke
    python benchmarks/learned_tolerance.py --report-only                # aggregate what is on disk

Grid: testbeds (``TESTBED_PRESETS``) x arms (``ARMS``) x seeds. Each run is one
:func:`tolgate_flows.testbed.run_testbed` in ``<out>/<testbed>/<arm>/seed<k>/``; a run whose
``summary.json`` exists is skipped, so an interrupted grid resumes run by run. A run that fails
(a solve over its step budget, say) writes a summary with a ``failed`` message instead of
metrics. ``gate-mean`` runs last: they fix each block's tolerance at the final tolerance of the
``learned-probe`` run of the same testbed and seed.

Within a seed every arm starts from the same flow and sees the same batches; every run is
scored on the same held-out samples at the fixed ``eval_tol`` (1e-5). The report (mean ± std over
seeds, the best fixed tolerance in hindsight, cost ratios, the frontier figure) goes to
``--results`` (docs/results/learned_tolerance); see :mod:`tolgate_flows.testbed_report`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from tolgate import SolveError
from tolgate_flows.testbed import TestbedConfig, run_testbed
from tolgate_flows.testbed_report import write_report
from tolgate_flows.tolerance import ToleranceConfig

ROOT = Path(__file__).resolve().parents[1]

# testbed -> TestbedConfig settings. 2-D: FFJORD's toys at a size where the solver's cost, not
# the network, dominates an iteration.
# Sized for 2 CPU cores (about a minute per run): 400 iterations, one block for the unconditional
# sets, two for InfoCNF (z_y and z_u mix between them). Gates step at 0.1: the probe estimator
# updates them every probe_every (10) iterations only.
_TWO_D = {"hidden": 32, "batch": 256, "iterations": 400, "gate_lr": 0.1}
TESTBED_PRESETS: dict[str, dict] = {
    "1d": {
        "testbed": "1d",
        "kind": "cnf",
        "n_blocks": 1,
        "hidden": 64,
        "batch": 512,
        "float64": True,
        "iterations": 400,
        "gate_lr": 0.1,
    },
    "8gaussians": {"testbed": "8gaussians", "kind": "cnf", "n_blocks": 1, **_TWO_D},
    "checkerboard": {"testbed": "checkerboard", "kind": "cnf", "n_blocks": 1, **_TWO_D},
    "pinwheel-infocnf": {"testbed": "pinwheel-classes", "kind": "infocnf", "n_blocks": 2, **_TWO_D, "iterations": 300},
}
# arm -> ToleranceConfig settings.
ARMS: dict[str, dict] = {
    **{f"fixed-1e-{k}": {"mode": "fixed", "train_tol": 10.0**-k} for k in (5, 4, 3, 2, 1)},
    "learned-probe": {"mode": "learned", "estimator": "probe"},
    "learned-paper": {"mode": "learned", "estimator": "paper"},
    "adaptive": {"mode": "adaptive"},
    "frozen": {"mode": "frozen"},
    "gate-mean": {"mode": "gate-mean"},
}
GATE_MEAN_SOURCE = "learned-probe"

Job = tuple[str, str, int]  # (testbed, arm, seed)


def run_dir(out: Path, job: Job) -> Path:
    testbed, arm, seed = job
    return out / testbed / arm / f"seed{seed}"


def job_config(job: Job, out: Path, iterations: int | None) -> TestbedConfig:
    """The run's configuration; for ``gate-mean``, from its source run's final tolerances."""
    testbed, arm, seed = job
    settings = dict(TESTBED_PRESETS[testbed])
    if iterations is not None:
        settings["iterations"] = iterations
    tolerance = dict(ARMS[arm])
    if arm == "gate-mean":
        source = run_dir(out, (testbed, GATE_MEAN_SOURCE, seed)) / "summary.json"
        if not source.exists():
            raise FileNotFoundError(f"gate-mean needs the {GATE_MEAN_SOURCE} run {source}")
        summary = json.loads(source.read_text())
        if "failed" in summary:
            raise ValueError(f"{source}: the {GATE_MEAN_SOURCE} run failed; no gate means to fix")
        tolerance["gate_mean_log10"] = summary["final_log10_tolerance"]
    return TestbedConfig(**settings, seed=seed, tolerance=ToleranceConfig(**tolerance))


def run_job(job: Job, out: Path, iterations: int | None) -> str:
    """Run one grid cell unless its summary exists; returns a one-line report."""
    path = run_dir(out, job)
    if (path / "summary.json").exists():
        return f"{'/'.join(map(str, job))}: done before"
    try:
        config = job_config(job, out, iterations)
    except (FileNotFoundError, ValueError) as exc:  # gate-mean without a usable source run
        return f"{'/'.join(map(str, job))}: skipped, {exc}"
    torch.set_num_threads(1)  # one core per run: tiny tensors gain nothing from threads
    start = time.perf_counter()
    try:
        summary = run_testbed(config, path)
    except (SolveError, ValueError) as exc:  # a diverged run (NaN, step budget) is a result; the grid goes on
        testbed, arm, seed = job
        failed = {"testbed": testbed, "arm": arm, "seed": seed, "failed": f"{type(exc).__name__}: {exc}"}
        path.mkdir(parents=True, exist_ok=True)
        (path / "summary.json").write_text(json.dumps(failed, indent=1))
        return f"{'/'.join(map(str, job))}: FAILED {failed['failed']}"
    return (
        f"{'/'.join(map(str, job))}: test NLL {summary['test_nll']:.4f}, NFE {summary['nfe_total']:.1f}, "
        f"log10 tol {[round(t, 2) for t in summary['final_log10_tolerance']]}, {time.perf_counter() - start:.0f}s"
    )


def run_grid(jobs: list[Job], out: Path, iterations: int | None, workers: int) -> None:
    """Every job, ``workers`` processes at a time; ``gate-mean`` jobs after all others."""
    phases = [[j for j in jobs if j[1] != "gate-mean"], [j for j in jobs if j[1] == "gate-mean"]]
    with tqdm(total=len(jobs), desc="runs") as bar:
        for phase in phases:
            if workers == 1:
                messages = (run_job(job, out, iterations) for job in phase)
                for message in messages:
                    bar.write(message)
                    bar.update(1)
                continue
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(run_job, job, out, iterations) for job in phase]
                for future in futures:
                    bar.write(future.result())
                    bar.update(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbeds", nargs="+", choices=list(TESTBED_PRESETS), default=list(TESTBED_PRESETS))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--iterations", type=int, help="override every testbed's preset (default: the preset's)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process and one thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/learned_tolerance"), help="run folders")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "learned_tolerance")
    parser.add_argument("--report-only", action="store_true", help="aggregate the runs on disk; run nothing")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not args.report_only:
        # Seed-major: an interrupted grid has every testbed and arm at its first seeds.
        jobs = [(testbed, arm, seed) for seed in args.seeds for testbed in args.testbeds for arm in args.arms]
        run_grid(jobs, args.out, args.iterations, args.workers)
    report = write_report(args.out, args.results, " ".join(["python", *sys.argv]))
    for testbed, entry in report.items():
        best = entry["best_fixed"]
        print(f"{testbed}: best fixed in hindsight {best['arm'] if best else 'n/a (no fixed-1e-5 runs)'}")
        for arm, ratio in entry["ratios"].items():
            print(
                f"  {arm:14s} NFE x{ratio['nfe_total_vs_best_fixed']:.2f} of best fixed, "
                f"x{ratio['nfe_total_vs_reference']:.2f} of 1e-5; test NLL {ratio['test_nll_minus_reference']:+.4f}"
            )
    print(f"wrote {args.results / 'summary.json'} and {args.results / 'frontier.png'}")


if __name__ == "__main__":
    main()
