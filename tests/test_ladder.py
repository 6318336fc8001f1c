"""The cost ladder: settings as checked data, the ladder's order, grids of equal steps, the policy.

Pinned here:

* :class:`SolverSetting` refuses what cannot be solved (an adaptive method without a tolerance, a
  grid without steps, a method that is neither) and reads back what it writes.
* :class:`SolverLadder` refuses a rung that is no cheaper than one above it of the same method,
  and :meth:`~SolverLadder.cheaper` skips exactly the fixed-grid rungs whose known cost is not below
  the measured cost of the current setting.
* A choice that names a method and ``grid_steps`` is solved on ``linspace(t0, t1, steps + 1)``:
  ``stages x steps`` evaluations (no sliver of an extra step, whatever the rounding of the span),
  the same numbers as torchdiffeq's own RK4 on that grid, and a record that says which setting ran.
* :class:`LadderPolicy` keeps its rung in the state dict; eval mode still uses the eval policy.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torchdiffeq
from hypothesis import given, settings
from hypothesis import strategies as st

from tolgate import (
    FixedSetting,
    FixedTolerance,
    GatedSolver,
    LadderPolicy,
    SolverLadder,
    SolverSetting,
    collect_records,
)
from tolgate.ladder import GRID_STAGES


def decay(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -1.3 * y


def test_setting_refuses_what_cannot_be_solved() -> None:
    with pytest.raises(ValueError, match="takes a tolerance"):
        SolverSetting("dopri5")
    with pytest.raises(ValueError, match="takes a tolerance"):
        SolverSetting("dopri5", tolerance=1e-5, steps=4)
    with pytest.raises(ValueError, match="takes steps"):
        SolverSetting("rk4", tolerance=1e-3)
    with pytest.raises(ValueError, match="fixed grid"):
        SolverSetting("explicit_adams", steps=4)
    with pytest.raises(ValueError, match="rtol|tolerance"):
        SolverSetting("dopri5", tolerance=0.0)
    with pytest.raises(ValueError, match="grid_steps"):
        SolverSetting("rk4", steps=0)
    with pytest.raises(TypeError, match="grid_steps"):
        SolverSetting("rk4", steps=2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["dopri5:1e-05", "bosh3:0.001", "rk4:4", "euler:16", "midpoint:2"])
def test_setting_reads_back_what_it_writes(text: str) -> None:
    setting = SolverSetting.parse(text)
    assert str(setting) == text
    assert SolverSetting.parse(str(setting)) == setting


@pytest.mark.parametrize("text", ["dopri5", "rk4:four", "dopri5:", "nope:3"])
def test_parse_names_the_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="setting"):
        SolverSetting.parse(text)


def test_fixed_grid_cost_is_known_and_adaptive_cost_is_not() -> None:
    assert SolverSetting("rk4", steps=3).nfe_forward == 12
    assert SolverSetting("euler", steps=5).nfe_forward == 5
    assert SolverSetting("dopri5", tolerance=1e-3).nfe_forward is None


def test_default_ladder_goes_from_tight_tolerances_to_one_rk4_step() -> None:
    ladder = SolverLadder.default()
    assert [str(s) for s in ladder][:2] == ["dopri5:1e-08", "dopri5:1e-07"]
    assert [str(s) for s in ladder][-7:] == ["dopri5:0.1", "rk4:8", "rk4:6", "rk4:4", "rk4:3", "rk4:2", "rk4:1"]
    assert len(ladder) == 14


def test_ladder_refuses_a_rung_that_is_no_cheaper_within_its_method() -> None:
    with pytest.raises(ValueError, match="not cheaper"):
        SolverLadder([SolverSetting("dopri5", 1e-3), SolverSetting("dopri5", 1e-5)])
    with pytest.raises(ValueError, match="not cheaper"):  # interleaved methods are compared per method
        SolverLadder([SolverSetting("rk4", steps=2), SolverSetting("dopri5", 1e-3), SolverSetting("rk4", steps=4)])
    with pytest.raises(ValueError, match="distinct"):
        SolverLadder([SolverSetting("rk4", steps=2), SolverSetting("rk4", steps=2)])
    with pytest.raises(ValueError, match="at least one"):
        SolverLadder([])


def test_cheaper_skips_grids_that_cost_what_the_current_setting_costs() -> None:
    ladder = SolverLadder.default()
    at_1e2 = ladder.index(SolverSetting("dopri5", 1e-2))
    # dopri5 at 1e-2 measured at 14 evaluations: RK4 with 8 (32), 6 (24) and 4 (16) steps are no saving
    assert [str(ladder[k]) for k in ladder.cheaper(at_1e2, 14.0)] == ["dopri5:0.1", "rk4:3", "rk4:2", "rk4:1"]
    assert [str(ladder[k]) for k in ladder.cheaper(at_1e2, 100.0)][1:3] == ["rk4:8", "rk4:6"]
    assert ladder.cheaper(len(ladder) - 1, 100.0) == []


@settings(max_examples=25, deadline=None)
@given(
    t0=st.floats(-3.0, 3.0),
    span=st.floats(0.05, 7.0),
    steps=st.integers(1, 9),
    method=st.sampled_from(["rk4", "midpoint", "euler"]),
)
def test_grid_steps_cost_exactly_stages_times_steps(t0: float, span: float, steps: int, method: str) -> None:
    t = torch.tensor([t0, t0 + span], dtype=torch.float64)
    y0 = torch.linspace(0.5, 2.0, 3, dtype=torch.float64)[:, None]
    solver = GatedSolver(FixedSetting(SolverSetting(method, steps=steps)))
    with collect_records(solver) as records:
        ys = solver(decay, y0, t)
    assert records[0].nfe_forward == GRID_STAGES[method] * steps
    assert records[0].grid_steps == steps
    assert records[0].step_size == pytest.approx(span / steps)
    assert records[0].setting == f"{method}:{steps}"
    grid = torch.linspace(t0, t0 + span, steps + 1, dtype=torch.float64)
    expected = torchdiffeq.odeint(decay, y0, t, method=method, options={"grid_constructor": lambda f, y, tt: grid})
    torch.testing.assert_close(ys, expected, rtol=0, atol=0)


def test_a_choice_of_method_overrides_the_solver_method_in_training_only() -> None:
    policy = LadderPolicy(SolverLadder.default(), start=SolverSetting("rk4", steps=2))
    solver = GatedSolver(policy, method="dopri5")
    y0 = torch.ones(2, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with collect_records(solver) as records:
        solver(decay, y0, t)
        solver.eval()
        out = solver(decay, y0, t)
    assert [r.setting for r in records] == ["rk4:2", "dopri5:1e-05"]
    assert [r.method for r in records] == ["rk4", "dopri5"]
    torch.testing.assert_close(out[-1], y0 * torch.exp(torch.tensor(-1.3, dtype=torch.float64)), rtol=1e-4, atol=0)


def test_adaptive_rung_from_a_fixed_grid_solver_solves_to_its_tolerance() -> None:
    solver = GatedSolver(FixedSetting(SolverSetting("dopri5", 1e-8)), method="rk4")
    y0 = torch.ones(1, 1, dtype=torch.float64)
    with collect_records(solver) as records:
        out = solver(decay, y0, torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert records[0].method == "dopri5" and records[0].rtol == 1e-8
    assert float(out[-1, 0, 0]) == pytest.approx(math.exp(-2.6), rel=1e-7)


def test_per_sample_backend_refuses_a_grid_rung() -> None:
    solver = GatedSolver(FixedSetting(SolverSetting("dopri5", 1e-5)), backend="per_sample")
    y0 = torch.ones(2, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    solver(decay, y0, t)  # an adaptive rung it can solve
    grid = GatedSolver(FixedSetting(SolverSetting("dopri5", 1e-5)), backend="per_sample")
    grid.policy = FixedSetting(SolverSetting("rk4", steps=2))
    with pytest.raises(ValueError, match="rk4"):
        grid(decay, y0, t)


def test_ladder_policy_rung_is_saved_with_the_model() -> None:
    ladder = SolverLadder.default()
    solver = GatedSolver(LadderPolicy(ladder))
    assert solver.policy.setting == SolverSetting("dopri5", 1e-5)
    solver.policy.move_to(len(ladder) - 1)
    state = solver.state_dict()
    restored = GatedSolver(LadderPolicy(ladder))
    restored.load_state_dict(state)
    assert restored.policy.setting == SolverSetting("rk4", steps=1)
    assert pickle.loads(pickle.dumps(restored)).policy.index == len(ladder) - 1
    with pytest.raises(ValueError, match="rung"):
        restored.policy.move_to(len(ladder))
    with pytest.raises(ValueError, match="not on the ladder"):
        LadderPolicy(ladder, start=SolverSetting("rk4", steps=5))
    with pytest.raises(TypeError, match="SolverLadder"):
        LadderPolicy([SolverSetting("rk4", steps=3)])  # type: ignore[arg-type]


def test_fixed_tolerance_eval_policy_is_untouched_by_a_ladder() -> None:
    solver = GatedSolver(LadderPolicy(SolverLadder.default(), start=SolverSetting("rk4", steps=1)))
    assert isinstance(solver.eval_policy, FixedTolerance)


def test_ladder_gate_keeps_the_base_rung_at_zero_offset_and_departs_by_whole_rungs() -> None:
    from tolgate import LadderGate, MLPGate

    base = LadderPolicy(SolverLadder.default(), start=SolverSetting("rk4", steps=4))
    gate = LadderGate(base, MLPGate(1)).double()
    with torch.no_grad():
        gate.net.head.weight.zero_()
        gate.net.head.bias.zero_()
    context = torch.ones(3, 1, dtype=torch.float64)
    assert gate(context, None).grid_steps == 4
    with torch.no_grad():
        gate.net.head.bias[0] = 1.4  # 1.4 rungs cheaper rounds to one
    assert gate(context, None).grid_steps == 3
    with torch.no_grad():
        gate.net.head.bias[0] = 9.0  # clipped at the cheapest rung
    assert gate(context, None).grid_steps == 1
    base.move_to(0)  # the automatic rule moved the base to dopri5 1e-8: nine rungs below it is rk4:6
    assert gate(context, None).grid_steps == 6


def test_ladder_gate_draw_scores_the_continuous_offset() -> None:
    from tolgate import LadderGate, MLPGate

    gate = LadderGate(LadderPolicy(SolverLadder.default()), MLPGate(1)).double()
    context = torch.ones(2, 1, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        choice = gate.draw(context, generator, std=0.7)
    mu = gate.mean_offset(context)
    (grad,) = torch.autograd.grad(choice.log_prob, gate.net.head.bias)
    mean = float(mu.detach())
    value = float(torch.randn((), generator=torch.Generator().manual_seed(3), dtype=torch.float64)) * 0.7 + mean
    assert float(grad[0]) == pytest.approx((value - mean) / 0.7**2, rel=1e-9)  # d/dmu log N(v; mu, s)
    assert choice.log_prob.requires_grad
    with pytest.raises(TypeError, match="LadderPolicy"):
        LadderGate(FixedTolerance(1e-5), MLPGate(1))  # type: ignore[arg-type]
