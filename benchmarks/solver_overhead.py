"""Overhead of GatedSolver over a raw ``torchdiffeq.odeint`` call with the same arguments.

GatedSolver with a FixedTolerance runs the very same solve (tests/test_solver.py checks bitwise
equality); what it adds is per solve: asking the policy, input checks, a SolveRecord, and per
field evaluation: one counting wrapper call, plus one gradient hook when autograd records the
solve (to count backward VJPs). This script measures that cost.

Cases (float32, dopri5, rtol = atol = 1e-5, t = [0, 1]):

* ``mlp``: a time-conditioned MLP field (16 -> 64 -> 64 -> 16, softplus) on a batch of 512;
* ``conv``: a time-conditioned conv field (4 -> 32 -> 32 -> 4 channels, 3x3, softplus) on a
  batch of 64 images of 8x8.

Each case is timed in two modes: ``forward`` (under ``torch.no_grad()``) and ``train`` (forward
plus ``backward()`` of a scalar loss, direct backpropagation). Repeats are interleaved in one
process, raw and gated alternating which goes first, and the ratio reported is the median over
repeats of (gated time / raw time) of the same repeat, with its quartiles (the spread that load
from other processes adds); medians of each time are reported too.

Run: ``python benchmarks/solver_overhead.py`` (about 3 minutes on 2 cores); writes
``docs/results/solver_overhead.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import torchdiffeq
from torch import nn

from tolgate import FixedTolerance, GatedSolver

TOL = 1e-5
T_SPAN = torch.tensor([0.0, 1.0])


class MLPField(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(), nn.Linear(hidden, dim)
        )

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([y, t.expand(y.shape[0], 1)], dim=1))


class ConvField(nn.Module):
    def __init__(self, channels: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.act = nn.Softplus()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        time_channel = t.expand(y.shape[0], 1, *y.shape[2:])
        h = self.act(self.conv1(torch.cat([y, time_channel], dim=1)))
        return self.conv3(self.act(self.conv2(h)))


class CallCounter(nn.Module):
    """Counts the raw solve's field evaluations, to report its NFE next to the record's."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field, self.calls = field, 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.field(t, y)


def make_case(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name == "mlp":
        return MLPField(), torch.randn(512, 16)
    if name == "conv":
        return ConvField(), torch.randn(64, 4, 8, 8)
    raise ValueError(f"unknown case {name!r}")


def timed(run: Callable[[], torch.Tensor], train: bool) -> float:
    start = time.perf_counter()
    if train:
        run()[-1].pow(2).mean().backward()
    else:
        with torch.no_grad():
            run()
    return time.perf_counter() - start


def measure(name: str, train: bool, repeats: int) -> dict:
    field, y0 = make_case(name)
    counter = CallCounter(field)
    solver = GatedSolver(FixedTolerance(TOL), method="dopri5")

    def raw() -> torch.Tensor:
        return torchdiffeq.odeint(counter, y0, T_SPAN, rtol=TOL, atol=TOL, method="dopri5")

    def gated() -> torch.Tensor:
        return solver(field, y0, T_SPAN)

    for _ in range(2):  # warm-up: allocator, autograd, lazy initialisation
        timed(raw, train)
        timed(gated, train)
    raw_times, gated_times = [], []
    for repeat in range(repeats):
        order = [(raw, raw_times), (gated, gated_times)]
        for run, times in order if repeat % 2 == 0 else reversed(order):
            times.append(timed(run, train))
    counter.calls = 0
    timed(raw, train)
    record = solver.records[-1]
    ratios = [g / r for g, r in zip(gated_times, raw_times, strict=True)]
    return {
        "case": name,
        "mode": "train" if train else "forward",
        "repeats": repeats,
        "median_ratio": statistics.median(ratios),
        "ratio_quartiles": [q for i, q in enumerate(statistics.quantiles(ratios, n=4)) if i != 1],
        "ratio_of_medians": statistics.median(gated_times) / statistics.median(raw_times),
        "median_raw_s": statistics.median(raw_times),
        "median_gated_s": statistics.median(gated_times),
        "nfe_raw": counter.calls,
        "nfe_gated": record.nfe_forward,
        "nfe_backward_gated": record.nfe_backward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=101)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=["mlp", "conv"])
    parser.add_argument("--out", type=Path, default=Path("docs/results/solver_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(name, train, args.repeats) for name in args.cases for train in (False, True)]
    header = f"{'case':6} {'mode':8} {'median ratio':>12} {'quartiles':>15} {'raw ms':>8} {'gated ms':>9}"
    print(f"{header} {'NFE raw':>8} {'NFE gated':>9}")
    for row in rows:
        q1, q3 = row["ratio_quartiles"]
        print(
            f"{row['case']:6} {row['mode']:8} {row['median_ratio']:12.4f} {q1:7.3f}-{q3:7.3f} "
            f"{1e3 * row['median_raw_s']:8.2f} {1e3 * row['median_gated_s']:9.2f} {row['nfe_raw']:8d} "
            f"{row['nfe_gated']:9d}"
        )
    result = {
        "command": "python " + " ".join(sys.argv),
        "environment": {
            "torch": torch.__version__,
            "torchdiffeq": metadata.version("torchdiffeq"),
            "python": platform.python_version(),
            "threads": args.threads,
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
