"""Report of the levers study (benchmarks/fewer_nfe.py): what each lever and stack saves in training.

Reads the runs' ``summary.json`` (``<out>/<testbed>/<arm>/seed<k>/``, see
:mod:`studies.testbed_grid`). The cost of training is ``nfe_train``: forward plus backward
evaluations per iteration, plus the probes' batch-equivalent NFE where a tolerance policy probes
(:func:`train_cost`). Quality is the test NLL at the fixed evaluation tolerance (dopri5, 1e-5),
compared with the reference arm (FFJORD-style training at fixed 1e-5, :data:`REFERENCE_ARM`)
seed by seed (every arm of a seed sees the same batches and starts from the same flow). An arm
is at *equal quality* when its mean paired NLL difference is at most 0.02 nats (the issue's 2-D
bound; one-sided: better is no worse). The pairing removes the seed-to-seed spread of the test NLL
itself (much larger at a fixed iteration budget), which the report keeps for reference.
The evaluation cost (forward NFE of the test solves at 1e-5) says whether a regularised flow is
also cheaper to use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written to files, on machines without a screen
import matplotlib.pyplot as plt  # noqa: E402

from tolgate_flows.report import training_cost

from .testbed_report import MIN_NLL_MARGIN, aggregate, load_runs, mean_std, paired_nll, plain_fixed, save_report

REFERENCE_ARM = "ffjord"


def train_cost(summary: Mapping) -> float:
    """Training NFE per iteration: forward + backward + the probes' batch equivalent."""
    return summary["nfe_forward"] + summary["nfe_backward"] + summary["probe_nfe_equivalent"]


def _arm_entry(summaries: Sequence[Mapping], reference: Sequence[Mapping]) -> dict:
    finished = [s for s in summaries if "failed" not in s]
    entry = aggregate(summaries)
    entry["nfe_train"] = mean_std([train_cost(s) for s in finished])
    entry["test_nfe_forward"] = mean_std([s["test_nfe_forward"] for s in finished])
    entry["paired_test_nll_vs_reference"] = paired_nll(summaries, reference)
    entry["adjoint"] = bool(finished and finished[0]["config"].get("adjoint"))
    return entry


def build_report(runs: Mapping[str, Mapping[str, Sequence[Mapping]]]) -> dict:
    """``testbed -> {"arms": arm -> aggregate + nfe_train/test_nfe_forward/paired NLL,
    "margin_nats", "savings": arm -> training and evaluation NFE of the reference over the arm's,
    and whether the arm is at equal quality}``. Testbeds without a reference arm are skipped."""
    report = {}
    for testbed, arm_runs in runs.items():
        reference = arm_runs.get(REFERENCE_ARM)
        if not reference:
            continue
        arms = {arm: _arm_entry(summaries, reference) for arm, summaries in arm_runs.items()}
        ref = arms[REFERENCE_ARM]
        margin = MIN_NLL_MARGIN
        savings = {}
        for arm, entry in arms.items():
            if entry["nfe_train"]["mean"] is None:
                continue
            paired = entry["paired_test_nll_vs_reference"]["mean"]
            savings[arm] = {
                "train_nfe_saving": ref["nfe_train"]["mean"] / entry["nfe_train"]["mean"],
                "eval_nfe_saving": ref["test_nfe_forward"]["mean"] / entry["test_nfe_forward"]["mean"],
                "paired_test_nll": paired,
                "equal_quality": paired is not None and paired <= margin,
            }
        report[testbed] = {"arms": arms, "margin_nats": margin, "savings": savings}
    return report


#: paired NLL differences above this (nats) are drawn at the top edge, labelled with their value
PLOT_CEILING = 0.15


def plot(report: Mapping[str, dict], path: Path) -> None:
    """Per testbed: the paired test NLL difference to the reference against training NFE per
    iteration, and beside it the evaluation NFE of every arm (:func:`_quality_panel`)."""
    testbeds = list(report)
    fig, axes = plt.subplots(len(testbeds), 2, figsize=(13, 4.6 * len(testbeds)), squeeze=False)
    for (ax, bars), testbed in zip(axes, testbeds, strict=True):
        arms = report[testbed]["arms"]
        done = [n for n, a in arms.items() if a["nfe_train"]["mean"] is not None]
        _quality_panel(ax, arms, done, report[testbed]["margin_nats"])
        ax.set_title(f"{testbed}: quality against training cost")
        order = sorted(done, key=lambda n: arms[n]["test_nfe_forward"]["mean"])
        bars.barh(order, [arms[n]["test_nfe_forward"]["mean"] for n in order], color="tab:blue")
        bars.set(title=f"{testbed}: evaluation NFE at 1e-5 (dopri5)", xlabel="forward NFE per test solve")
        bars.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quality_panel(ax: plt.Axes, arms: Mapping[str, dict], done: Sequence[str], margin: float) -> None:
    """Test NLL minus the reference's, paired by seed (mean ± std), against training NFE: the fixed
    tolerances as a line, every other arm a labelled point, the equal-quality bound dashed; arms
    beyond :data:`PLOT_CEILING` sit on the top edge with their value in the label."""

    def point(name: str) -> tuple[float, float, float]:
        paired = arms[name]["paired_test_nll_vs_reference"]
        return arms[name]["nfe_train"]["mean"], paired["mean"], paired["std"] or 0.0

    fixed = sorted((n for n in done if _on_frontier(arms[n])), key=lambda n: arms[n]["train_tol"])
    shown = [n for n in fixed if point(n)[1] <= PLOT_CEILING]
    ax.errorbar(*zip(*(point(n) for n in shown), strict=True), fmt="k-o", capsize=3, label="fixed tolerance (dopri5)")
    for name in done:
        x, y, err = point(name)
        label = name if name not in fixed else f"{arms[name]['train_tol']:.0e}"
        if y > PLOT_CEILING:
            ax.plot(x, PLOT_CEILING, "r^")
            ax.annotate(f"{label} ({y:+.2f})", (x, PLOT_CEILING), fontsize=7, rotation=20, ha="right", va="top")
            continue
        if name not in fixed:
            ax.errorbar(x, y, xerr=arms[name]["nfe_train"]["std"], yerr=err, fmt="s", capsize=3, alpha=0.85)
        ax.annotate(label, (x, y), fontsize=7, rotation=20)
    ax.axhline(margin, color="g", linestyle="--", label=f"equal quality: below {margin} nats")
    ax.set(
        xlabel="training NFE / iteration (forward + backward + probes)",
        ylabel=f"test NLL at 1e-5 minus {REFERENCE_ARM}'s, paired by seed (nats)",
        xscale="log",
        ylim=(None, PLOT_CEILING * 1.05),
    )
    ax.legend(fontsize=7, loc="lower right")


def _on_frontier(arm: Mapping) -> bool:
    """A fixed-tolerance dopri5 arm without levers or adjoint: a point of the fixed-tolerance frontier."""
    return plain_fixed(arm) and not arm["adjoint"]


def write_report(out: Path, results: Path, command: str) -> dict:
    """Aggregate the runs under ``out`` into ``results/summary.json`` and ``results/levers.png``."""
    report = build_report(load_runs(out))
    if not report:
        raise FileNotFoundError(f"no finished {REFERENCE_ARM!r} runs under {out}")
    save_report(report, results, command, plot, "levers.png")
    return report


# --- digits (the training entry point's summaries, benchmarks/reproduce_table1.py --levers) ------

DIGITS_REFERENCE = "s-fixed-1e-5"
DIGITS_MARGIN_BPD = 0.01  # the equal-quality bound on digits (bits/dim)


def digits_report(rows: Mapping[str, Sequence[Mapping]]) -> dict:
    """``row -> mean ± std over seeds`` of test bits/dim (x|y), test error, training NFE
    (:func:`~tolgate_flows.report.training_cost`), evaluation NFE and seconds per iteration, the per-seed difference of
    bits/dim to :data:`DIGITS_REFERENCE`, the training and evaluation NFE savings against it, and
    whether the row is at equal quality (mean paired bits/dim at most 0.01 above the reference's,
    the issue's bound on digits)."""
    reference = {s["config"]["seed"]: s for s in rows.get(DIGITS_REFERENCE, [])}
    if not reference:
        raise FileNotFoundError(f"no {DIGITS_REFERENCE!r} runs: the reference of the digits levers study")

    def bpd(summary: Mapping) -> float:
        return summary["selected"]["test"]["bpd_cond"]

    ref_cost = mean_std([training_cost(s) for s in reference.values()])["mean"]
    ref_eval = mean_std([s["selected"]["test"]["nfe_forward"] for s in reference.values()])["mean"]
    margin = DIGITS_MARGIN_BPD
    report = {}
    for name, summaries in rows.items():
        cost = mean_std([training_cost(s) for s in summaries])
        evaluation = mean_std([s["selected"]["test"]["nfe_forward"] for s in summaries])
        paired = mean_std(
            [bpd(s) - bpd(reference[s["config"]["seed"]]) for s in summaries if s["config"]["seed"] in reference]
        )
        report[name] = {
            "seeds": [s["config"]["seed"] for s in summaries],
            "test_bpd": mean_std([bpd(s) for s in summaries]),
            "test_error": mean_std([s["selected"]["test"]["error"] for s in summaries]),
            "nfe_train": cost,
            "test_nfe_forward": evaluation,
            "seconds_per_iteration": mean_std([s["seconds_per_iteration_mean"] for s in summaries]),
            "paired_test_bpd_vs_reference": paired,
            "train_nfe_saving": ref_cost / cost["mean"],
            "eval_nfe_saving": ref_eval / evaluation["mean"],
            "equal_quality": paired["mean"] is not None and paired["mean"] <= margin,
        }
    return {"reference": DIGITS_REFERENCE, "margin_bpd": margin, "rows": report}


def digits_table(report: Mapping) -> str:
    """The digits report as a markdown table (mean ± std over seeds)."""

    def fmt(stat: Mapping, digits: int) -> str:
        if stat["mean"] is None:
            return "n/a"
        return (
            f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"
        )

    lines = [
        "| row | seeds | test bits/dim x\\|y | paired vs reference | test error (%) | train NFE (f+b) | saving "
        "| eval NFE | s/iter |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        error = {k: (v * 100 if isinstance(v, float) else v) for k, v in row["test_error"].items()}
        lines.append(
            f"| {name} | {len(row['seeds'])} | {fmt(row['test_bpd'], 4)} "
            f"| {fmt(row['paired_test_bpd_vs_reference'], 4)} "
            f"| {fmt(error, 2)} | {fmt(row['nfe_train'], 1)} | {row['train_nfe_saving']:.2f}x "
            f"| {fmt(row['test_nfe_forward'], 1)} | {fmt(row['seconds_per_iteration'], 2)} |"
        )
    return "\n".join(lines)


def plot_digits(report: Mapping, path: Path) -> None:
    """Test bits/dim against training NFE per iteration, every row a point with seed std bars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in report["rows"].items():
        ax.errorbar(
            row["nfe_train"]["mean"],
            row["test_bpd"]["mean"],
            xerr=row["nfe_train"]["std"],
            yerr=row["test_bpd"]["std"],
            fmt="k-o" if name.startswith("s-fixed") else "s",
            capsize=3,
        )
        ax.annotate(name, (row["nfe_train"]["mean"], row["test_bpd"]["mean"]), fontsize=7)
    ref = report["rows"][report["reference"]]["test_bpd"]["mean"]
    ax.axhspan(ref - report["margin_bpd"], ref + report["margin_bpd"], color="g", alpha=0.1)
    ax.set(
        title="digits (InfoCNF): quality against training cost",
        xlabel="training NFE / iteration (forward + backward + probes)",
        ylabel="test bits/dim x|y at 1e-5",
        xscale="log",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
