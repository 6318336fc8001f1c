"""Issue 16's report: does the automatic ladder policy train as cheaply as the best hand-picked
setting, at equal quality, with no step or tolerance set by hand?

Inputs: the 2-D testbeds' grid (``benchmarks/fewer_nfe.py`` run folders
``<out>/<testbed>/<arm>/seed<k>/`` with ``summary.json`` and ``log.jsonl``) and the digits runs'
JSON (``docs/results/digits_levers/<row>-seed<k>/``). Quality is the issue 12 protocol: test NLL at
dopri5 1e-5, paired by seed against FFJORD-style training (fixed 1e-5); equal quality is a mean
paired difference of at most 0.02 nats (2-D) or 0.01 bits/dim (digits). Training cost is forward
+ backward + probe evaluations per iteration. "Hand-picked in hindsight" is the cheapest of the
hand-picked RNODE stacks (RK4 with h = 0.25, 0.5, 1) that reached equal quality.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from tolgate import SolverLadder, SolverSetting
from tolgate_flows.report import training_cost

from .testbed_report import mean_std

MARGIN_NATS = 0.02
MARGIN_BPD = 0.01
TESTBED_REFERENCE = "ffjord"
TESTBED_HAND_PICKED = ("rnode", "rnode-h0.5", "rnode-h1")
TESTBED_AUTOMATIC = ("auto", "auto-rnode", "auto-learned-rnode", "adaptive")
DIGITS_REFERENCE = "s-fixed-1e-5"
DIGITS_HAND_PICKED = ("l-rnode", "l-rnode-h0.5", "l-rnode-h1")
DIGITS_AUTOMATIC = ("a-auto", "a-auto-rnode", "a-auto-learned-rnode", "s-adaptive")
#: the ladder the runs climbed (ToleranceConfig's default), for rung numbers in figures
LADDER = SolverLadder.default()


# ----------------------------------------------------------------------------- 2-D testbeds


def testbed_cost(summary: Mapping) -> float:
    """Training evaluations per iteration of a testbed run: forward + backward + probes."""
    return summary["nfe_forward"] + summary["nfe_backward"] + summary["probe_nfe_equivalent"]


def load_testbed(out: Path, testbed: str) -> dict[str, dict[int, dict]]:
    """``arm -> seed -> summary`` of the finished (not failed) runs of ``testbed`` under ``out``."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted((out / testbed).glob("*/seed*/summary.json")):
        summary = json.loads(path.read_text())
        if "failed" not in summary:
            runs.setdefault(path.parent.parent.name, {})[summary["seed"]] = summary
    return runs


def cheapest_evaluation(ladder_evaluation: Sequence[Mapping], margin: float) -> dict:
    """The rung of fewest NFE whose quality is within ``margin`` of the first rung's (dopri5 1e-5),
    either way: a cheap solve that reports a better NLL than the model has is as wrong as a worse one."""
    reference = ladder_evaluation[0]
    honest = [e for e in ladder_evaluation if abs(e["quality"] - reference["quality"]) <= margin]
    best = min(honest, key=lambda e: (e["nfe_forward"], abs(e["quality"] - reference["quality"])))
    saving = reference["nfe_forward"] / best["nfe_forward"]
    return {**best, "reference_nfe_forward": reference["nfe_forward"], "saving": saving}


def _arm(summaries: Mapping[int, Mapping], reference: Mapping[int, Mapping], margin: float) -> dict:
    seeds = sorted(summaries)
    paired = [summaries[s]["test_nll"] - reference[s]["test_nll"] for s in seeds if s in reference]
    at_final = [
        summaries[s]["test_nll_at_used_tol"] - summaries[s]["test_nll"]
        for s in seeds
        if summaries[s].get("test_nll_at_used_tol") is not None
    ]
    return {
        "seeds": seeds,
        "nfe_train": mean_std([testbed_cost(summaries[s]) for s in seeds]),
        "probe_nfe_equivalent": mean_std([summaries[s]["probe_nfe_equivalent"] for s in seeds]),
        "test_nll": mean_std([summaries[s]["test_nll"] for s in seeds]),
        "paired_test_nll": mean_std(paired),
        "paired_test_nll_per_seed": paired,
        "equal_quality": bool(paired) and statistics.fmean(paired) <= margin,
        "equal_quality_every_seed": bool(paired) and max(paired) <= margin,
        "final_settings": [summaries[s].get("final_settings") for s in seeds],
        "nll_at_final_setting_minus_eval": at_final,
        "test_nfe_forward": mean_std([summaries[s]["test_nfe_forward"] for s in seeds]),
        "cheapest_evaluation": [
            cheapest_evaluation(summaries[s]["ladder_evaluation"], margin)
            for s in seeds
            if summaries[s].get("ladder_evaluation")
        ],
    }


def testbed_report(out: Path, testbed: str) -> dict:
    """Every arm of ``testbed`` against FFJORD-style training, the hand-picked best in hindsight,
    and each automatic arm's ratio to it."""
    runs = load_testbed(out, testbed)
    if TESTBED_REFERENCE not in runs:
        raise FileNotFoundError(f"no {TESTBED_REFERENCE!r} runs of {testbed} under {out}")
    reference = runs[TESTBED_REFERENCE]
    arms = {arm: _arm(summaries, reference, MARGIN_NATS) for arm, summaries in sorted(runs.items())}
    ref_cost = arms[TESTBED_REFERENCE]["nfe_train"]["mean"]
    for entry in arms.values():
        entry["saving_vs_reference"] = ref_cost / entry["nfe_train"]["mean"]
    return {
        "margin_nats": MARGIN_NATS,
        "arms": arms,
        **_against_hand_picked(arms, TESTBED_HAND_PICKED, TESTBED_AUTOMATIC),
    }


def _against_hand_picked(arms: Mapping[str, dict], hand_picked: Sequence[str], automatic: Sequence[str]) -> dict:
    honest = [a for a in hand_picked if a in arms and arms[a]["equal_quality"]]
    if not honest:
        return {"hand_picked_best": None, "automatic_vs_hand_picked": {}}
    best = min(honest, key=lambda a: arms[a]["nfe_train"]["mean"])
    cost = arms[best]["nfe_train"]["mean"]
    return {
        "hand_picked_best": {"arm": best, "nfe_train": cost},
        "automatic_vs_hand_picked": {a: arms[a]["nfe_train"]["mean"] / cost for a in automatic if a in arms},
    }


def testbed_curves(out: Path, testbed: str, arm: str) -> dict[int, list[dict]]:
    """``seed -> log.jsonl lines`` of one arm."""
    return {
        int(path.parent.name.removeprefix("seed")): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted((out / testbed / arm).glob("seed*/log.jsonl"))
    }


# ----------------------------------------------------------------------------- digits


def load_digits(results: Path, rows: Sequence[str]) -> dict[str, dict[int, dict]]:
    """``row -> seed -> summary`` (with ``"history"``, the run's metrics.jsonl, and
    ``"cheapest_evaluation"`` where ``cheapest_eval.json`` exists) from the results folder."""
    found: dict[str, dict[int, dict]] = {}
    for row in rows:
        for path in sorted(results.glob(f"{row}-seed*/summary.json")):
            summary = json.loads(path.read_text())
            summary["history"] = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
            extra = path.parent / "cheapest_eval.json"
            summary["ladder_evaluation"] = json.loads(extra.read_text())["rungs"] if extra.exists() else None
            found.setdefault(row, {})[summary["config"]["seed"]] = summary
    return found


def digits_report(results: Path) -> dict:
    """The digits rows (reference, hand-picked stacks, automatic policies) as :func:`testbed_report`."""
    runs = load_digits(results, (DIGITS_REFERENCE, *DIGITS_HAND_PICKED, *DIGITS_AUTOMATIC))
    if DIGITS_REFERENCE not in runs:
        raise FileNotFoundError(f"no {DIGITS_REFERENCE!r} runs in {results}")

    def bpd(summary: Mapping) -> float:
        return summary["selected"]["test"]["bpd_cond"]

    reference = runs[DIGITS_REFERENCE]
    rows = {}
    for row, summaries in runs.items():
        seeds = sorted(summaries)
        paired = [bpd(summaries[s]) - bpd(reference[s]) for s in seeds if s in reference]
        rows[row] = {
            "seeds": seeds,
            "nfe_train": mean_std([training_cost(summaries[s]) for s in seeds]),
            "probe_nfe_equivalent": mean_std([summaries[s].get("train_probe_nfe_equivalent_mean", 0.0) for s in seeds]),
            "test_bpd": mean_std([bpd(summaries[s]) for s in seeds]),
            "test_error": mean_std([summaries[s]["selected"]["test"]["error"] for s in seeds]),
            "paired_test_bpd": mean_std(paired),
            "paired_test_bpd_per_seed": paired,
            "equal_quality": bool(paired) and statistics.fmean(paired) <= MARGIN_BPD,
            "equal_quality_every_seed": bool(paired) and max(paired) <= MARGIN_BPD,
            "final_settings": [summaries[s]["history"][-1]["train"].get("settings_per_block") for s in seeds],
            "test_nfe_forward": mean_std([summaries[s]["selected"]["test"]["nfe_forward"] for s in seeds]),
            "cheapest_evaluation": [
                cheapest_evaluation(summaries[s]["ladder_evaluation"], MARGIN_BPD)
                for s in seeds
                if summaries[s]["ladder_evaluation"]
            ],
        }
    ref_cost = rows[DIGITS_REFERENCE]["nfe_train"]["mean"]
    for entry in rows.values():
        entry["saving_vs_reference"] = ref_cost / entry["nfe_train"]["mean"]
    return {"margin_bpd": MARGIN_BPD, "rows": rows, **_against_hand_picked(rows, DIGITS_HAND_PICKED, DIGITS_AUTOMATIC)}


# ----------------------------------------------------------------------------- figures


def rung_of(setting: str | None) -> float | None:
    """The rung of ``setting`` (``"rk4:2"``) on :data:`LADDER`, ``None`` off the ladder."""
    if setting is None:
        return None
    try:
        return float(LADDER.index(SolverSetting.parse(setting)))
    except ValueError:
        return None


Curve = Sequence[tuple[float, float, list | None]]


def plot_training(curves: Mapping[str, Mapping[int, Curve]], title: str, path: Path) -> None:
    """Two panels: training evaluations per iteration (forward + backward + probes; mean over
    seeds) over training for each arm, and the ladder rung of every block of the automatic arms
    (one thin line per seed and block). ``curves``: ``arm -> seed -> [(iteration, nfe, rungs)]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost_ax, rung_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm, seeds in curves.items():
        runs = list(seeds.values())
        length = min(len(run) for run in runs)
        x = [runs[0][k][0] for k in range(length)]
        y = [statistics.fmean(run[k][1] for run in runs) for k in range(length)]
        color = cost_ax.plot(x, y, label=arm)[0].get_color()
        climbing = [run for run in runs if run[0][2]]
        for run in climbing:
            for block in range(len(run[0][2])):
                rung_ax.plot([p[0] for p in run], [p[2][block] for p in run], color=color, alpha=0.5, lw=1)
        if climbing:
            rung_ax.plot([], [], color=color, label=arm)
    cost_ax.set(xlabel="training iteration", ylabel="NFE per iteration (fwd + bwd + probes)", yscale="log", title=title)
    cost_ax.legend(fontsize=8)
    rung_ax.set(xlabel="training iteration", title="ladder rung of each block (automatic arms)")
    rung_ax.set_yticks(range(len(LADDER)), [str(s) for s in LADDER], fontsize=7)
    rung_ax.invert_yaxis()
    rung_ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def testbed_figure_data(out: Path, testbed: str, arms: Sequence[str]) -> dict:
    """``arm -> seed -> [(iteration, nfe fwd + bwd + probes, rungs)]`` from the runs' logs."""
    data: dict = {}
    for arm in arms:
        logs = testbed_curves(out, testbed, arm)
        if logs:
            data[arm] = {
                seed: [
                    (e["iteration"], e["nfe_forward"] + e["nfe_backward"] + e["probe_nfe_equivalent"], e.get("rungs"))
                    for e in lines
                ]
                for seed, lines in logs.items()
            }
    return data


def digits_figure_data(results: Path, rows: Sequence[str]) -> dict:
    """As :func:`testbed_figure_data` for digits runs, one point per epoch (10 iterations each)."""
    data: dict = {}
    for row, seeds in load_digits(results, rows).items():
        data[row] = {}
        for seed, summary in seeds.items():
            points = []
            for record in summary["history"]:
                train = record["train"]
                iteration = (record["epoch"] + 1) * 10
                nfe = train["nfe_forward"] + train["nfe_backward"] + train.get("probe_nfe_equivalent", 0.0)
                settings = train.get("settings_per_block")
                rungs = [rung_of(s) for s in settings] if settings and row.startswith("a-") else None
                points.append((iteration, nfe, rungs))
            data[row][seed] = points
    return data
