"""Command line of the training entry point (benchmarks/cifar_infocnf.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

from tolgate.solver import ADAPTIVE_METHODS

from .report import comparison_table
from .tolerance import ESTIMATORS, TOLERANCE_MODES
from .train import PRESETS, TrainConfig, gate_mean_from_run, run

# The README's main job: Table 1's three rows on the bundled digits, then the question the
# library exists for: does a learned tolerance beat simply loosening a fixed one? Rows: name and
# the settings that differ from the command line's.
COMPARISON: tuple[tuple[str, dict], ...] = (
    ("ccnf-fixed", dict(model="ccnf", tolerance="fixed")),
    ("infocnf-fixed", dict(model="infocnf", tolerance="fixed")),
    ("infocnf-fixed-1e-3", dict(model="infocnf", tolerance="fixed", train_tol=1e-3)),
    ("infocnf-learned-paper", dict(model="infocnf", tolerance="learned", estimator="paper")),
    ("infocnf-learned", dict(model="infocnf", tolerance="learned", estimator="probe")),
    ("infocnf-adaptive", dict(model="infocnf", tolerance="adaptive")),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train CNF / CCNF / InfoCNF with fixed, scheduled or learned ODE tolerances.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="base settings; explicit flags override them")
    p.add_argument("--dataset", choices=["cifar10", "mnist", "digits"])
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-bin (or -py) / the MNIST IDX files")
    p.add_argument("--model", choices=["cnf", "ccnf", "infocnf"])
    p.add_argument("--tolerance", choices=TOLERANCE_MODES)
    p.add_argument("--train-tol", type=float, help="fixed training tolerance; start of schedules and gates")
    p.add_argument("--eval-tol", type=float, help="fixed tolerance of every evaluation")
    p.add_argument("--schedule-end-tol", type=float, help="scheduled: tolerance reached at the last epoch")
    p.add_argument("--gate-mean-from", help="gate-mean: a learned run's output folder to read gate means from")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--gate-lr", type=float, help="learning rate of the gates (default: --lr)")
    p.add_argument("--lr-decay-epoch", type=int)
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--beta", type=float, help="weight of the cross-entropy (nats) against bits/dim (Eq. 4)")
    p.add_argument("--alpha", type=float, help="REINFORCE price of one NFE (Eq. 6)")
    p.add_argument(
        "--reward-backward-nfe",
        action="store_true",
        default=None,
        help="reward -(forward + backward) NFE instead of forward NFE",
    )
    p.add_argument(
        "--reward-loss-weight",
        type=float,
        help="weight of the task loss inside the REINFORCE return (Eq. 7 uses 1; 0: NFE only)",
    )
    p.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help="learned: 'probe' (draws on a probe of the batch, reference-calibrated return) or 'paper' (Eq. 7)",
    )
    p.add_argument("--probe-every", type=int, help="probe estimator / adaptive: probe every N iterations")
    p.add_argument("--probe-size", type=int, help="rows of the batch each probe solves")
    p.add_argument("--probe-draws", type=int, help="probe estimator: gate draws per probe (>= 2)")
    p.add_argument(
        "--budget-fraction",
        type=float,
        help="solver-error budget as a fraction of the minibatch loss's standard error (probe, adaptive)",
    )
    p.add_argument("--penalty", type=float, help="probe estimator: weight of exceeding the solver-error budget")
    p.add_argument("--adaptive-step", type=float, help="adaptive: decades moved per calibration")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--out", help="output folder (metrics.jsonl, checkpoints, plots, summary.json)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--n-flows", type=int)
    p.add_argument("--n-scales", type=int)
    p.add_argument("--method", choices=ADAPTIVE_METHODS)
    p.add_argument("--adjoint", action="store_true", default=None)
    p.add_argument(
        "--backend",
        choices=["torchdiffeq", "tolgate"],
        help="tolgate: per-sample step sizes and (with learned gates) per-sample tolerances",
    )
    p.add_argument("--seminorm", action="store_true", default=None, help="seminorm adjoint (needs --adjoint)")
    p.add_argument("--noise", choices=["rademacher", "gaussian"])
    p.add_argument("--zy-fraction", type=float)
    p.add_argument("--zy-location", choices=["first-scale", "top-scale"])
    p.add_argument("--eval-divergence", choices=["hutchinson", "exact"])
    p.add_argument("--eval-draws", type=int, help="Hutchinson draws averaged per test image")
    p.add_argument(
        "--eval-noise-seed",
        type=int,
        help="seed the evaluation noise per batch: every model and tolerance sees the same draws",
    )
    p.add_argument("--max-train-batches", type=int)
    p.add_argument("--max-eval-batches", type=int)
    p.add_argument("--recheck-tols", type=float, nargs="*", help="re-evaluate the selected checkpoint at these")
    p.add_argument("--sample-every", type=int, help="write a class-conditional sample grid every N epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument(
        "--compare",
        action="store_true",
        help="run CCNF fixed and InfoCNF fixed, fixed 1e-3, learned (paper, probe), adaptive into OUT/<row>; "
        "print the table",
    )
    return p


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    values = asdict(TrainConfig(out="runs/default"))
    if args.preset:
        values.update(PRESETS[args.preset])
    for f in fields(TrainConfig):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    if args.no_progress:
        values["progress_bar"] = False
    if args.gate_mean_from:
        values["gate_mean_log10"] = gate_mean_from_run(args.gate_mean_from)
    values.update(overrides)
    return TrainConfig.from_dict(values)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not args.compare:
        summary = run(config_from_args(args), resume=args.resume)
        if not summary.get("interrupted"):
            print(
                json.dumps(
                    {
                        k: summary[k]
                        for k in (
                            "selected_epoch",
                            "train_nfe_forward_mean",
                            "train_nfe_backward_mean",
                            "seconds_per_epoch_mean",
                        )
                    }
                )
            )
        return
    base = Path(args.out or "runs/compare")
    summaries = {}
    for name, settings in COMPARISON:
        print(f"== {name}", flush=True)
        summaries[name] = run(config_from_args(args, **settings, out=str(base / name)), resume=args.resume)
    print(comparison_table(summaries))
