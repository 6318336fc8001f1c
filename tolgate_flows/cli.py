"""Command line of the training entry point (benchmarks/cifar_infocnf.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

from .report import comparison_table
from .train import PRESETS, TOLERANCE_MODES, TrainConfig, gate_mean_from_run, run

# The README's main job: Table 1's three rows on the bundled digits, a few minutes on 2 cores.
COMPARISON = (("ccnf", "fixed"), ("infocnf", "fixed"), ("infocnf", "learned"))


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
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--out", help="output folder (metrics.jsonl, checkpoints, plots, summary.json)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--n-flows", type=int)
    p.add_argument("--n-scales", type=int)
    p.add_argument("--method", choices=["dopri5", "bosh3", "fehlberg2", "adaptive_heun"])
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
        help="run CCNF fixed, InfoCNF fixed and InfoCNF learned into OUT/<row> and print Table 1",
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
    for model, tolerance in COMPARISON:
        name = f"{model}-{tolerance}"
        print(f"== {name}", flush=True)
        summaries[name] = run(
            config_from_args(args, model=model, tolerance=tolerance, out=str(base / name)), resume=args.resume
        )
    print(comparison_table(summaries))
