"""Soak: does memory stay flat over many solves and a long training run?

    python benchmarks/soak.py                       # 10,000 solves and a 2,000-iteration testbed run
    python benchmarks/soak.py --solves 500 --iterations 100 --out /tmp/soak   # a smoke

Two loops, each sampled at evenly spaced points for the process's resident memory (RSS, from
/proc/self/statm) and the number of live tensors (``gc.get_objects()``, after a collection):

* ``solves``: a GatedSolver with records on (the default ring of 16) solving a small batch with a
  parameterised field and backpropagating through it, ``--solves`` times (the counting wrapper once
  kept every solve's graph alive through a gradient hook: 8 MB per iteration).
* ``testbed``: a 2-D CNF trained for ``--iterations`` iterations by the testbed runner in
  ``auto`` mode (ladder policy, probes every 10 iterations), the longest-lived loop the library has.

Writes ``<out>/soak.json`` with every sample and, per loop, the growth from the first quarter's
median to the last quarter's (MB and tensors).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from tolgate import FixedTolerance, GatedSolver
from tolgate_flows.testbed import TestbedConfig, Training
from tolgate_flows.tolerance import ToleranceConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_mb() -> float:
    """Resident memory of this process in MB (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 4))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


def sample(step: int) -> dict:
    return {"step": step, "rss_mb": resident_mb(), "tensors": live_tensors()}


def soak_solves(n: int, samples: int) -> list[dict]:
    torch.manual_seed(0)
    field, solver = Field(), GatedSolver(FixedTolerance(1e-5))
    t = torch.tensor([0.0, 1.0])
    every = max(n // samples, 1)
    points = []
    for step in range(n):
        y = solver(field, torch.randn(16, 4), t)[-1]
        y.pow(2).mean().backward()
        field.zero_grad(set_to_none=True)
        if step % every == 0 or step == n - 1:
            points.append(sample(step))
    return points


def soak_testbed(iterations: int, samples: int) -> list[dict]:
    config = TestbedConfig(
        testbed="8gaussians",
        n_blocks=1,
        hidden=32,
        batch=256,
        iterations=iterations,
        tolerance=ToleranceConfig(mode="auto"),
    )
    training = Training.start(config)
    every = max(iterations // samples, 1)
    points = []
    for step in range(iterations):
        training.step(step)
        if step % every == 0 or step == iterations - 1:
            points.append(sample(step))
    return points


def growth(points: list[dict]) -> dict:
    """Last quarter's median minus the first quarter's, for RSS (MB) and live tensors."""
    quarter = max(len(points) // 4, 1)
    first, last = points[:quarter], points[-quarter:]
    return {
        key: statistics.median(p[key] for p in last) - statistics.median(p[key] for p in first)
        for key in ("rss_mb", "tensors")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solves", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=2_000)
    parser.add_argument("--samples", type=int, default=20, help="points sampled per loop")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "soak")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"command": " ".join(["python", *sys.argv])}
    for name, run, length in (("solves", soak_solves, args.solves), ("testbed", soak_testbed, args.iterations)):
        points = run(length, args.samples)
        result[name] = {"points": points, "growth": growth(points)}
        print(
            f"{name}: RSS {points[0]['rss_mb']:.1f} -> {points[len(points) // 2]['rss_mb']:.1f} -> "
            f"{points[-1]['rss_mb']:.1f} MB, tensors {points[0]['tensors']} -> {points[-1]['tensors']}, "
            f"growth {result[name]['growth']}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
