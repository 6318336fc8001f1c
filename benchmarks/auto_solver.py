"""Issue 16's study: the automatic ladder policy against FFJORD-style and hand-picked training.

    python benchmarks/auto_solver.py --run --workers 2      # the 2-D grid (resumable), then the report
    python benchmarks/reproduce_table1.py --levers --rows a-auto a-auto-rnode --out runs/digits_study
    python benchmarks/auto_solver.py --cheapest-eval runs/digits_study/a-auto-rnode-seed0 ...
    python benchmarks/auto_solver.py --timing               # wall time per iteration, side by side
    python benchmarks/auto_solver.py                        # the report from what is on disk

2-D: the arms of ``benchmarks/fewer_nfe.py`` that matter here (FFJORD-style fixed 1e-5, the
hand-picked RNODE stacks with RK4 at h = 0.25, 0.5, 1, RK4 h = 0.25 alone, the noise-matched
tolerance, and the automatic policy with and without RNODE's penalties) on 8gaussians and
checkerboard, 3 seeds, 400 iterations, logged every 10 iterations. Digits: the rows of
``reproduce_table1.py --levers`` (InfoCNF, cpu preset, 300 iterations, 3 seeds), read from
``--digits-results``; ``--cheapest-eval`` evaluates finished digits runs at every rung of the
evaluation ladder and writes ``cheapest_eval.json`` next to their results. The report
(:mod:`studies.auto_solver`) goes to ``--results``: ``summary.json``, a figure per testbed and
one for digits (training NFE per iteration over training; each block's rung).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # studies/ beside benchmarks/

from fewer_nfe import job_config, time_arms  # noqa: E402

from studies import auto_solver as study  # noqa: E402
from studies.testbed_grid import run_grid  # noqa: E402
from tolgate_flows.cheapest_eval import evaluate_run_ladder  # noqa: E402

TESTBEDS = ("8gaussians", "checkerboard")
ARMS = ("ffjord", "rnode", "rnode-h0.5", "rnode-h1", "rk4", "adaptive", "auto", "auto-rnode")
FIGURE_ARMS = ("ffjord", "rnode-h0.5", "adaptive", "auto", "auto-rnode")
DIGITS_FIGURE_ROWS = ("s-fixed-1e-5", "l-rnode-h1", "s-adaptive", "a-auto", "a-auto-rnode")
TIMING_ARMS = ["ffjord", "rnode-h0.5", "adaptive", "auto", "auto-rnode"]


def _fmt(entry: dict, key: str, digits: int = 2) -> str:
    value = entry[key]
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}" if value["mean"] is not None else "-"


def table(rows: dict, quality: str) -> str:
    """A markdown table of a report's arms (or digits rows)."""
    lines = [
        f"| arm | train NFE/iter | fewer than reference | paired {quality} | equal | final settings (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    paired = "paired_test_nll" if quality == "nats" else "paired_test_bpd"
    for name, entry in sorted(rows.items(), key=lambda item: item[1]["nfe_train"]["mean"]):
        settings = "; ".join(" ".join(s) for s in entry["final_settings"] if s)
        lines.append(
            f"| {name} | {_fmt(entry, 'nfe_train', 1)} | {entry['saving_vs_reference']:.2f}x | "
            f"{_fmt(entry, paired, 4)} | {'yes' if entry['equal_quality'] else 'no'} | {settings} |"
        )
    return "\n".join(lines)


def cheapest_eval(run_dirs: list[Path], digits_results: Path) -> None:
    for run_dir in run_dirs:
        rungs = evaluate_run_ladder(run_dir)
        dest = digits_results / run_dir.name
        dest.mkdir(parents=True, exist_ok=True)
        record = {"command": f"python benchmarks/auto_solver.py --cheapest-eval {run_dir}", "noise_seed": 0}
        record["rungs"] = [r.as_dict() for r in rungs]
        (dest / "cheapest_eval.json").write_text(json.dumps(record, indent=1))
        print(run_dir.name, ", ".join(f"{r.setting} {r.quality:.4f} ({r.nfe_forward:.0f})" for r in rungs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the 2-D grid first (resumable)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel, one process and one thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/auto_solver"), help="2-D run folders")
    parser.add_argument("--digits-results", type=Path, default=ROOT / "docs" / "results" / "digits_levers")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "auto_solver")
    parser.add_argument("--cheapest-eval", nargs="+", type=Path, metavar="RUN_DIR", help="digits runs to evaluate")
    parser.add_argument("--timing", action="store_true", help="time FFJORD-style, hand-picked and automatic arms")
    parser.add_argument("--timing-warmup", type=int, default=100)
    parser.add_argument("--timing-rounds", type=int, default=4)
    args = parser.parse_args()
    command = " ".join(["python", *sys.argv])
    if args.cheapest_eval:
        cheapest_eval(args.cheapest_eval, args.digits_results)
        return
    args.results.mkdir(parents=True, exist_ok=True)
    if args.timing:
        timing = time_arms(TESTBEDS[0], TIMING_ARMS, args.timing_warmup, args.timing_rounds)
        (args.results / "timing.json").write_text(json.dumps({"command": command, "arms": timing}, indent=1))
        for arm, row in timing.items():
            print(
                f"{arm:12s} median {row['median_seconds_per_iteration'] * 1e3:6.1f} ms/iter "
                f"({row['ratio_to_ffjord']:.2f}x), mean with probes {row['mean_seconds_per_iteration'] * 1e3:6.1f} "
                f"({row['mean_ratio_to_ffjord']:.2f}x)"
            )
        return
    if args.run:
        jobs = [(testbed, arm, seed) for seed in args.seeds for testbed in TESTBEDS for arm in ARMS]
        run_grid([jobs], args.out, functools.partial(job_config, iterations=None), args.workers)
    report = {"command": command, "testbeds": {}, "digits": None}
    for testbed in TESTBEDS:
        report["testbeds"][testbed] = study.testbed_report(args.out, testbed)
        curves = study.testbed_figure_data(args.out, testbed, FIGURE_ARMS)
        study.plot_training(curves, testbed, args.results / f"{testbed}.png")
        print(f"\n## {testbed}\n\n{table(report['testbeds'][testbed]['arms'], 'nats')}")
        print(report["testbeds"][testbed]["hand_picked_best"], report["testbeds"][testbed]["automatic_vs_hand_picked"])
    try:
        report["digits"] = study.digits_report(args.digits_results)
    except FileNotFoundError as exc:
        print(f"digits: {exc}")
    else:
        curves = study.digits_figure_data(args.digits_results, DIGITS_FIGURE_ROWS)
        study.plot_training(curves, "digits (InfoCNF)", args.results / "digits.png")
        print(f"\n## digits\n\n{table(report['digits']['rows'], 'bits/dim')}")
        print(report["digits"]["hand_picked_best"], report["digits"]["automatic_vs_hand_picked"])
    (args.results / "summary.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
