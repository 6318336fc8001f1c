"""The training entry point: loss goes down, resume reproduces, DDP aggregates, CLI errors are clear."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tolgate_flows.cli import config_from_args, parser
from tolgate_flows.train import TrainConfig, read_history, run, stored_settings

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    dataset="digits",
    batch_size=64,
    hidden=8,
    n_flows=1,
    eval_batch_size=64,
    max_eval_batches=1,
    train_tol=1e-3,
    eval_tol=1e-3,
    progress_bar=False,
    lr=1e-2,
)


def _store_flat(out: Path) -> None:
    """Rewrite the run's stored configuration in the flat layout runs wrote before it was nested."""
    state = torch.load(out / "last.pt", weights_only=True)
    state["config"] = stored_settings(state["config"])
    assert "hidden" in state["config"] and state["config"]["model"] == "infocnf"
    torch.save(state, out / "last.pt")
    (out / "config.json").write_text(json.dumps(state["config"]))


def _strip_timing(history):
    for h in history:
        for key in ("seconds", "images_per_second", "seconds_per_iteration"):
            h["train"].pop(key)
    return history


def test_few_iterations_lower_the_loss(tmp_path):
    config = TrainConfig.from_settings(
        **TINY, model="infocnf", tolerance="learned", epochs=3, max_train_batches=4, out=str(tmp_path / "run")
    )
    summary = run(config)
    history = read_history(tmp_path / "run" / "metrics.jsonl")
    assert len(history) == 3
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    assert history[-1]["val"]["bpd_cond"] < history[0]["val"]["bpd_cond"]
    # learned gates report one tolerance per block, and checkpoints load with weights_only
    assert all(m is not None for m in history[-1]["train"]["tol_log10_mean"])
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "curves.png").exists()
    assert summary["selected_epoch"] in (0, 1, 2)
    # config.json and the summary hold the nested configuration, the model sized for the data
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["model"]["kind"] == "infocnf" and written["model"]["image_shape"] == [1, 8, 8]
    assert written["tolerance"]["mode"] == "learned" and "hidden" not in written
    assert TrainConfig.from_dict(written) == config.for_data((1, 8, 8), 10)
    assert json.loads(json.dumps(summary["config"])) == written


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Also from a run whose last.pt and config.json hold the flat configuration of earlier versions."""
    common = dict(TINY, model="infocnf", tolerance="learned", epochs=2, max_train_batches=3)
    run(TrainConfig.from_settings(**common, out=str(tmp_path / "straight")))
    interrupted = run(TrainConfig.from_settings(**common, out=str(tmp_path / "resumed")), stop_after_batches=4)
    assert interrupted["interrupted"]
    _store_flat(tmp_path / "resumed")
    run(TrainConfig.from_settings(**common, out=str(tmp_path / "resumed")), resume=True)
    straight = _strip_timing(read_history(tmp_path / "straight" / "metrics.jsonl"))
    resumed = _strip_timing(read_history(tmp_path / "resumed" / "metrics.jsonl"))
    assert straight == resumed


@pytest.mark.parametrize("extra", [[], ["--reward-backward-nfe"]], ids=["ddp-hooks", "two-backward-explicit-allreduce"])
def test_two_process_ddp_reports_aggregated_nfe(tmp_path, extra):
    out = tmp_path / "ddp"
    port = "29531" if not extra else "29532"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(ROOT / "benchmarks" / "cifar_infocnf.py"),
        "--dataset",
        "digits",
        "--model",
        "ccnf",
        "--tolerance",
        "learned",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--hidden",
        "8",
        "--n-flows",
        "1",
        "--max-train-batches",
        "2",
        "--max-eval-batches",
        "1",
        "--train-tol",
        "1e-3",
        "--eval-tol",
        "1e-3",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=300, capture_output=True)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    per_rank = record["train"]["nfe_forward_per_rank"]
    assert len(per_rank) == 2 and all(v > 0 for v in per_rank)
    assert record["train"]["nfe_forward"] == pytest.approx(sum(per_rank) / 2)


def test_cifar_without_data_explains_where_to_put_it(tmp_path):
    from tolgate_flows.data import DataNotFoundError

    args = parser().parse_args(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-bin"):
        run(config_from_args(args))


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="tolerance"):
        TrainConfig.from_settings(tolerance="sometimes")
    with pytest.raises(ValueError, match="gate_mean_log10"):
        TrainConfig.from_settings(tolerance="gate-mean")
    with pytest.raises(ValueError, match="train_tol"):
        TrainConfig.from_settings(train_tol=0.0)


def test_seeded_evaluation_is_repeatable_and_leaves_the_training_stream_alone():
    from tolgate_flows.data import load_dataset, make_batches
    from tolgate_flows.train import Dist, build, evaluate

    config = TrainConfig.from_settings(**TINY, model="infocnf")
    dataset = load_dataset("digits")
    model = build(config, dataset.image_shape, dataset.n_classes)
    batches = make_batches(dataset, "test", 64, seed=0)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = evaluate(model, batches, dataset.levels, Dist(), max_batches=1, noise_seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = evaluate(model, batches, dataset.levels, Dist(), max_batches=1, noise_seed=3)
    assert first == second
    other = evaluate(model, batches, dataset.levels, Dist(), max_batches=1, noise_seed=4)
    assert other["bpd_cond"] != first["bpd_cond"]  # the noise does enter the estimate
    averaged = evaluate(model, batches, dataset.levels, Dist(), max_batches=1, draws=3, noise_seed=3)
    assert averaged["error"] == first["error"]  # the latent, hence the classifier, is noise-free
    assert abs(averaged["bpd_cond"] - first["bpd_cond"]) < 0.1


@pytest.mark.parametrize(
    ("levers", "on"),
    [
        (dict(kinetic=0.01, jacobian=0.01, train_method="rk4"), ("kinetic", "jacobian")),
        (dict(local_error=0.1, stiffness=0.01, steer=0.3), ("local_error", "stiffness")),
    ],
    ids=["rnode-rk4", "solver-penalties-steer"],
)
def test_levers_reach_the_loss_and_the_metrics(tmp_path, levers, on):
    """RNODE on rk4 (h = 0.25: 16 evaluations per block and solve, 3 blocks), or the solver's
    penalties with STEER: every weighted penalty is logged per iteration, the others are None,
    and evaluation still solves with dopri5 at --eval-tol."""
    config = TrainConfig.from_settings(
        **TINY, model="cnf", epochs=1, max_train_batches=2, out=str(tmp_path / "run"), **levers
    )
    summary = run(config)
    record = read_history(tmp_path / "run" / "metrics.jsonl")[0]
    train = record["train"]
    for name in ("kinetic", "jacobian", "local_error", "stiffness"):
        assert (train[name] is not None and train[name] > 0) == (name in on), name
        assert summary["train_penalties_mean"][name] == train[name]
    if config.levers.train_method == "rk4":
        assert train["nfe_forward"] == 3 * 16 and train["nfe_backward"] == 3 * 16
        assert train["tol_log10_mean"] == [None, None, None]
    assert record["test"]["nfe_forward"] > 0 and math.isfinite(record["test"]["bpd_cond"])
