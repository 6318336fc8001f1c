"""Issue 11, item 6 and the gate parts of item 9: REINFORCE and the gates refuse what would poison
or silently drop the learning signal, with typed errors that name the quantity, and keep their
state intact when they refuse."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tolgate import (
    ConvGate,
    GatedSolver,
    GaussianGate,
    MLPGate,
    Progress,
    RunningMeanBaseline,
    SolveRecord,
    cumulative_returns,
    reinforce_loss,
    solve_rewards,
)

ROOT = Path(__file__).resolve().parents[1]
T_SPAN = torch.tensor([0.0, 1.0], dtype=torch.float64)


def record(nfe_forward: int, nfe_backward: int = 0, log_prob: torch.Tensor | None = None) -> SolveRecord:
    return SolveRecord(
        method="dopri5",
        adjoint=False,
        rtol=1e-5,
        atol=1e-5,
        nfe_forward=nfe_forward,
        nfe_backward=nfe_backward,
        log_prob=log_prob,
    )


def _field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -y


def _gated_solve(gate: GaussianGate) -> tuple[GatedSolver, torch.Tensor]:
    solver = GatedSolver(gate)
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ys = solver(_field, y0, T_SPAN)
    return solver, ys[-1].pow(2).mean()


# ---------------------------------------------------------------- non-finite returns


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_task_loss_is_refused_and_the_baseline_stays_finite(bad: float) -> None:
    baseline = RunningMeanBaseline(momentum=0.5)
    log_prob = torch.tensor(-1.0, requires_grad=True)
    reinforce_loss([record(10, log_prob=log_prob)], torch.tensor(2.0), alpha=1.0, baseline=baseline)
    before = baseline.values.clone()
    with pytest.raises(ValueError, match=r"task_loss has 1 non-finite value.*baseline is left unchanged"):
        reinforce_loss([record(10, log_prob=log_prob)], torch.tensor(bad), alpha=1.0, baseline=baseline)
    assert torch.equal(baseline.values, before) and bool(torch.isfinite(baseline.values).all())
    # The next good batch carries on from the untouched state.
    surrogate = reinforce_loss([record(12, log_prob=log_prob)], torch.tensor(2.0), alpha=1.0, baseline=baseline)
    assert math.isfinite(float(surrogate.detach()))


def test_one_nan_in_a_per_sample_task_loss_is_refused() -> None:
    baseline = RunningMeanBaseline()
    with pytest.raises(ValueError, match=r"task_loss has 1 non-finite value\(s\) \(e\.g\. \[nan\]\)"):
        reinforce_loss([record(10)], torch.tensor([1.0, math.nan, 2.0]), alpha=1.0, baseline=baseline)
    assert baseline.values is None


def test_baseline_update_refuses_non_finite_returns_and_keeps_its_state() -> None:
    baseline = RunningMeanBaseline(momentum=0.5)
    baseline.update(torch.tensor([-10.0, -4.0], dtype=torch.float64))
    before = baseline.values.clone()
    with pytest.raises(ValueError, match=r"returns has 1 non-finite value\(s\) \(e\.g\. \[inf\]\)"):
        baseline.update(torch.tensor([-20.0, math.inf], dtype=torch.float64))
    assert torch.equal(baseline.values, before)
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, batch\).*got \(\)"):
        baseline.update(torch.tensor(1.0))


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"momentum": 0.9, "values": torch.tensor([1.0, math.nan])}, r"baseline values has 1 non-finite"),
        ({"momentum": math.nan, "values": None}, r"momentum must be in \[0, 1\), got nan"),
        ({"momentum": 0.9, "values": [1.0]}, r"baseline values must be None or a tensor of shape \(N,\)"),
    ],
)
def test_baseline_refuses_to_load_a_poisoned_state(state: dict, message: str) -> None:
    baseline = RunningMeanBaseline(momentum=0.5)
    with pytest.raises(ValueError, match=message):
        baseline.load_state_dict(state)
    assert baseline.momentum == 0.5 and baseline.values is None


# ---------------------------------------------------------------- alpha and nfe_scale


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -1.0])
def test_nan_infinite_or_negative_alpha_is_refused(alpha: float) -> None:
    baseline = RunningMeanBaseline()
    with pytest.raises(ValueError, match=rf"alpha must be finite and >= 0, got {alpha!r}"):
        reinforce_loss([record(10)], torch.tensor(1.0), alpha=alpha, baseline=baseline)
    with pytest.raises(ValueError, match="alpha must be finite"):
        cumulative_returns(torch.tensor(1.0), solve_rewards([record(10)]), alpha=alpha)
    assert baseline.values is None


@pytest.mark.parametrize("nfe_scale", [math.nan, math.inf, 0.0, -2.0])
def test_nan_infinite_or_non_positive_nfe_scale_is_refused(nfe_scale: float) -> None:
    with pytest.raises(ValueError, match=rf"nfe_scale must be finite and > 0, got {nfe_scale!r}"):
        reinforce_loss([record(10)], torch.tensor(1.0), alpha=1.0, nfe_scale=nfe_scale)


# ---------------------------------------------------------------- call order


def test_include_backward_before_backward_is_refused_with_the_call_order() -> None:
    solver, task_loss = _gated_solve(GaussianGate(MLPGate(3).double()))
    baseline = RunningMeanBaseline()
    with pytest.raises(ValueError, match=r"nfe_backward == 0.*Call loss\.backward\(\) first"):
        reinforce_loss(solver.records, task_loss, alpha=1.0, baseline=baseline, include_backward=True)
    assert baseline.values is None
    task_loss.backward()
    (rec,) = solver.records
    assert rec.nfe_backward > 0
    surrogate = reinforce_loss(solver.records, task_loss, alpha=1.0, baseline=baseline, include_backward=True)
    surrogate.backward()
    assert [float(r) for r in solve_rewards(solver.records, include_backward=True)] == [-float(rec.nfe_total)]


def test_include_backward_on_records_without_backward_nfe_is_refused() -> None:
    with pytest.raises(ValueError, match=r"all 2 record\(s\) have nfe_backward == 0"):
        solve_rewards([record(10), record(20)], include_backward=True)
    # One record with backward NFE is enough: others may legitimately not reach the loss.
    assert [float(r) for r in solve_rewards([record(10, 5), record(20)], include_backward=True)] == [-15.0, -20.0]
    assert [float(r) for r in solve_rewards([record(10), record(20)])] == [-10.0, -20.0]


def test_training_mode_solve_under_no_grad_keeps_a_differentiable_log_prob() -> None:
    gate = GaussianGate(MLPGate(3).double())
    solver = GatedSolver(gate)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        ys = solver(_field, y0, T_SPAN)
    assert not ys.requires_grad  # the solve keeps the caller's grad mode
    (rec,) = solver.records
    assert rec.log_prob is not None and rec.log_prob.requires_grad
    surrogate = reinforce_loss(solver.records, ys[-1].pow(2).mean(), alpha=1.0)
    grads = torch.autograd.grad(surrogate, list(gate.parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_draw_under_no_grad_is_differentiable_but_a_frozen_gates_is_not() -> None:
    context = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        live = GaussianGate(MLPGate(3).double()).draw(context)
        frozen = GaussianGate(MLPGate(3).double()).freeze().draw(context)
        also_live = GaussianGate(MLPGate(3).double())(context, Progress())
    assert live.log_prob.requires_grad and also_live.log_prob.requires_grad
    assert not frozen.log_prob.requires_grad
    assert not live.log10_tolerance.requires_grad  # the draw itself stays detached
    with torch.no_grad():
        GaussianGate(MLPGate(3).double()).draw(context)
        assert not torch.is_grad_enabled()  # the caller's grad mode is restored after the draw


# ---------------------------------------------------------------- gate construction and inputs


@pytest.mark.parametrize("initial_log10", [-9.0, -0.5, math.nan, math.inf])
def test_gate_initial_log10_outside_its_bounds_is_refused(initial_log10: float) -> None:
    with pytest.raises(ValueError, match=rf"initial_log10 must lie in .*\[-8, -1\].*got {initial_log10!r}"):
        GaussianGate(MLPGate(3), low=1e-8, high=1e-1, initial_log10=initial_log10)


def test_gate_initial_log10_on_its_bounds_is_accepted() -> None:
    for initial_log10 in (-8.0, -1.0):
        assert GaussianGate(MLPGate(3), low=1e-8, high=1e-1, initial_log10=initial_log10).initial_log10 == initial_log10


def test_gate_nan_initial_std_is_refused() -> None:
    with pytest.raises(ValueError, match=r"initial_std must be finite and > 0, got nan"):
        GaussianGate(MLPGate(3), initial_std=math.nan)


@pytest.mark.parametrize("shape", [(4, 5), (4, 2, 2), (4,)])
def test_mlp_gate_context_of_the_wrong_size_names_both_shapes(shape: tuple[int, ...]) -> None:
    expected = re.escape("MLPGate expects a context of shape (batch, 3)") + ".*" + re.escape(f"got {shape}")
    with pytest.raises(ValueError, match=expected):
        MLPGate(3)(torch.randn(*shape))
    assert MLPGate(4)(torch.randn(4, 2, 2)).shape == (4, 2)  # extra dims still flatten


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 8), (2, 3)])
def test_conv_gate_context_of_the_wrong_shape_names_both_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"ConvGate expects a context of shape (batch, 3, H, W), got {shape}")
    ):
        ConvGate(3)(torch.randn(*shape))


def test_wrong_context_reaches_the_solver_as_a_value_error_not_a_matmul_error() -> None:
    solver = GatedSolver(GaussianGate(MLPGate(5).double()))
    y0 = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(batch, 5\).*got \(4, 3\)"):
        solver(_field, y0, T_SPAN)


# ---------------------------------------------------------------- python -O


def test_checks_hold_under_python_optimize() -> None:
    """Every check above is an ``if``/``raise``, not an ``assert``: ``python -O`` keeps them."""
    script = textwrap.dedent(
        """
        import math, torch
        from tolgate import GaussianGate, MLPGate, RunningMeanBaseline, SolveRecord, reinforce_loss
        assert False, "asserts must be stripped here"
        rec = SolveRecord(method="dopri5", adjoint=False, rtol=1e-5, atol=1e-5, nfe_forward=10)
        baseline = RunningMeanBaseline()
        cases = {
            "nan loss": lambda: reinforce_loss([rec], torch.tensor(math.nan), 1.0, baseline),
            "nan alpha": lambda: reinforce_loss([rec], torch.tensor(1.0), math.nan, baseline),
            "nan nfe_scale": lambda: reinforce_loss([rec], torch.tensor(1.0), 1.0, baseline, nfe_scale=math.nan),
            "backward first": lambda: reinforce_loss([rec], torch.tensor(1.0), 1.0, include_backward=True),
            "initial_log10": lambda: GaussianGate(MLPGate(3), initial_log10=0.0),
            "mlp shape": lambda: MLPGate(3)(torch.randn(2, 4)),
        }
        for name, call in cases.items():
            try:
                call()
            except ValueError:
                continue
            raise SystemExit(f"{name}: no ValueError under -O")
        if baseline.values is not None:
            raise SystemExit("baseline touched")
        print("all refused")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip() == "all refused"
