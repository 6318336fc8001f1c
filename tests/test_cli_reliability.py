"""The training command line never loses a run, refuses bad input in one line, and can be stopped.

Each test pins one failure seen in issue 11: reruns that replaced an earlier run's files, resumes
that started over or ignored changed flags, a torn metrics line, tracebacks for user errors (also
under ``python -O``), a step budget that was missing, Ctrl-C that waited for the iteration.
Everything reuses one tiny run (two iterations on the bundled digits) trained once per module.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tolgate_flows.train as train
from tolgate_flows.checkpoints import check_output_folder
from tolgate_flows.cli import main, parser
from tolgate_flows.train import read_history, stored_settings

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--dataset", "digits", "--model", "infocnf", "--tolerance", "fixed", "--train-tol", "1e-2",
    "--eval-tol", "1e-2", "--batch-size", "16", "--hidden", "4", "--n-flows", "1", "--epochs", "1",
    "--max-train-batches", "2", "--max-eval-batches", "1", "--eval-batch-size", "32", "--lr", "1e-2",
    "--no-progress",
]  # fmt: skip


def _main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the command line in-process: (exit status, stderr); stdout stays in ``capsys``."""
    capsys.readouterr()
    try:
        main(args)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    print(captured.out, end="")  # back into the capture, for tests that read it
    return status, captured.err


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _without_timing(history: list[dict]) -> list[dict]:
    for record in history:
        for key in ("seconds", "images_per_second", "seconds_per_iteration"):
            record["train"].pop(key)
    return history


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    main([*TINY, "--out", str(out)])
    return out


@pytest.fixture
def copy_of(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_rerun_into_an_existing_out_refuses_and_leaves_every_file_byte_identical(trained, capsys):
    before = _files(trained)
    status, err = _main([*TINY, "--out", str(trained)], capsys)
    assert status == 2
    line = _one_error_line(err)
    assert str(trained) in line and "--resume" in line and "metrics.jsonl" in line
    assert _files(trained) == before


def test_resume_without_last_pt_refuses_instead_of_starting_over(copy_of, capsys):
    (copy_of / "last.pt").unlink()
    before = _files(copy_of)
    status, err = _main([*TINY, "--out", str(copy_of), "--resume"], capsys)
    assert status == 2
    assert "no last.pt" in _one_error_line(err)
    assert _files(copy_of) == before


def test_resume_drops_a_torn_last_metrics_line_with_a_warning(copy_of, capsys):
    complete = (copy_of / "metrics.jsonl").read_text()
    with (copy_of / "metrics.jsonl").open("a") as fh:
        fh.write('{"epoch": 1, "train": {"loss": 3.')  # a crash mid-write
    with pytest.warns(UserWarning, match="partial last line"):
        status, err = _main([*TINY, "--out", str(copy_of), "--resume"], capsys)
    assert status == 0, err
    assert (copy_of / "metrics.jsonl").read_text() == complete
    assert json.loads((copy_of / "summary.json").read_text())["selected_epoch"] == 0


def test_resume_with_a_changed_lr_is_refused_naming_the_flag_and_both_values(copy_of, capsys):
    before = _files(copy_of)
    status, err = _main([*TINY, "--out", str(copy_of), "--resume", "--lr", "0.05"], capsys)
    assert status == 2
    line = _one_error_line(err)
    assert "--lr (stored 0.01, now 0.05)" in line
    assert _files(copy_of) == before


def test_resume_with_more_epochs_continues_the_run(copy_of, capsys):
    status, err = _main(["--out", str(copy_of), "--resume", "--epochs", "2"], capsys)  # other flags: stored
    assert status == 0, err
    assert [h["epoch"] for h in read_history(copy_of / "metrics.jsonl")] == [0, 1]
    assert json.loads((copy_of / "config.json").read_text())["epochs"] == 2


def test_resume_of_a_run_stored_in_the_old_flat_layout_checks_and_continues_it(copy_of, capsys):
    """Runs written before the configuration was nested stored it flat, in last.pt and config.json."""
    state = torch.load(copy_of / "last.pt", weights_only=True)
    state["config"] = stored_settings(state["config"])
    torch.save(state, copy_of / "last.pt")
    (copy_of / "config.json").write_text(json.dumps(state["config"]))
    status, err = _main([*TINY, "--out", str(copy_of), "--resume", "--lr", "0.05", "--hidden", "8"], capsys)
    assert status == 2
    line = _one_error_line(err)
    assert "--lr (stored 0.01, now 0.05)" in line and "--hidden (stored 4, now 8)" in line
    status, err = _main(["--out", str(copy_of), "--resume", "--epochs", "2"], capsys)
    assert status == 0, err
    assert [h["epoch"] for h in read_history(copy_of / "metrics.jsonl")] == [0, 1]
    written = json.loads((copy_of / "config.json").read_text())  # from now on nested
    assert (written["epochs"], written["model"]["hidden"], written["tolerance"]["train_tol"]) == (2, 4, 1e-2)


def test_resume_where_nothing_was_saved_starts_fresh_and_a_lone_config_json_is_no_run(tmp_path):
    assert check_output_folder(tmp_path / "never-written", resume=True) is False
    (tmp_path / "config.json").write_text("{}")  # a run killed before its first checkpoint
    assert check_output_folder(tmp_path, resume=False) is False
    assert check_output_folder(tmp_path, resume=True) is False


def test_help_shows_the_values_used_instead_of_none():
    text = " ".join(parser().format_help().split())
    assert "default: None" not in text
    assert "--lr LR (default: 0.001; preset paper-large 0.01, cpu 0.003, grid 0.003)" in text
    assert "(default: 1000)" in text  # --max-num-steps


BAD_VALUES = {
    "negative-lr": ["--lr", "-1"],
    "zero-lr": ["--lr", "0"],
    "nan-lr": ["--lr", "nan"],
    "lr-not-a-number": ["--lr", "fast"],
    "zero-batch-size": ["--batch-size", "0"],
    "zero-epochs": ["--epochs", "0"],
    "negative-warmup": ["--warmup-iters", "-5"],
    "negative-grad-clip": ["--grad-clip", "-1"],
    "negative-gate-lr": ["--gate-lr", "-0.1"],
    "negative-beta": ["--beta", "-1"],
    "zero-eval-draws": ["--eval-draws", "0"],
    "zero-train-tol": ["--train-tol", "0"],
    "train-tol-above-one": ["--train-tol", "2"],
    "eval-tol-above-one": ["--eval-tol", "1.5"],
    "zero-recheck-tol": ["--recheck-tols", "1e-6", "0"],
    "zero-step-budget": ["--max-num-steps", "0"],
    "one-probe-draw": ["--probe-draws", "1"],
    "unknown-model": ["--model", "resnet"],
    "bad-device": ["--device", "gpu7"],
    "seminorm-without-adjoint": ["--seminorm"],
    "gate-mean-from-missing-run": ["--tolerance", "gate-mean", "--gate-mean-from", "/nonexistent/run"],
    "missing-cifar-files": ["--dataset", "cifar10", "--data-dir", "/nonexistent/data"],
    "ladder-rung-unreadable": ["--tolerance", "auto", "--ladder", "dopri5:1e-5", "rk4:four"],
    "ladder-not-cheaper": ["--tolerance", "auto", "--ladder", "dopri5:1e-2", "dopri5:1e-5"],
    "ladder-without-start": ["--tolerance", "auto", "--ladder", "dopri5:1e-3", "rk4:2"],
    "auto-per-sample": ["--tolerance", "auto", "--backend", "per_sample"],
    "auto-with-train-method": ["--tolerance", "auto", "--train-method", "rk4"],
    "auto-with-local-error": ["--tolerance", "auto", "--local-error", "0.01"],
}


@pytest.mark.parametrize("flags", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_flag_value_prints_one_error_line_and_exits_2(flags, tmp_path, capsys):
    status, err = _main([*TINY, "--out", str(tmp_path / "run"), *flags], capsys)
    assert status == 2
    _one_error_line(err)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_negative_grad_clip_is_one_error_line_under_python_O(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-O",
            str(ROOT / "benchmarks" / "cifar_infocnf.py"),
            "--grad-clip",
            "-1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2
    _one_error_line(done.stderr)


def test_step_budget_failure_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    status, err = _main([*TINY, "--out", str(out), "--max-num-steps", "1"], capsys)
    assert status == 2
    line = _one_error_line(err)
    assert "max_num_steps=1" in line and "--max-num-steps" in line
    assert not (out / "last.pt").exists()  # no iteration completed: nothing to save, folder reusable


def test_second_ctrl_c_stops_inside_the_iteration_and_saves_the_last_completed_one(
    trained, tmp_path, capsys, monkeypatch
):
    original = train.set_progress

    def ctrl_c_twice_in_the_second_iteration(model, step, epoch):
        original(model, step, epoch)
        if step == 1:
            signal.raise_signal(signal.SIGINT)  # stop after this iteration ...
            signal.raise_signal(signal.SIGINT)  # ... no: now

    monkeypatch.setattr(train, "set_progress", ctrl_c_twice_in_the_second_iteration)
    out = tmp_path / "run"
    status, _ = _main([*TINY, "--out", str(out)], capsys)
    assert status == 130
    assert "(epoch 0, batch 1)" in capsys.readouterr().out and (out / "last.pt").exists()
    monkeypatch.setattr(train, "set_progress", original)
    status, err = _main([*TINY, "--out", str(out), "--resume"], capsys)
    assert status == 0, err
    # The saved state was exactly the first iteration's: the resumed run equals the uninterrupted one.
    resumed = _without_timing(read_history(out / "metrics.jsonl"))
    assert resumed == _without_timing(read_history(trained / "metrics.jsonl"))
