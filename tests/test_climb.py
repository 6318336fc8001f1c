"""The automatic policy's rule (:func:`tolgate.climb`) on problems whose solver errors are known.

The toy: ``dy/dt = r y`` on ``[0, 1]`` per block, objective ``L_i = y_i(1)``. One RK4 step
multiplies by ``1 + r + r^2/2 + r^3/6 + r^4/24`` instead of ``e^r``: for ``r = 0.1`` every rung of
the ladder is within any sensible budget, for ``r = 2.5`` one step is 11 % off and two 1.8 %, so
which rungs pass is a property of the numbers, not of the code. Pinned:

* a smooth block drops from the reference to one RK4 step in one climb (the joint cheapest move);
* a rough block ends on a rung that passes, every eligible cheaper rung failing (the cheapest
  honest rung, found by bisection);
* a block standing on a failing rung retreats, rung by rung, until the check passes, within the
  same call (training never goes on from a failed check);
* two blocks of different difficulty end on different rungs, and the total error stays within
  the budget; when a check fails, only the block at fault retreats;
* every probe's evaluations are counted.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tolgate import (
    FixedSetting,
    FixedTolerance,
    GatedSolver,
    LadderPolicy,
    SolverLadder,
    SolverSetting,
    climb,
    collect_records,
    ladder_policies,
    run_probe,
)
from tolgate.probes import minibatch_noise

T = torch.tensor([0.0, 1.0], dtype=torch.float64)
BATCH = 256  # the training minibatch the budget is tied to
LADDER = SolverLadder.default()


class Exponentials(nn.Module):
    """Blocks in sequence, block ``k`` solving ``dy/dt = rates[k] y``; ``forward(x) -> (rows,)``."""

    def __init__(self, rates: list[float], start: SolverSetting | None = None) -> None:
        super().__init__()
        self.rates = rates
        self.solvers = nn.ModuleList(GatedSolver(LadderPolicy(LADDER, start=start)) for _ in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, None]
        for rate, solver in zip(self.rates, self.solvers, strict=True):
            y = solver(lambda t, y, rate=rate: rate * y, y, T)[-1]
        return y[:, 0]


ROWS = torch.linspace(1.0, 2.0, 32, dtype=torch.float64)


def error_at(model: Exponentials, settings: list[SolverSetting]) -> tuple[float, float, int]:
    """(solver error of the objective at ``settings`` per block, the budget at fraction 0.1, NFE)."""
    by_solver = {id(s): FixedSetting(v) for s, v in zip(model.solvers, settings, strict=True)}
    reference = run_probe(model, lambda: model(ROWS), lambda s: FixedSetting(SolverSetting("dopri5", 1e-5)), 0)
    probe = run_probe(model, lambda: model(ROWS), lambda s: by_solver[id(s)], 0)
    return probe.error_against(reference), 0.1 * minibatch_noise(reference, BATCH), probe.nfe_forward


def climb_once(model: Exponentials, turn: int = 0):
    return climb(model, lambda: model(ROWS), noise_seed=0, batch_size=BATCH, turn=turn)


def test_a_smooth_block_drops_to_one_rk4_step_in_one_climb() -> None:
    model = Exponentials([0.1])
    report = climb_once(model)
    assert report.settings_after == ["rk4:1"]
    assert report.descended and report.retreats == 0 and report.probes == 3
    assert report.candidate_error <= report.budget


def test_a_rough_block_ends_on_the_cheapest_rung_that_passes() -> None:
    model = Exponentials([2.5])
    report = climb_once(model)
    chosen = model.solvers[0].policy.setting
    error, budget, nfe = error_at(model, [chosen])
    assert error <= budget
    below = [error_at(model, [s]) for s in LADDER[LADDER.index(SolverSetting("dopri5", 1e-5)) + 1 :]]
    assert any(e > budget for e, _, _ in below)  # the premise: some rungs fail (one RK4 step is 11 % off)
    assert nfe == min(n for e, _, n in below if e <= budget)  # here dopri5 1e-3 (20) beats RK4 x 8 (32)
    assert report.probes > 3  # the joint cheapest failed, then the bisection


def test_a_failing_rung_is_left_in_the_same_call_rung_by_rung() -> None:
    model = Exponentials([2.5], start=SolverSetting("rk4", steps=1))
    report = climb_once(model)
    assert report.retreats >= 1 and not report.descended
    final = model.solvers[0].policy.setting
    error, budget, _ = error_at(model, [final])
    assert report.error == pytest.approx(error) and error <= budget
    passed_over = LADDER[LADDER.index(final) + 1 : len(LADDER)]
    for setting in passed_over:
        assert error_at(model, [setting])[0] > budget, setting
    assert report.rungs_after[0] == report.rungs_before[0] - report.retreats


def test_blocks_of_different_difficulty_end_on_different_rungs_within_budget() -> None:
    model = Exponentials([0.1, 2.5])
    for turn in range(4):
        climb_once(model, turn)
    smooth, rough = (solver.policy.setting for solver in model.solvers)
    assert smooth == SolverSetting("rk4", steps=1)
    assert rough != smooth
    error, budget, _ = error_at(model, [smooth, rough])
    assert error <= budget


def test_every_probe_evaluation_is_counted() -> None:
    model = Exponentials([0.1])
    with collect_records(model) as records:
        report = climb_once(model)
    assert report.nfe_forward == sum(r.nfe_forward for r in records)
    assert report.rows == len(ROWS)
    assert records[-1].nfe_forward == 4  # the candidate: one RK4 step


def test_climb_needs_ladder_policies() -> None:
    module = nn.Module()
    module.solver = GatedSolver(FixedTolerance(1e-5))
    with pytest.raises(TypeError, match="LadderPolicy"):
        ladder_policies(module)
    with pytest.raises(ValueError, match="fraction"):
        climb(Exponentials([0.1]), lambda: ROWS, 0, BATCH, fraction=0.0)


def test_a_shared_policy_moves_once_for_all_its_blocks() -> None:
    model = Exponentials([0.1, 0.1])
    shared = model.solvers[0].policy
    model.solvers[1].policy = shared
    assert ladder_policies(model) == [shared]
    climb_once(model)
    assert shared.setting == SolverSetting("rk4", steps=1)


def test_rk4_one_step_error_matches_its_taylor_polynomial() -> None:
    """The toy's premise: one RK4 step of dy/dt = r y multiplies by the degree-4 Taylor polynomial."""
    model = Exponentials([2.5], start=SolverSetting("rk4", steps=1))
    out = model(torch.ones(1, dtype=torch.float64))
    assert float(out[0]) == pytest.approx(sum(2.5**k / math.factorial(k) for k in range(5)), rel=1e-12)


def test_only_the_block_at_fault_retreats() -> None:
    model = Exponentials([0.1, 2.5], start=SolverSetting("rk4", steps=1))
    report = climb_once(model)
    smooth, rough = (solver.policy.setting for solver in model.solvers)
    assert smooth == SolverSetting("rk4", steps=1)  # it was fine where it stood
    assert rough.steps is None or rough.steps > 1
    assert report.retreats >= 1 and report.rungs_after[0] == report.rungs_before[0]
    error, budget, _ = error_at(model, [smooth, rough])
    assert error <= budget and report.error == pytest.approx(error)


def test_a_ladder_gate_learns_to_leave_an_expensive_rung_that_it_need_not_pay_for() -> None:
    """The probe estimator's reward (fewer evaluations, a penalty past the budget) moves a
    :class:`LadderGate` off a base rung pinned at the reference when cheaper rungs pass. The
    ladder is monotone in cost here (20, 14, 8, 4 evaluations): on the default one the smooth
    block's dopri5 rungs from 1e-4 to 1e-1 all cost 14 and RK4 with 8 steps 32, a plateau without
    signal and a bump that repels the draws (docs/results.md, issue 16)."""
    from tolgate import LadderGate, LadderPolicy, MLPGate, ProbedGateEstimator

    torch.manual_seed(0)
    model = Exponentials([0.1])
    ladder = SolverLadder([SolverSetting.parse(s) for s in ("dopri5:1e-5", "dopri5:1e-3", "rk4:2", "rk4:1")])
    gate = LadderGate(LadderPolicy(ladder), MLPGate(1)).double()
    model.solvers[0].policy = gate
    estimator = ProbedGateEstimator(draws=4, exploration_std=1.0)
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.1)
    context = ROWS[:, None]
    before = float(gate.mean_offset(context).detach())
    with collect_records(model) as start:
        model(ROWS)
    for step in range(40):
        optimizer.zero_grad()
        surrogate, report = estimator.loss(model, lambda: model(ROWS), noise_seed=step, batch_size=BATCH)
        surrogate.backward()
        optimizer.step()
    with collect_records(model) as end:
        model(ROWS)
    assert float(gate.mean_offset(context).detach()) > before + 1.0  # more than a rung cheaper
    assert end[0].nfe_forward < start[0].nfe_forward
    error, budget, _ = error_at(model, [SolverSetting.parse(end[0].setting)])
    assert error <= budget
