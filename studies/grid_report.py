"""Report of the reproduction grid (benchmarks/reproduce_table1.py): Table 1's shape, the
NFE-vs-bits/dim frontier, Figure 3's curves. Reads only the JSON the runs wrote."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written to files, on machines without a screen
import matplotlib.pyplot as plt  # noqa: E402

from tolgate_flows.report import row_metrics


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _forward_nfe_per_sample(metrics_path: Path) -> float:
    """Run mean of forward evaluations per sample per iteration (all blocks): under torchdiffeq the
    forward NFE, under the per-sample backend the mean of the samples' own NFE (rows / batch)."""
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    per_epoch = [h["train"].get("nfe_forward_sample_mean") or h["train"]["nfe_forward"] for h in history]
    return statistics.mean(per_epoch)


def frontier_points(summaries: Mapping[str, Sequence[Mapping]], results: Path) -> dict[str, dict]:
    """Per row, mean ± std over seeds of forward evaluations per sample per iteration (all blocks),
    test bits/dim and test error."""
    points = {}
    for name, runs in summaries.items():
        nfe = [_forward_nfe_per_sample(p) for p in sorted(results.glob(f"{name}-seed*/metrics.jsonl"))]
        bpd = [s["selected"]["test"]["bpd_cond"] for s in runs]
        err = [s["selected"]["test"]["error"] for s in runs]
        points[name] = {"nfe": _mean_std(nfe), "bpd": _mean_std(bpd), "error": _mean_std(err), "seeds": len(runs)}
    return points


def plot_frontier(points: Mapping[str, dict], path: Path) -> None:
    """Training NFE against test bits/dim (and error) for the InfoCNF rows: the fixed tolerances
    form the frontier; learned, gate-mean and frozen are marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "bpd", "test bits/dim  -log p(x|y)"), (axes[1], "error", "test error")):
        fixed = sorted(
            (n for n in points if n.split("-")[1] == "infocnf" and "fixed" in n and "seminorm" not in n),
            key=lambda n: points[n]["nfe"][0],
        )
        xs = [points[n]["nfe"][0] for n in fixed]
        ys = [points[n][metric][0] for n in fixed]
        ax.plot(xs, ys, "k--", alpha=0.5)
        for n in points:
            if n.split("-")[1] != "infocnf":
                continue
            (x, xe), (y, ye) = points[n]["nfe"], points[n][metric]
            marker = "o" if "fixed" in n else "*" if "learned" in n else "s"
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=marker, markersize=10 if marker == "*" else 6, label=n)
        ax.set(xlabel="training forward NFE per sample per iteration (all blocks)", ylabel=label)
    axes[0].legend(fontsize=7)
    fig.suptitle("InfoCNF on 8x8 digits: fixed tolerances (dashed frontier) vs learned and ablations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mean_curves(results: Path, names: Sequence[str], path: Path) -> None:
    """Figure 3's panels averaged over seeds: test error, test bits/dim, training NFE per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name in names:
        histories = [
            [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            for p in sorted(results.glob(f"{name}-seed*/metrics.jsonl"))
        ]
        if not histories:
            continue
        n = min(len(h) for h in histories)
        epochs = list(range(1, n + 1))

        def mean(key, split, hs=histories, n=n):
            return [statistics.mean((h[e][split][key] or 0.0) for h in hs) for e in range(n)]

        if histories[0][0]["test"]["error"] is not None:
            axes[0].plot(epochs, [100 * v for v in mean("error", "test")], marker="o", label=name)
        axes[1].plot(epochs, mean("bpd_cond", "test"), marker="o", label=name)
        nfe = [f + b for f, b in zip(mean("nfe_forward", "train"), mean("nfe_backward", "train"), strict=True)]
        axes[2].plot(epochs, nfe, marker="o", label=name)
    axes[0].set(title="test error (%)", xlabel="epoch")
    axes[1].set(title="test bits/dim -log p(x|y)", xlabel="epoch")
    axes[2].set(title="training NFE per iteration (fwd + bwd)", xlabel="epoch")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    summaries: Mapping[str, Sequence[Mapping]], rows: Mapping[str, tuple], paper: Mapping[str, str], results: Path
) -> None:
    """Write table1.md, grid_summary.json, frontier.png and curves.png into ``results``."""
    if not summaries:
        print(f"no finished runs under {results}")
        return
    lines = []
    columns = None
    for name, runs in summaries.items():
        metrics = row_metrics(runs)
        recheck = {}
        for tol in ("1e-06", "1e-07"):
            vals = [s["recheck"].get(tol, {}).get("bpd_cond") for s in runs]
            recheck[tol] = _mean_std([v for v in vals if v is not None])
        metrics["bpd x|y at 1e-6 / 1e-7"] = " / ".join(f"{recheck[t][0]:.3f}" for t in recheck)
        metrics["seeds"] = str(len(runs))
        metrics["paper (CIFAR-10) err / bpd / NFE"] = paper.get(name, "")
        if columns is None:
            columns = list(metrics)
            lines += ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines.append(f"| {rows[name][0]} | " + " | ".join(metrics[c] for c in columns) + " |")
    (results / "table1.md").write_text("\n".join(lines) + "\n")
    points = frontier_points(summaries, results)
    (results / "grid_summary.json").write_text(json.dumps(points, indent=2))
    plot_frontier(points, results / "frontier.png")
    plot_mean_curves(results, [n for n in summaries if n[0] in "123"], results / "curves.png")
    print("\n".join(lines))
