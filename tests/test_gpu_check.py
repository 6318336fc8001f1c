"""benchmarks/gpu_check.py: every check passes on the CPU at the tiny size, and a failed check is
reported as FAIL with a non-zero exit status."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PATH = ROOT / "benchmarks" / "gpu_check.py"
_SPEC = importlib.util.spec_from_file_location("gpu_check", _PATH)
gpu_check = importlib.util.module_from_spec(_SPEC)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
_SPEC.loader.exec_module(gpu_check)


def test_tiny_cpu_run_passes_every_check_and_writes_the_summary(tmp_path):
    summary_path = tmp_path / "summary.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(_PATH), "--device", "cpu", "--tiny", "--budget", "60", "--json", str(summary_path)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary == json.loads(summary_path.read_text())
    assert summary["passed"] and summary["reference_device"] == "cpu"
    expected = {"backends", "per_sample_solver", "train_step", "resume", "time_budget"}
    assert set(summary["checks"]) == expected
    assert all(check["passed"] for check in summary["checks"].values())
    for name in expected:
        assert f"PASS {name}" in result.stderr
    step = summary["checks"]["train_step"]
    assert step["seconds_per_step"] > 0 and step["peak_memory_bytes"] is None  # no CUDA memory on the CPU
    assert set(summary["checks"]["backends"]) == {"passed", "seconds", *gpu_check.BACKENDS}


def test_each_backend_is_checked_once_by_its_canonical_name():
    assert gpu_check.BACKENDS == ("torchdiffeq", "per_sample")  # not the deprecated alias "tolgate" too


def test_a_failing_check_prints_fail_and_exits_1(monkeypatch, capsys):
    def broken(device, reference, sizes):
        raise RuntimeError("the device disagrees")

    monkeypatch.setattr(gpu_check, "CHECKS", {"broken": broken})
    assert gpu_check.main(["--device", "cpu", "--tiny"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert not summary["passed"]
    broken_check = summary["checks"]["broken"]
    assert not broken_check["passed"] and broken_check["error"] == "RuntimeError: the device disagrees"
    assert "FAIL broken" in captured.err and "PASS time_budget" in captured.err


def test_the_full_size_is_the_papers_cifar_step():
    assert gpu_check.FULL.batch == 900 and gpu_check.FULL.image_shape == (3, 32, 32)
    assert gpu_check.FULL.model == {}  # the architecture is ModelConfig's defaults
