"""Tables in the shape of the paper's Table 1, built from run summaries."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def row_metrics(summaries: Sequence[Mapping]) -> dict[str, str]:
    """Mean ± std over seeds of the selected epoch's test metrics and the run-mean training NFE."""
    test = [s["selected"]["test"] for s in summaries]
    return {
        "test error (%)": _fmt([t["error"] for t in test], 100.0, 2),
        "bits/dim x|y": _fmt([t["bpd_cond"] for t in test]),
        "bits/dim x": _fmt([t["bpd_marginal"] for t in test]),
        "train NFE fwd": _fmt([s["train_nfe_forward_mean"] for s in summaries], digits=1),
        "train NFE bwd": _fmt([s["train_nfe_backward_mean"] for s in summaries], digits=1),
        "probe NFE (batch equiv.)": _fmt([s.get("train_probe_nfe_equivalent_mean", 0.0) for s in summaries], digits=1),
        "test NFE fwd": _fmt([t["nfe_forward"] for t in test], digits=1),
        "s/epoch": _fmt([s["seconds_per_epoch_mean"] for s in summaries], digits=1),
        "s/iter": _fmt([s["seconds_per_iteration_mean"] for s in summaries], digits=3),
    }


def comparison_table(rows: Mapping[str, Mapping | Sequence[Mapping]]) -> str:
    """A markdown table, one row per entry of ``rows`` (a summary or a list of per-seed summaries)."""
    rendered = {name: row_metrics(v if isinstance(v, Sequence) else [v]) for name, v in rows.items()}
    columns = list(next(iter(rendered.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(r[c] for c in columns) + " |" for name, r in rendered.items()]
    return "\n".join(lines)


def learning_verdict(rows: Mapping[str, Mapping], learned: str, loosened: str, reference: str) -> str:
    """One sentence: did the ``learned`` row beat simply ``loosened`` (a looser fixed tolerance)?

    Cost is the training forward NFE plus the probes' (in full-batch evaluations); quality the test
    bits/dim x|y at the evaluation tolerance. "Beat" means cheaper at a bits/dim no worse than the
    looser row's by more than 0.01 (the issue's equal-quality margin on digits).
    """

    def cost(summary: Mapping) -> float:
        return summary["train_nfe_forward_mean"] + summary.get("train_probe_nfe_equivalent_mean", 0.0)

    def bpd(summary: Mapping) -> float:
        return summary["selected"]["test"]["bpd_cond"]

    a, b, ref = rows[learned], rows[loosened], rows[reference]
    beat = cost(a) < cost(b) and bpd(a) <= bpd(b) + 0.01
    return (
        f"Learning {'beat' if beat else 'did not beat'} loosening: {learned} cost {cost(a):.1f} forward evaluations "
        f"per iteration (probes included; {cost(a) / cost(ref):.2f}x {reference}) at {bpd(a):.4f} bits/dim, "
        f"{loosened} {cost(b):.1f} ({cost(b) / cost(ref):.2f}x) at {bpd(b):.4f}."
    )


def training_cost(summary: Mapping) -> float:
    """Evaluations per training iteration: forward + backward + the probes' (in full-batch evaluations)."""
    return (
        summary["train_nfe_forward_mean"]
        + summary["train_nfe_backward_mean"]
        + summary.get("train_probe_nfe_equivalent_mean", 0.0)
    )


def cheapest_verdict(
    rows: Mapping[str, Mapping], candidates: Sequence[str], reference: str, bound_bpd: float = 0.01
) -> str:
    """One sentence naming the cheapest of ``candidates`` (by :func:`training_cost`) whose test
    bits/dim x|y is within ``bound_bpd`` of the ``reference`` row's (the digits equal-quality
    bound), with its ratio of training cost to the reference's."""

    def bpd(summary: Mapping) -> float:
        return summary["selected"]["test"]["bpd_cond"]

    ref = rows[reference]
    equal = [name for name in candidates if bpd(rows[name]) <= bpd(ref) + bound_bpd]
    if not equal:
        return f"No row without a hand-set knob reached the quality of {reference} (within {bound_bpd} bits/dim)."
    best = min(equal, key=lambda name: training_cost(rows[name]))
    cost, ref_cost = training_cost(rows[best]), training_cost(ref)
    return (
        f"Cheapest at equal quality with no hand-set knob: {best}, {cost:.1f} evaluations per iteration "
        f"(forward + backward + probes), {ref_cost / cost:.2f}x fewer than {reference} ({ref_cost:.1f}), "
        f"at {bpd(rows[best]):.4f} bits/dim ({bpd(rows[best]) - bpd(ref):+.4f})."
    )
