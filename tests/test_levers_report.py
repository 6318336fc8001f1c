"""The levers studies' reports (studies.levers_report) and the 2-D study's arms."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from studies import levers_report

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _testbed_summary(seed: int, nll: float, forward: float, backward: float, test_nfe: int, **config) -> dict:
    return {
        "seed": seed,
        "test_nll": nll,
        "nfe_forward": forward,
        "nfe_backward": backward,
        "probe_nfe_equivalent": 0.0,
        "test_nfe_forward": test_nfe,
        **{metric: 0.0 for metric in ("nfe_total", "final_train_nll", "test_nll_marginal", "seconds_per_iteration")},
        "test_error": None,
        "test_nll_at_used_tol": None,
        "integral_at_used_tol": None,
        "integral_at_eval_tol": 1.0,
        "final_log10_tolerance": [-5.0],
        "config": {"tolerance": {"mode": "fixed", "train_tol": 1e-5}, "levers": config.get("levers", {})},
    }


def test_2d_savings_are_reference_cost_over_arm_cost_and_quality_is_paired():
    runs = {
        "8gaussians": {
            "ffjord": [_testbed_summary(s, 3.00 + 0.01 * s, 50.0, 30.0, 56) for s in range(3)],
            "rnode": [
                _testbed_summary(s, 3.005 + 0.01 * s, 8.0, 8.0, 28, levers={"train_method": "rk4"}) for s in range(3)
            ],
            "worse": [_testbed_summary(s, 3.10 + 0.01 * s, 10.0, 10.0, 56, levers={"steer": 0.5}) for s in range(3)],
        }
    }
    report = levers_report.build_report(runs)["8gaussians"]
    assert report["savings"]["rnode"]["train_nfe_saving"] == pytest.approx(80.0 / 16.0)
    assert report["savings"]["rnode"]["eval_nfe_saving"] == pytest.approx(2.0)
    assert report["savings"]["rnode"]["paired_test_nll"] == pytest.approx(0.005)
    assert report["savings"]["rnode"]["equal_quality"] and not report["savings"]["worse"]["equal_quality"]
    assert report["margin_nats"] == pytest.approx(0.02)  # on the paired difference, not the seeds' spread


def _digits_summary(seed: int, bpd: float, forward: float, backward: float) -> dict:
    test = {"bpd_cond": bpd, "error": 0.03, "nfe_forward": 72.0}
    return {
        "config": {"seed": seed},
        "selected": {"test": test},
        "train_nfe_forward_mean": forward,
        "train_nfe_backward_mean": backward,
        "seconds_per_iteration_mean": 1.0,
    }


def test_digits_report_pairs_seeds_and_refuses_a_missing_reference():
    rows = {
        "s-fixed-1e-5": [_digits_summary(s, 2.24 + 0.001 * s, 72.0, 67.0) for s in range(3)],
        "l-rnode-h1": [_digits_summary(s, 2.245 + 0.001 * s, 12.0, 12.0) for s in range(3)],
    }
    report = levers_report.digits_report(rows)
    row = report["rows"]["l-rnode-h1"]
    assert row["train_nfe_saving"] == pytest.approx(139.0 / 24.0)
    assert row["paired_test_bpd_vs_reference"]["mean"] == pytest.approx(0.005)
    assert row["equal_quality"] and "l-rnode-h1" in levers_report.digits_table(report)
    with pytest.raises(FileNotFoundError, match="s-fixed-1e-5"):
        levers_report.digits_report({"l-rnode-h1": rows["l-rnode-h1"]})


def test_every_arm_of_the_2d_study_is_a_valid_configuration():
    fewer_nfe = _load("fewer_nfe")
    for arm in fewer_nfe.ARMS:
        config = fewer_nfe.job_config(("8gaussians", arm, 0), iterations=1)
        assert config.iterations == 1 and config.seed == 0
    assert fewer_nfe.job_config(("8gaussians", "rnode-h1", 0)).levers.train_step_size == 1.0
