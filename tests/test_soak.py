"""A short soak (benchmarks/soak.py): memory and live tensors stay flat over repeated solves with
backpropagation and over a testbed run in auto mode. A leak of one solve's graph per iteration
(the counting wrapper's gradient hook once held it) grows the live tensors by dozens per step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(soak)


def test_repeated_solves_keep_memory_flat() -> None:
    points = soak.soak_solves(300, samples=6)
    assert soak.growth(points)["tensors"] <= 10
    assert soak.growth(points)["rss_mb"] < 20


def test_a_testbed_run_keeps_memory_flat() -> None:
    points = soak.soak_testbed(40, samples=4)
    assert soak.growth(points)["tensors"] <= 10
    assert soak.growth(points)["rss_mb"] < 30
