"""The automatic solver policy inside the flows: configuration, testbed runs, the image trainer's
command line, and the cheapest honest evaluation.

Pinned: ``auto`` builds one :class:`tolgate.LadderPolicy` per block, all starting at dopri5
``train_tol``; a testbed run logs each block's rung and ends with the rung it stood on, evaluates
the held-out set there (``test_nll_at_used_tol``) and at every rung of the evaluation ladder; the
command line stores ``--ladder`` and trains with it; :func:`cheapest_honest` takes the fewest
evaluations within the bound.
"""

from __future__ import annotations

import json

import pytest

from tolgate import LadderPolicy, SolverLadder, SolverSetting, gated_solvers
from tolgate_flows import testbed
from tolgate_flows.cheapest_eval import EVALUATION_LADDER, RungEvaluation, cheapest_honest
from tolgate_flows.cli import main
from tolgate_flows.levers import LeverConfig
from tolgate_flows.tolerance import ToleranceConfig, solver_ladder


def test_default_ladder_spans_the_tolerance_range_then_rk4_grids() -> None:
    ladder = solver_ladder(ToleranceConfig(mode="auto", tolerance_low=1e-6, tolerance_high=1e-2, train_tol=3e-4))
    assert [str(s) for s in ladder] == [
        "dopri5:1e-06", "dopri5:1e-05", "dopri5:0.0001", "dopri5:0.0003", "dopri5:0.001", "dopri5:0.01",
        "rk4:8", "rk4:6", "rk4:4", "rk4:3", "rk4:2", "rk4:1",
    ]  # fmt: skip
    given = solver_ladder(ToleranceConfig(mode="auto", ladder=["dopri5:1e-5", "rk4:2"]))
    assert list(given) == [SolverSetting("dopri5", 1e-5), SolverSetting("rk4", steps=2)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ladder": ["dopri5:1e-3", "rk4:1"]}, "not on the ladder"),
        ({"ladder": ["rk4:x"]}, "cannot read"),
        ({"per_sample": True}, "per-sample"),
    ],
)
def test_auto_configuration_is_refused_with_a_reason(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToleranceConfig(mode="auto", **settings)


def test_auto_refuses_levers_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="fixed"):
        testbed.TestbedConfig(tolerance=ToleranceConfig(mode="auto"), levers=LeverConfig(train_method="rk4"))
    with pytest.raises(ValueError, match="auto"):
        testbed.TestbedConfig(tolerance=ToleranceConfig(mode="auto"), levers=LeverConfig(local_error=0.01))


def test_auto_testbed_run_moves_blocks_and_reports_where_they_ended(tmp_path) -> None:
    config = testbed.TestbedConfig(
        testbed="8gaussians",
        n_blocks=2,
        hidden=8,
        batch=64,
        iterations=12,
        eval_size=200,
        grid_points=40,
        log_every=4,
        tolerance=ToleranceConfig(mode="auto", probe_every=4, probe_size=16),
        levers=LeverConfig(kinetic=0.01, jacobian=0.01),
    )
    model = testbed.build(config)
    policies = [solver.policy for solver in gated_solvers(model)]
    assert all(isinstance(p, LadderPolicy) for p in policies) and policies[0] is not policies[1]
    assert all(p.setting == SolverSetting("dopri5", 1e-5) for p in policies)
    summary = testbed.run_testbed(config, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    ladder = solver_ladder(config.tolerance)
    assert all(len(entry["rungs"]) == 2 for entry in log)
    assert max(max(entry["rungs"]) for entry in log) > ladder.index(SolverSetting("dopri5", 1e-5))  # it moved
    assert len(summary["final_settings"]) == 2
    assert all(SolverSetting.parse(s) in ladder.settings for s in summary["final_settings"])
    assert summary["probe_nfe_equivalent"] > 0
    rungs = [entry["setting"] for entry in summary["ladder_evaluation"]]
    assert rungs == [str(s) for s in EVALUATION_LADDER]
    at_eval = summary["ladder_evaluation"][0]
    assert at_eval["setting"] == "dopri5:1e-05" and at_eval["quality"] == pytest.approx(summary["test_nll"])


def test_cheapest_honest_takes_the_fewest_evaluations_within_the_bound() -> None:
    reference = RungEvaluation("dopri5:1e-05", 3.00, 56)
    rungs = [
        reference,
        RungEvaluation("dopri5:0.001", 3.005, 26),
        RungEvaluation("rk4:2", 3.019, 8),
        RungEvaluation("rk4:1", 3.5, 4),
    ]
    assert cheapest_honest(rungs, reference, 0.02).setting == "rk4:2"
    assert cheapest_honest(rungs, reference, 0.01).setting == "dopri5:0.001"
    assert cheapest_honest(rungs[:1], reference, 0.0) == reference
    flattering = [reference, RungEvaluation("rk4:1", 1.06, 4)]  # a discretisation the model learned
    assert cheapest_honest(flattering, reference, 0.02) == reference


def test_command_line_trains_with_a_given_ladder_and_stores_it(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    main(
        [
            "--dataset", "digits", "--model", "infocnf", "--tolerance", "auto", "--ladder", "dopri5:1e-5",
            "dopri5:1e-3", "rk4:2", "rk4:1", "--batch-size", "16", "--hidden", "4", "--n-flows", "1",
            "--epochs", "1", "--max-train-batches", "3", "--max-eval-batches", "1", "--eval-batch-size", "32",
            "--probe-every", "1", "--probe-size", "8", "--no-progress", "--out", str(out),
        ]
    )  # fmt: skip
    stored = json.loads((out / "config.json").read_text())
    assert stored["tolerance"]["mode"] == "auto"
    assert stored["tolerance"]["ladder"] == ["dopri5:1e-5", "dopri5:1e-3", "rk4:2", "rk4:1"]
    train = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["train"]
    ladder = SolverLadder([SolverSetting.parse(s) for s in stored["tolerance"]["ladder"]])
    assert all(SolverSetting.parse(s) in ladder.settings for s in train["settings_per_block"])
    assert train["probe_nfe_equivalent"] > 0


def _summary(bpd: float, forward: float, backward: float, probes: float = 0.0) -> dict:
    return {
        "selected": {"test": {"bpd_cond": bpd}},
        "train_nfe_forward_mean": forward,
        "train_nfe_backward_mean": backward,
        "train_probe_nfe_equivalent_mean": probes,
    }


def test_main_job_last_line_names_the_cheapest_equal_quality_row_without_a_hand_set_knob() -> None:
    from tolgate_flows.cli import COMPARISON, HAND_SET
    from tolgate_flows.report import cheapest_verdict

    names = [name for name, _ in COMPARISON]
    assert {"infocnf-rnode-rk4-h1", "infocnf-auto", "infocnf-auto-rnode"} <= set(names)
    assert HAND_SET <= set(names)
    rows = {
        "infocnf-fixed": _summary(2.30, 70.0, 68.0),
        "infocnf-auto": _summary(2.305, 20.0, 20.0, 2.0),  # 42, within 0.01
        "infocnf-auto-rnode": _summary(2.32, 12.0, 12.0, 1.0),  # cheaper but 0.02 worse
        "infocnf-rnode-rk4-h1": _summary(2.29, 12.0, 12.0),  # cheapest, but hand-set
    }
    line = cheapest_verdict(
        rows, candidates=["infocnf-fixed", "infocnf-auto", "infocnf-auto-rnode"], reference="infocnf-fixed"
    )
    assert "infocnf-auto," in line and "42.0 evaluations" in line and "3.29x fewer" in line
    none = cheapest_verdict({"r": _summary(2.3, 1, 1), "c": _summary(2.5, 1, 1)}, candidates=["c"], reference="r")
    assert none.startswith("No row")


def test_auto_learned_puts_a_gate_on_every_block_in_its_own_optimiser_group(tmp_path) -> None:
    from tolgate import LadderGate
    from tolgate_flows.tolerance import make_optimizer

    config = testbed.TestbedConfig(
        testbed="8gaussians",
        n_blocks=2,
        hidden=8,
        batch=64,
        iterations=4,
        eval_size=100,
        grid_points=20,
        log_every=2,
        tolerance=ToleranceConfig(mode="auto-learned", probe_every=2, probe_size=16),
    )
    model = testbed.build(config)
    gates = [solver.policy for solver in gated_solvers(model)]
    assert all(isinstance(g, LadderGate) for g in gates)
    groups = make_optimizer(model, lr=1e-3, gate_lr=0.5).param_groups
    assert groups[1]["lr"] == 0.5 and {id(p) for p in groups[1]["params"]} == {
        id(p) for g in gates for p in g.parameters()
    }
    summary = testbed.run_testbed(config, tmp_path)
    assert summary["probe_nfe_equivalent"] > 0 and len(summary["final_settings"]) == 2
