"""Issue 12's stacked study on the 2-D testbeds: which levers cut training NFE at equal quality?

    python benchmarks/fewer_nfe.py --workers 2                # the whole grid (resumable), then the report
    python benchmarks/fewer_nfe.py --testbeds 8gaussians --arms ffjord rnode --seeds 0 \\
        --iterations 20 --out /tmp/fn --results /tmp/fn_results   # a smoke
    python benchmarks/fewer_nfe.py --report-only              # aggregate what is on disk
    python benchmarks/fewer_nfe.py --timing                   # wall time per iteration, side by side

Arms (``ARMS``): the reference ``ffjord`` (dopri5, fixed 1e-5, direct backpropagation), the
fixed-tolerance frontier to 1e-1, each lever alone (RNODE's fixed-grid RK4 at h = 0.25, RNODE's
kinetic + Jacobian penalties at lambda = 0.01, the solver's local-error and stiffness penalties
(lambda = 0.01),
STEER at b = 0.5, the seminorm adjoint, the noise-matched adaptive tolerance) and stacks of them.
Every arm is evaluated the same way: dopri5 at fixed 1e-5 on the same held-out samples, test NLL
in nats and the NFE that evaluation needs. Within a seed every arm starts from the same flow and
sees the same batches. Runs go to ``<out>/<testbed>/<arm>/seed<k>/`` (resumable, see
:mod:`studies.testbed_grid`); the report (:mod:`studies.levers_report`: training NFE
forward + backward + probes, savings against ``ffjord``, paired NLL, the figure) to ``--results``.

Wall time. The grid's runs follow one another on a shared machine, so their seconds per iteration
are not comparable. ``--timing`` measures them side by side in one process: every arm (seed 0,
first testbed) is trained ``--timing-warmup`` iterations, then the arms take turns, ``--timing-rounds``
rounds of 10 iterations each (the order reversed every other round), and the report is each arm's
median seconds per iteration and its ratio to ``ffjord``'s (``<results>/timing.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

from studies.levers_report import write_report
from studies.testbed_grid import Job, run_grid
from tolgate_flows.levers import LeverConfig
from tolgate_flows.testbed import TestbedConfig, Training
from tolgate_flows.tolerance import ToleranceConfig

ROOT = Path(__file__).resolve().parents[1]

# The learned-tolerance study's 2-D presets (benchmarks/learned_tolerance.py): one block, 400 iterations.
_TWO_D = {"kind": "cnf", "n_blocks": 1, "hidden": 32, "batch": 256, "iterations": 400, "gate_lr": 0.1, "log_every": 10}
TESTBED_PRESETS: dict[str, dict] = {
    "8gaussians": {"testbed": "8gaussians", **_TWO_D},
    "checkerboard": {"testbed": "checkerboard", **_TWO_D},
}

_RNODE = {"kinetic": 0.01, "jacobian": 0.01}
_RK4 = {"train_method": "rk4", "train_step_size": 0.25}
_SEMINORM = {"adjoint": True, "seminorm": True}
_FIXED = {"mode": "fixed", "train_tol": 1e-5}
_ADAPTIVE = {"mode": "adaptive"}
_AUTO = {"mode": "auto"}
# arm -> (ToleranceConfig settings, LeverConfig settings, other TestbedConfig settings)
ARMS: dict[str, tuple[dict, dict, dict]] = {
    "ffjord": (_FIXED, {}, {}),
    **{f"fixed-1e-{k}": ({"mode": "fixed", "train_tol": 10.0**-k}, {}, {}) for k in (3, 2, 1)},
    # each lever alone
    "rk4": (_FIXED, _RK4, {}),
    "kinetic-jacobian": (_FIXED, _RNODE, {}),
    "local-error": (_FIXED, {"local_error": 0.01}, {}),
    "stiffness": (_FIXED, {"stiffness": 0.01}, {}),
    "steer": (_FIXED, {"steer": 0.5}, {}),
    "seminorm": (_FIXED, {}, _SEMINORM),
    "adaptive": (_ADAPTIVE, {}, {}),
    # stacks
    "rnode": (_FIXED, {**_RNODE, **_RK4}, {}),
    "rnode-h0.5": (_FIXED, {**_RNODE, "train_method": "rk4", "train_step_size": 0.5}, {}),
    "rnode-h1": (_FIXED, {**_RNODE, "train_method": "rk4", "train_step_size": 1.0}, {}),
    "adaptive-kj-local-error": (_ADAPTIVE, {**_RNODE, "local_error": 0.01}, {}),
    "adaptive-kj-seminorm": (_ADAPTIVE, _RNODE, _SEMINORM),
    # issue 16: the automatic policy on the ladder of tolerances and grids, no step or tolerance by hand
    "auto": (_AUTO, {}, {}),
    "auto-rnode": (_AUTO, _RNODE, {}),
    "auto-learned-rnode": ({"mode": "auto-learned"}, _RNODE, {}),
}


def job_config(job: Job, iterations: int | None = None) -> TestbedConfig:
    """The configuration of one grid cell."""
    testbed, arm, seed = job
    settings = dict(TESTBED_PRESETS[testbed])
    if iterations is not None:
        settings["iterations"] = iterations
    tolerance, levers, extra = ARMS[arm]
    return TestbedConfig(
        **settings, **extra, seed=seed, tolerance=ToleranceConfig(**tolerance), levers=LeverConfig(**levers)
    )


def time_arms(testbed: str, arms: list[str], warmup: int, rounds: int, per_round: int = 10) -> dict:
    """Median seconds per training iteration of every arm, measured in turns in this process."""
    torch.set_num_threads(1)
    states = {}
    for arm in arms:
        states[arm] = Training.start(job_config((testbed, arm, 0)))
        for iteration in range(warmup):
            states[arm].step(iteration)
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    nfe: dict[str, list[int]] = {arm: [] for arm in arms}
    for round_ in range(rounds):
        for arm in arms if round_ % 2 == 0 else arms[::-1]:
            for k in range(per_round):
                stats = states[arm].step(warmup + round_ * per_round + k)
                seconds[arm].append(stats.seconds)
                nfe[arm].append(stats.nfe_forward + stats.nfe_backward)
    medians = {arm: statistics.median(values) for arm, values in seconds.items()}
    reference = medians.get("ffjord")
    return {
        arm: {
            "median_seconds_per_iteration": medians[arm],
            # the mean counts the iterations that run probes (one in probe_every), the median does not
            "mean_seconds_per_iteration": statistics.fmean(seconds[arm]),
            "mean_ratio_to_ffjord": None
            if reference is None
            else statistics.fmean(seconds[arm]) / statistics.fmean(seconds["ffjord"]),
            "ratio_to_ffjord": None if reference is None else medians[arm] / reference,
            "mean_nfe_forward_plus_backward": statistics.fmean(nfe[arm]),
            "iterations_timed": len(seconds[arm]),
        }
        for arm in arms
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbeds", nargs="+", choices=list(TESTBED_PRESETS), default=list(TESTBED_PRESETS))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, help="override every testbed's preset (default: the preset's)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process and one thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/fewer_nfe"), help="run folders")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "fewer_nfe")
    parser.add_argument("--report-only", action="store_true", help="aggregate the runs on disk; run nothing")
    parser.add_argument("--timing", action="store_true", help="time the arms side by side (see above); no grid")
    parser.add_argument("--timing-warmup", type=int, default=100, help="training iterations before timing")
    parser.add_argument("--timing-rounds", type=int, default=4, help="rounds of 10 timed iterations per arm")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.timing:
        timing = time_arms(args.testbeds[0], args.arms, args.timing_warmup, args.timing_rounds)
        args.results.mkdir(parents=True, exist_ok=True)
        record = {"command": " ".join(["python", *sys.argv]), "testbed": args.testbeds[0], "arms": timing}
        (args.results / "timing.json").write_text(json.dumps(record, indent=1))
        for arm, row in sorted(timing.items(), key=lambda item: item[1]["median_seconds_per_iteration"]):
            ratio = "n/a" if row["ratio_to_ffjord"] is None else f"{row['ratio_to_ffjord']:.2f}x"
            print(
                f"{arm:26s} {row['median_seconds_per_iteration'] * 1e3:7.1f} ms/iter ({ratio} ffjord), "
                f"NFE f+b {row['mean_nfe_forward_plus_backward']:.1f}"
            )
        return
    if not args.report_only:
        # Seed-major: an interrupted grid has every testbed and arm at its first seeds.
        jobs = [(testbed, arm, seed) for seed in args.seeds for testbed in args.testbeds for arm in args.arms]
        run_grid([jobs], args.out, functools.partial(job_config, iterations=args.iterations), args.workers)
    report = write_report(args.out, args.results, " ".join(["python", *sys.argv]))
    for testbed, entry in report.items():
        print(f"{testbed} (equal quality: paired test NLL within {entry['margin_nats']:.3f} nats of ffjord)")
        for arm, saving in sorted(entry["savings"].items(), key=lambda item: -item[1]["train_nfe_saving"]):
            verdict = "" if saving["equal_quality"] else "  (worse)"
            print(
                f"  {arm:26s} train NFE x{saving['train_nfe_saving']:.2f} fewer, "
                f"eval NFE x{saving['eval_nfe_saving']:.2f} fewer, paired NLL {saving['paired_test_nll']:+.4f}{verdict}"
            )
    print(f"wrote {args.results / 'summary.json'} and {args.results / 'levers.png'}")


if __name__ == "__main__":
    main()
