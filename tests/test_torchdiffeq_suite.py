"""benchmarks/torchdiffeq_suite.py: subtests become cases, and a case that passes raw but not
through the shim is listed, on a small stand-in for torchdiffeq's tests folder."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("torchdiffeq_suite", ROOT / "benchmarks" / "torchdiffeq_suite.py")
suite = importlib.util.module_from_spec(_SPEC)
sys.modules["torchdiffeq_suite"] = suite  # its dataclasses look their module up there
_SPEC.loader.exec_module(suite)

STAND_IN = """
import unittest

import torch
import torchdiffeq
from torchdiffeq._impl.odeint import odeint as real_odeint

from problems import METHODS


class TestStandIn(unittest.TestCase):
    def test_solve(self):
        for method in METHODS:
            with self.subTest(method=method):
                ys = torchdiffeq.odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
                                        torch.tensor([0.0, 1.0], dtype=torch.float64), method=method)
                self.assertLess(float((ys[-1] - torch.exp(torch.tensor(-1.0))).abs()), 1e-4)
        with self.subTest(check="identity"):
            self.assertIs(torchdiffeq.odeint, real_odeint)

    def test_broken(self):
        raise ValueError("broken in both runs")
"""


def test_cases_of_splits_subtests_and_keeps_failures_outside_them() -> None:
    recorded = {
        "tests": {"m.T.a": {"outcome": "pass", "error": None}, "m.T.b": {"outcome": "error", "error": "E: x"}},
        "subtests": {
            "m.T.a": {"m.T.a (k=1)": {"outcome": "pass", "error": None}},
            "m.T.b": {"m.T.b (k=1)": {"outcome": "fail", "error": "AssertionError: y"}},
        },
    }
    tests, cases = suite.cases_of(recorded)
    assert tests == {"m.T.a": "pass", "m.T.b": "error"}
    assert set(cases) == {"m.T.a (k=1)", "m.T.b (k=1)", "m.T.b (outside subtests)"}


def test_a_case_that_only_the_shim_fails_is_listed(tmp_path: Path, capsys) -> None:
    (tmp_path / "problems.py").write_text('METHODS = ("dopri5", "bosh3")\n')
    (tmp_path / "stand_in_tests.py").write_text(textwrap.dedent(STAND_IN))
    status = suite.main([str(tmp_path), "--json", str(tmp_path / "out.json"), "--timeout", "300"])
    printed = capsys.readouterr().out
    assert status == 1
    summary = json.loads((tmp_path / "out.json").read_text())
    raw, shimmed = summary["runs"]
    assert raw["tests"] == {
        "stand_in_tests.TestStandIn.test_broken": "error",
        "stand_in_tests.TestStandIn.test_solve": "pass",
    }
    assert shimmed["tests"]["stand_in_tests.TestStandIn.test_solve"] == "fail"
    identity = "stand_in_tests.TestStandIn.test_solve (check='identity')"
    assert summary["differences"] == {
        "passes raw, not shimmed": [identity],
        "passes shimmed, not raw": [],
        "passes in neither": ["stand_in_tests.TestStandIn.test_broken"],
    }
    assert all(
        raw["cases"][f"stand_in_tests.TestStandIn.test_solve (method='{m}')"]["outcome"] == "pass"
        for m in ("dopri5", "bosh3")
    )
    assert shimmed["cases"][identity]["error"].startswith("AssertionError")
    assert "passes raw, not shimmed (1):" in printed and identity in printed


def test_a_folder_without_problems_py_is_refused(tmp_path: Path) -> None:
    assert suite.main([str(tmp_path)]) == 2
