"""benchmarks/gradient_snr.py: the SNR statistics on estimates of known SNR, and a tiny end-to-end
measurement whose summary has every estimator, every gate, and finite, non-negative SNRs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_snr.py"
_SPEC = importlib.util.spec_from_file_location("gradient_snr", _PATH)
gradient_snr = importlib.util.module_from_spec(_SPEC)
sys.modules["gradient_snr"] = gradient_snr  # dataclasses resolve their module by name
_SPEC.loader.exec_module(gradient_snr)


def test_stats_recover_a_known_snr_and_sign_agreement() -> None:
    # 4000 estimates of (mu, 0, 0) + N(0, I): SNR = mu^2 / 3 per estimate (trace of cov = 3),
    # and the first component agrees in sign with probability Phi(mu).
    generator = torch.Generator().manual_seed(0)
    mu, repeats = 1.0, 4000
    samples = torch.randn(repeats, 3, dtype=torch.float64, generator=generator)
    samples[:, 0] += mu
    full = gradient_snr.gradient_stats(samples, 200, generator)
    component = gradient_snr.gradient_stats(samples[:, :1], 200, generator)
    assert full["snr"] == pytest.approx(mu**2 / 3, rel=0.1)
    assert component["snr"] == pytest.approx(mu**2, rel=0.1)
    assert component["mean"] == pytest.approx(mu, abs=0.05)
    assert component["standard_error"] == pytest.approx(1 / math.sqrt(repeats), rel=0.1)
    phi = 0.5 * (1 + math.erf(mu / math.sqrt(2)))
    assert component["sign_agreement"] == pytest.approx(phi, abs=0.02)
    assert component["sign_agreement_gaussian"] == pytest.approx(phi, abs=0.02)
    low, high = component["snr_ci95"]
    assert low <= component["snr"] <= high


def test_stats_of_pure_noise_sit_at_the_noise_floor() -> None:
    generator = torch.Generator().manual_seed(1)
    samples = torch.randn(400, 1, dtype=torch.float64, generator=generator)
    stats = gradient_snr.gradient_stats(samples, 100, generator)
    assert stats["snr"] < 10 * stats["noise_floor"]  # E[snr] = 1/R when there is no signal
    assert stats["snr_debiased"] <= stats["snr"]


def test_all_zero_estimates_have_zero_snr() -> None:
    stats = gradient_snr.gradient_stats(torch.zeros(5, 4, dtype=torch.float64), 20, torch.Generator())
    assert stats["snr"] == 0.0 and stats["zero_fraction"] == 1.0 and stats["sign_agreement"] == 0.0


@pytest.mark.parametrize("testbed", ["1d", "8gaussians"])
def test_tiny_measurement_has_finite_non_negative_snr(testbed: str) -> None:
    settings = gradient_snr.SNRSettings(
        testbed=testbed,
        repeats=3,
        warmup_iterations=2,
        baseline_batches=2,
        draws=(2, 3),
        probe_rows=8,
        bootstrap=20,
        model={"hidden": 8, "batch": 16},
    )
    result = gradient_snr.measure(settings)
    n_gates = 1 if testbed == "1d" else 2
    assert result["gates"] == n_gates
    assert list(result["estimators"]) == ["paper", "probe-2", "probe-3"]
    for name, summary in result["estimators"].items():
        assert len(summary["gates"]) == n_gates
        assert summary["cost"]["nfe_forward"]["min"] > 0
        assert summary["cost"]["rows"] == (16 if name == "paper" else 8)
        assert summary["cost"]["seconds"]["min"] > 0
        assert len(summary["per_estimate"]["bias"]) == 3
        for gate in summary["gates"]:
            for part in ("mean_direction", "full"):
                stats = gate[part]
                for key in ("snr", "snr_debiased", "std", "standard_error"):
                    assert math.isfinite(stats[key]) and stats[key] >= 0, (name, part, key, stats[key])
                assert 0.0 <= stats["sign_agreement"] <= 1.0
    assert "probe-2" in gradient_snr.markdown_table([result])


def test_settings_reject_a_probe_larger_than_the_batch() -> None:
    with pytest.raises(ValueError, match="probe_rows"):
        gradient_snr.SNRSettings(testbed="1d", probe_rows=64, model={"batch": 32})
    with pytest.raises(ValueError, match="draws"):
        gradient_snr.SNRSettings(testbed="1d", draws=(1,))
