"""Report of the learned-tolerance grid (benchmarks/learned_tolerance.py). Reads only the runs'
``summary.json`` files, laid out as ``<out>/<testbed>/<arm>/seed<k>/summary.json``.

Per testbed and arm: mean ± std over seeds of every metric of :func:`~tolgate_flows.testbed.run_testbed`.
Then, per testbed, the *best fixed tolerance in hindsight*: the loosest fixed tolerance whose mean
test NLL is at most ``max(std over seeds of fixed 1e-5, 0.02 nats)`` above fixed 1e-5's (one-sided:
a looser tolerance that tests better is no worse). It is the baseline a policy must beat: a user
who swept the fixed tolerances would pick it. Every other arm's training cost (``nfe_total``:
forward plus probes) is divided by that arm's and by fixed 1e-5's. Since the arms of one seed
share data and initial flow, the per-seed difference of test NLL to fixed 1e-5 is reported too
(``paired_test_nll_vs_reference``): a sharper comparison than the two arms' seed spreads.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written to files, on machines without a screen
import matplotlib.pyplot as plt  # noqa: E402

from tolgate_flows.levers import LeverConfig

METRICS = (
    "nfe_forward",
    "nfe_backward",
    "probe_nfe_equivalent",
    "nfe_total",
    "final_train_nll",
    "test_nll",
    "test_nll_marginal",
    "test_error",
    "test_nll_at_used_tol",
    "integral_at_used_tol",
    "integral_at_eval_tol",
    "seconds_per_iteration",
)
REFERENCE_TOL = 1e-5
MIN_NLL_MARGIN = 0.02  # nats: below this, test NLL differences are within run-to-run noise here


def load_runs(out: Path) -> dict[str, dict[str, list[dict]]]:
    """``testbed -> arm -> summaries`` (sorted by seed) of every finished run under ``out``."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(out.glob("*/*/seed*/summary.json")):
        testbed, arm = path.parts[-4], path.parts[-3]
        runs.setdefault(testbed, {}).setdefault(arm, []).append(json.loads(path.read_text()))
    for arms in runs.values():
        for summaries in arms.values():
            summaries.sort(key=lambda s: s["seed"])
    return runs


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def aggregate(summaries: Sequence[Mapping]) -> dict:
    """Mean ± std over seeds of :data:`METRICS` and of each block's final log10 tolerance; failed
    runs (a ``failed`` message instead of metrics) are counted, not averaged. ``levers``: the
    lever settings that differ from the defaults (an arm with levers is never a fixed-tolerance
    baseline, whatever its tolerance mode)."""
    finished = [s for s in summaries if "failed" not in s]
    result = {metric: mean_std([s[metric] for s in finished]) for metric in METRICS}
    per_block = zip(*(s["final_log10_tolerance"] for s in finished), strict=True) if finished else []
    result["final_log10_tolerance"] = [mean_std(block) for block in per_block]
    result["seeds"] = [s["seed"] for s in finished]
    result["failed"] = {s["seed"]: s["failed"] for s in summaries if "failed" in s}
    if finished:
        tolerance = finished[0]["config"]["tolerance"]
        result["mode"], result["train_tol"] = tolerance["mode"], tolerance["train_tol"]
        defaults = asdict(LeverConfig())
        levers = finished[0]["config"].get("levers") or {}
        result["levers"] = {name: value for name, value in levers.items() if value != defaults.get(name)}
    return result


def plain_fixed(arm: Mapping) -> bool:
    """A fixed tolerance and no lever: the baselines of the report."""
    return arm.get("mode") == "fixed" and not arm.get("levers")


def _fixed_arms(arms: Mapping[str, dict]) -> list[str]:
    """Arms of fixed tolerance, loosest first."""
    fixed = [name for name, arm in arms.items() if plain_fixed(arm) and arm["test_nll"]["mean"] is not None]
    return sorted(fixed, key=lambda name: -arms[name]["train_tol"])


def best_fixed(arms: Mapping[str, dict]) -> dict | None:
    """The best fixed tolerance in hindsight (module docstring), or ``None`` without a fixed
    ``REFERENCE_TOL`` arm."""
    fixed = _fixed_arms(arms)
    reference = next((name for name in fixed if arms[name]["train_tol"] == REFERENCE_TOL), None)
    if reference is None:
        return None
    ref_nll = arms[reference]["test_nll"]
    margin = max(ref_nll["std"], MIN_NLL_MARGIN)
    best = next(name for name in fixed if arms[name]["test_nll"]["mean"] - ref_nll["mean"] <= margin)
    return {"arm": best, "tolerance": arms[best]["train_tol"], "reference_arm": reference, "margin_nats": margin}


def _ratios(arms: Mapping[str, dict], best: dict) -> dict[str, dict]:
    def nfe(name: str) -> float:
        return arms[name]["nfe_total"]["mean"]

    ref_nll = arms[best["reference_arm"]]["test_nll"]["mean"]
    return {
        name: {
            "nfe_total_vs_best_fixed": nfe(name) / nfe(best["arm"]),
            "nfe_total_vs_reference": nfe(name) / nfe(best["reference_arm"]),
            "test_nll_minus_reference": arm["test_nll"]["mean"] - ref_nll,
        }
        for name, arm in arms.items()
        if not plain_fixed(arm) and arm["nfe_total"]["mean"] is not None
    }


def paired_nll(summaries: Sequence[Mapping], reference: Sequence[Mapping]) -> dict:
    """Mean ± std over the seeds both arms finished of ``test_nll(arm) - test_nll(reference)``:
    arms of one seed share their data and initial flow, so the seed-to-seed spread cancels."""
    ref = {s["seed"]: s["test_nll"] for s in reference if "failed" not in s}
    return mean_std([s["test_nll"] - ref[s["seed"]] for s in summaries if "failed" not in s and s["seed"] in ref])


def build_report(runs: Mapping[str, Mapping[str, Sequence[Mapping]]]) -> dict:
    """``testbed -> {"arms": arm -> aggregate, "best_fixed": ..., "ratios": arm -> ...,
    "paired_test_nll_vs_reference": arm -> mean ± std}``."""
    report = {}
    for testbed, arm_runs in runs.items():
        arms = {arm: aggregate(summaries) for arm, summaries in arm_runs.items()}
        best = best_fixed(arms)
        report[testbed] = {"arms": arms, "best_fixed": best, "ratios": {}, "paired_test_nll_vs_reference": {}}
        if best:
            reference = arm_runs[best["reference_arm"]]
            report[testbed]["ratios"] = _ratios(arms, best)
            report[testbed]["paired_test_nll_vs_reference"] = {
                arm: paired_nll(summaries, reference) for arm, summaries in arm_runs.items()
            }
    return report


def plot_frontier(report: Mapping[str, dict], path: Path) -> None:
    """Per testbed, test NLL (at the evaluation tolerance) against training NFE per iteration
    (forward plus probes): the fixed tolerances as a line, every other arm as a point, each with
    its seed std as error bars."""
    testbeds = list(report)
    fig, axes = plt.subplots(1, len(testbeds), figsize=(4.6 * len(testbeds), 4), squeeze=False)
    for ax, testbed in zip(axes[0], testbeds, strict=True):
        arms = report[testbed]["arms"]
        fixed = sorted(_fixed_arms(arms), key=lambda name: arms[name]["train_tol"])
        for names, style in ((fixed, "k-o"), *(([n], None) for n in arms if n not in fixed)):
            done = [n for n in names if arms[n]["test_nll"]["mean"] is not None]
            if not done:
                continue
            xs, xerr = [arms[n]["nfe_total"]["mean"] for n in done], [arms[n]["nfe_total"]["std"] for n in done]
            ys, yerr = [arms[n]["test_nll"]["mean"] for n in done], [arms[n]["test_nll"]["std"] for n in done]
            label = "fixed 1e-5 ... 1e-1" if style else done[0]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=style or "s", capsize=3, label=label, alpha=0.8)
        for name in fixed:
            ax.annotate(
                f"{arms[name]['train_tol']:.0e}", (arms[name]["nfe_total"]["mean"], arms[name]["test_nll"]["mean"])
            )
        ax.set(title=testbed, xlabel="training NFE / iteration (forward + probes)", ylabel="test NLL (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, results: Path, command: str) -> dict:
    """Aggregate the runs under ``out`` into ``results/summary.json`` and ``results/frontier.png``."""
    report = build_report(load_runs(out))
    if not report:
        raise FileNotFoundError(f"no finished runs under {out} (expected <testbed>/<arm>/seed<k>/summary.json)")
    save_report(report, results, command, plot_frontier, "frontier.png")
    return report


def save_report(
    report: Mapping[str, dict], results: Path, command: str, plot: Callable[[Mapping, Path], None], figure: str
) -> None:
    """Write ``results/summary.json`` (the command and the per-testbed report) and the figure."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps({"command": command, "testbeds": report}, indent=1))
    plot(report, results / figure)
