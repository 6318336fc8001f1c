"""Command line of the training entry point (benchmarks/cifar_infocnf.py).

Every setting of :class:`~tolgate_flows.train.TrainConfig` has one flag: its own fields and those
of its nested model, levers and tolerance configurations, by the flat names of
:data:`~tolgate_flows.train.SETTINGS` (``--hidden`` sets ``model.hidden``, ``--model`` the model's
``kind``, ``--tolerance`` the tolerance ``mode``). Each flag is derived from the declaring field's
type and, for a fixed set of values, from :data:`~tolgate_flows.train.CHOICES`; its help shows the
value a run uses when the flag is left out (the run's default, and each preset's where it
differs). Without ``--preset`` a fresh run starts from its dataset's preset (``DATASET_PRESETS``:
cpu for digits).
User errors (a bad value, a missing data file, a refused output folder, a solve that broke its
step budget) print one line ``error: <message>`` to stderr and exit with status 2, as argparse
does; a traceback means a bug. Ctrl-C exits with status 130 after saving (see
:class:`~tolgate_flows.train.StopSignal`).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, NoReturn

from tolgate import SolveError, StepBudgetExceeded

from .checkpoints import RESUME_MAY_CHANGE, check_output_folder, flag_of, stored_config
from .report import cheapest_verdict, comparison_table, learning_verdict
from .train import (
    CHOICES,
    DATASET_PRESETS,
    NO_PRESET,
    PRESETS,
    SETTINGS,
    STOP_GRACE_SECONDS,
    TrainConfig,
    gate_mean_from_run,
    run,
    with_settings,
)

# The README's main job: Table 1's three rows on the bundled digits, then the question the
# library exists for: does a learned tolerance beat simply loosening a fixed one? And which
# setting trains cheapest at equal quality without a knob set by hand: the hand-picked RNODE stack
# (one RK4 step, right for digits and wrong for the 2-D testbeds) against the automatic ladder
# policy, with and without RNODE's penalties. Rows: name and the settings that differ from the
# command line's.
_RNODE = dict(kinetic=0.01, jacobian=0.01)
COMPARISON: tuple[tuple[str, dict], ...] = (
    ("ccnf-fixed", dict(model="ccnf", tolerance="fixed")),
    ("infocnf-fixed", dict(model="infocnf", tolerance="fixed")),
    ("infocnf-fixed-1e-3", dict(model="infocnf", tolerance="fixed", train_tol=1e-3)),
    ("infocnf-learned-paper", dict(model="infocnf", tolerance="learned", estimator="paper")),
    ("infocnf-learned", dict(model="infocnf", tolerance="learned", estimator="probe")),
    ("infocnf-adaptive", dict(model="infocnf", tolerance="adaptive")),
    (
        "infocnf-rnode-rk4-h1",
        dict(model="infocnf", tolerance="fixed", train_method="rk4", train_step_size=1.0, **_RNODE),
    ),
    ("infocnf-auto", dict(model="infocnf", tolerance="auto")),
    ("infocnf-auto-rnode", dict(model="infocnf", tolerance="auto", **_RNODE)),
)
# Rows whose tolerance or grid step a person picked for this data set (RNODE's lambdas are its
# published defaults, not picked here); every other InfoCNF row chooses for itself.
HAND_SET = frozenset({"infocnf-fixed-1e-3", "infocnf-rnode-rk4-h1"})
_DEFAULT_SETTINGS = TrainConfig().settings()
DEFAULT_OUT = _DEFAULT_SETTINGS["out"]
DATASET_PRESETS_TEXT = ", ".join(f"{preset} for --dataset {name}" for name, preset in DATASET_PRESETS.items())
# Exit statuses: argparse's for a refused command line, the shell's for Ctrl-C.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# What a user can cause; anything else is a bug and keeps its traceback. (The data package's
# DataError and the output folder's RunFolderError are ValueErrors.)
USER_ERRORS = (ValueError, TypeError, OSError, SolveError)

# How a ``None`` default reads in --help.
_NONE_MEANS = {
    "data_dir": "none",
    "gate_lr": "--lr",
    "lr_decay_epoch": "never",
    "grad_clip": "off",
    "n_scales": "by image size",
    "eval_noise_seed": "unseeded",
    "max_train_batches": "all",
    "max_eval_batches": "all",
    "max_num_steps": "unlimited",
    "train_method": "off, train with --method",
    "ladder": "dopri5 at every decade 1e-8..1e-1, then rk4:8 rk4:6 rk4:4 rk4:3 rk4:2 rk4:1",
}

_MAY_CHANGE = ", ".join(sorted(flag_of(name) for name in RESUME_MAY_CHANGE))
_EPILOG = "\n\n".join(
    textwrap.fill(paragraph, 100, break_on_hyphens=False)
    for paragraph in (
        "output folder: a run refuses an --out that holds an earlier run's outputs (nothing there is changed): "
        "continue it with --resume or choose a new --out. --resume continues from OUT/last.pt; flags left out "
        f"keep their stored values, flags given must equal them except {_MAY_CHANGE} (--epochs not under "
        "--tolerance scheduled). Without last.pt, --resume starts a fresh run only if OUT holds no outputs.",
        "stopping: the first Ctrl-C finishes the current iteration, saves last.pt and exits with status 130; a "
        f"second Ctrl-C, or the first after {STOP_GRACE_SECONDS:g} s, stops at once and saves the last completed "
        "iteration. A solve that needs more than --max-num-steps steps stops the run with an error (its last "
        "completed iteration saved).",
        "errors: a bad value, missing data, a refused folder or a broken step budget prints one line "
        '"error: ..." and exits with status 2; a traceback is a bug.',
    )
)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user error of this command."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def _show(name: str, value: Any) -> str:
    if value is None:
        return _NONE_MEANS.get(name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_text(name: str) -> str:
    """``(default: X; preset P Y, ...)``: the value a run uses for setting ``name`` when its flag is left out."""
    default = _DEFAULT_SETTINGS[name]
    text = f"default: {_show(name, default)}"
    differing = [
        f"{preset} {_show(name, values[name])}"
        for preset, values in PRESETS.items()
        if name in values and values[name] != default
    ]
    if differing:
        text += "; preset " + ", ".join(differing)
    return f"({text})".replace("%", "%%")


# What each setting's flag does, where its name does not say it all. The flags themselves, their types
# and their choices are derived from SETTINGS and CHOICES (see :func:`field_arguments`).
_HELP = {
    "data_dir": "folder holding cifar-10-batches-bin (or -py) / the MNIST IDX files",
    "train_tol": "fixed training tolerance; start of schedules and gates",
    "eval_tol": "fixed tolerance of every evaluation",
    "schedule_end_tol": "scheduled: tolerance reached at the last epoch",
    "gate_lr": "learning rate of the gates",
    "lr_decay_epoch": "multiply the learning rates by --lr-decay from this epoch on",
    "lr_decay": "factor applied to the learning rates from --lr-decay-epoch on",
    "warmup_iters": "linear learning-rate warm-up over this many iterations",
    "grad_clip": "clip the gradient norm at this value",
    "beta": "weight of the cross-entropy (nats) against bits/dim (Eq. 4)",
    "alpha": "REINFORCE price of one NFE (Eq. 6)",
    "baseline_momentum": "momentum of the REINFORCE running-mean baseline",
    "reward_backward_nfe": "reward -(forward + backward) NFE instead of forward NFE",
    "reward_loss_weight": "weight of the task loss inside the REINFORCE return (Eq. 7 uses 1; 0: NFE only)",
    "estimator": "learned: 'probe' (draws on a probe of the batch, reference-calibrated return) or 'paper' (Eq. 7)",
    "probe_every": "probe estimator / adaptive / auto: probe every N iterations",
    "probe_size": "rows of the batch each probe solves",
    "probe_draws": "probe estimator: gate draws per probe (>= 2)",
    "budget_fraction": "solver-error budget as a fraction of the minibatch loss's standard error (probe, adaptive, "
    "auto)",
    "penalty": "probe estimator: initial Lagrange multiplier of the solver-error budget",
    "multiplier_lr": "probe estimator: dual-ascent step of that multiplier (0: fixed penalty)",
    "adaptive_step": "adaptive: decades moved per calibration",
    "ladder": "auto: the solver settings each block may use, expensive to cheap, as method:tolerance or "
    "method:steps (e.g. dopri5:1e-5 dopri5:1e-2 rk4:4 rk4:1); blocks start at dopri5 --train-tol",
    "device": "cpu, cuda, cuda:1, ...",
    "out": "output folder (metrics.jsonl, checkpoints, plots, summary.json)",
    "hidden": "filters of each ODE net's convolutions",
    "n_flows": "CNF blocks on each side of every squeeze",
    "method": "per backend: torchdiffeq takes the adaptive methods, tolgate dopri5, bosh3, tsit5; with "
    "--train-method the method of evaluation only",
    "adjoint": "adjoint backward pass",
    "seminorm": "seminorm adjoint (needs --adjoint)",
    "backend": "tolgate: per-sample step sizes and (with learned gates) per-sample tolerances",
    "time_embedding": "how the ODE nets see the time",
    "eval_draws": "Hutchinson draws averaged per test image",
    "eval_noise_seed": "seed the evaluation noise per batch: every model and tolerance sees the same draws",
    "eval_batch_size": "images per evaluation batch",
    "max_train_batches": "iterations per epoch",
    "max_eval_batches": "batches per evaluation",
    "val_fraction": "share of the training images held out for validation",
    "recheck_tols": "re-evaluate the selected checkpoint at these",
    "sample_every": "write a class-conditional sample grid every N epochs (0: never)",
    "max_num_steps": "step budget of every solve; a solve that needs more stops the run",
    "kinetic": "RNODE: weight of the kinetic energy, int 1/2 mean_d f_d^2 dt per sample (0: off)",
    "jacobian": "RNODE: weight of the Jacobian's squared Frobenius norm per dimension, by the trace's own "
    "Hutchinson noise (0: off)",
    "local_error": "weight of the solver's accumulated local-error estimate, sum_j E_j h_j (ERNODE; 0: off; "
    "adaptive training method, no --adjoint)",
    "stiffness": "weight of the solver's stiffness estimate, sum_j rho_j h_j (SRNODE; 0: off; adaptive training "
    "method, no --adjoint)",
    "steer": "STEER: each training solve ends at T ~ Uniform(1 - b, 1 + b); b in [0, 1), evaluation at T = 1",
    "train_method": "train on this fixed grid (RNODE: rk4) at --train-step-size; --method at --eval-tol evaluates "
    "(needs --tolerance fixed)",
    "train_step_size": "step of --train-method, in time units (0.25: 4 steps over [0, 1])",
}
# Settings given through a flag of another form: --no-progress, --gate-mean-from (see parser).
_SPECIAL_FIELDS = ("progress_bar", "gate_mean_log10")


def field_arguments(name: str) -> dict[str, Any]:
    """``add_argument`` keywords of the setting ``name``, from its type and :data:`CHOICES`. Every flag
    defaults to ``None`` (left out), so a run can tell a given value from a default."""
    hint = SETTINGS[name].hint
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = [a for a in typing.get_args(hint) if a is not type(None)] if optional else [hint]
    kind = base[0] if len(base) == 1 else hint
    if kind is bool:
        return {"action": "store_true", "default": None}
    if typing.get_origin(kind) is list:
        return {"type": typing.get_args(kind)[0], "nargs": "*"}
    if name in CHOICES:
        return {"choices": CHOICES[name]}
    return {"type": kind} if kind in (int, float) else {}


def _add_field_flags(p: argparse.ArgumentParser) -> None:
    for name in SETTINGS:
        if name in _SPECIAL_FIELDS:
            continue
        text = f"{_HELP.get(name, '')} {default_text(name)}".strip()
        p.add_argument(flag_of(name), dest=name, help=text, **field_arguments(name))


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        description="Train CNF / CCNF / InfoCNF with fixed, scheduled or learned ODE tolerances.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=(*sorted(PRESETS), NO_PRESET),
        help=f"base settings; explicit flags override them (default: {DATASET_PRESETS_TEXT}, else {NO_PRESET}: "
        "the field defaults, the paper's GPU settings)",
    )
    _add_field_flags(p)
    p.add_argument("--gate-mean-from", help="gate-mean: a learned run's output folder to read gate means from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown by default)")
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from OUT/last.pt; flags left out keep their stored values; only {_MAY_CHANGE} may "
        "differ from them (see below)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="run CCNF fixed and InfoCNF fixed, fixed 1e-3, learned (paper, probe), adaptive into OUT/<row>; "
        "print the table",
    )
    return p


def preset_of(args: argparse.Namespace, stored: dict[str, Any] | None) -> str | None:
    """The preset the run starts from: ``--preset``, else (for a fresh run) its dataset's entry in
    ``DATASET_PRESETS``; a resumed run without ``--preset`` keeps its stored settings."""
    if args.preset is not None:
        return None if args.preset == NO_PRESET else args.preset
    if stored:
        return None
    return DATASET_PRESETS.get(args.dataset or _DEFAULT_SETTINGS["dataset"])


def explicit_values(args: argparse.Namespace, preset: str | None = None) -> dict[str, Any]:
    """The settings the command line names, by flat name: ``preset``'s, then every flag given."""
    values = dict(PRESETS[preset]) if preset else {}
    for name in SETTINGS:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    if args.no_progress:
        values["progress_bar"] = False
    if args.gate_mean_from:
        values["gate_mean_log10"] = gate_mean_from_run(args.gate_mean_from)
    return values


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The run's configuration: defaults (with ``--resume``, the stored run's configuration
    instead, in either layout), then the preset (:func:`preset_of`), the flags given and
    ``overrides`` (flat names)."""
    out = overrides.get("out") or args.out or DEFAULT_OUT
    stored = stored_config(Path(out)) if args.resume else None
    explicit = {**explicit_values(args, preset_of(args, stored)), **overrides, "out": out}
    return TrainConfig.from_dict(with_settings(stored or {}, explicit))


def main(argv: list[str] | None = None) -> None:
    """Run the command line; user errors exit with status 2 and one line on stderr."""
    args = parser().parse_args(argv)
    try:
        status = _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except USER_ERRORS as exc:
        print(f"error: {_user_message(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    if status:
        raise SystemExit(status)


def _user_message(exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, StepBudgetExceeded):
        message += f" (raise --max-num-steps, default {_DEFAULT_SETTINGS['max_num_steps']}, or loosen the tolerance)"
    return message


def _run(args: argparse.Namespace) -> int:
    if not args.compare:
        summary = run(config_from_args(args), resume=args.resume)
        if summary.get("interrupted"):
            return EXIT_INTERRUPTED
        keys = ("selected_epoch", "train_nfe_forward_mean", "train_nfe_backward_mean", "seconds_per_epoch_mean")
        print(json.dumps({k: summary[k] for k in keys}))
        return 0
    base = Path(args.out or "runs/compare")
    configs = [(name, config_from_args(args, **settings, out=str(base / name))) for name, settings in COMPARISON]
    for _, config in configs:  # refuse before the first row trains, not after
        check_output_folder(Path(config.out), args.resume)
    summaries = {}
    for name, config in configs:
        print(f"== {name}", flush=True)
        summaries[name] = run(config, resume=args.resume)
        if summaries[name].get("interrupted"):
            return EXIT_INTERRUPTED
    print(comparison_table(summaries))
    print(
        learning_verdict(summaries, learned="infocnf-learned", loosened="infocnf-fixed-1e-3", reference="infocnf-fixed")
    )
    automatic = [name for name, _ in COMPARISON if name.startswith("infocnf") and name not in HAND_SET]
    print(cheapest_verdict(summaries, candidates=automatic, reference="infocnf-fixed"))
    return 0
