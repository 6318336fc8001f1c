"""Issue 9, item 4: tolerance policies on fast testbeds, many iterations and five seeds per arm.

    python benchmarks/learned_tolerance.py --workers 2                  # the whole grid (resumable), then the report
    python benchmarks/learned_tolerance.py --testbeds 8gaussians --arms fixed-1e-5 learned-probe --seeds 0 \\
        --iterations 50 --out /tmp/lt                                    # a smoke
    python benchmarks/learned_tolerance.py --report-only                # aggregate what is on disk

Grid: testbeds (``TESTBED_PRESETS``) x arms (``ARMS``) x seeds, run by
:mod:`studies.testbed_grid` (resumable cell by cell). ``gate-mean`` runs last: they fix
each block's tolerance at the final tolerance of the ``learned-probe`` run of the same testbed
and seed.

Within a seed every arm starts from the same flow and sees the same batches; every run is
scored on the same held-out samples at the fixed ``eval_tol`` (1e-5). The report (mean ± std over
seeds, the best fixed tolerance in hindsight, cost ratios, the frontier figure) goes to
``--results`` (docs/results/learned_tolerance); see :mod:`studies.testbed_report`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from studies.testbed_grid import Job, run_dir, run_grid
from studies.testbed_report import write_report
from tolgate_flows.testbed import TestbedConfig
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
        # gate-mean runs last: they read the learned-probe run of their testbed and seed.
        phases = [[j for j in jobs if j[1] != "gate-mean"], [j for j in jobs if j[1] == "gate-mean"]]
        run_grid(
            phases, args.out, functools.partial(job_config, out=args.out, iterations=args.iterations), args.workers
        )
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
