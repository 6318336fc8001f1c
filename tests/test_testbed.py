"""The fast testbeds: toy samplers follow their formulas and seeds, a vector flow's density
integrates to one, runs share their data and initial flow across arms, run_testbed writes its
summary, and the report picks the best fixed tolerance as defined."""

from __future__ import annotations

import json
import math

import pytest
import torch

from studies.testbed_report import build_report
from tolgate import FixedTolerance, MLPGate
from tolgate_flows import testbed
from tolgate_flows.data import TESTBEDS, checkerboard, eight_gaussians, labelled_pinwheel, toy_data
from tolgate_flows.tolerance import ToleranceConfig, policy_factory
from tolgate_flows.vector_flows import VectorFlowConfig, build_vector_flow, density_integral


@pytest.mark.parametrize("name", TESTBEDS)
def test_testbeds_are_seeded_and_shaped(name: str) -> None:
    data = toy_data(name)
    x, y = data.sample(500, 7)
    x_again, y_again = data.sample(500, torch.Generator().manual_seed(7))
    assert x.shape == (500, data.dim) and x.dtype == torch.float32
    assert torch.equal(x, x_again)
    assert not torch.equal(x, data.sample(500, 8)[0])
    low, high = data.box
    assert bool(((x > low / 2) & (x < high / 2)).all())  # the box is twice as wide as the data
    if data.labelled:
        assert y.dtype == torch.int64 and y.shape == (500,) and torch.equal(y, y_again)
        assert set(y.tolist()) == set(range(data.n_classes))
    else:
        assert y is None


def test_checkerboard_lies_on_the_dark_squares() -> None:
    x = checkerboard(4000, 0)
    cells = torch.floor(x / 2)  # squares of side 2
    assert bool(((cells.sum(dim=1) % 2) == 0).all())
    assert x.abs().max() <= 4.0


def test_eight_gaussians_sit_on_the_circle_with_their_std() -> None:
    x = eight_gaussians(20000, 0).double()
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centers = 4.0 / 1.414 * torch.stack([angles.cos(), angles.sin()], dim=1)
    nearest = torch.cdist(x, centers).argmin(dim=1)
    residual = x - centers[nearest]
    assert residual.std(dim=0).sub(0.5 / 1.414).abs().max() < 0.01
    assert nearest.bincount(minlength=8).min() > 2000


def test_pinwheel_arms_are_rotations_of_each_other() -> None:
    x, y = labelled_pinwheel(20000, 0)
    means = torch.stack([x[y == k].double().mean(dim=0) for k in range(5)])
    angles = torch.atan2(means[:, 1], means[:, 0])
    steps = torch.remainder(angles.diff(), 2 * math.pi)
    # arm k is arm 0 turned by 2 pi k / 5 (clockwise in FFJORD's row-vector convention)
    assert torch.allclose(steps, torch.full_like(steps, 2 * math.pi - 2 * math.pi / 5), atol=0.03)
    assert torch.allclose(means.norm(dim=1), means.norm(dim=1).mean().expand(5), rtol=0.02)


@pytest.mark.parametrize(("kind", "dim"), [("cnf", 1), ("cnf", 2), ("infocnf", 2)])
def test_vector_flow_density_integrates_to_one(kind: str, dim: int) -> None:
    torch.manual_seed(0)
    config = VectorFlowConfig(kind=kind, dim=dim, n_classes=0 if kind == "cnf" else 3, hidden=16)
    factory = policy_factory(ToleranceConfig(), gate_net=lambda size: MLPGate(size))
    model = build_vector_flow(config, factory, eval_policy=FixedTolerance(1e-8)).double().eval()
    if model.conditional:  # classes of different means and scales: p(x) is a true mixture
        with torch.no_grad():
            model.prior.encoder.weight.normal_(std=0.3)
    grid = torch.linspace(-3, 3, 7, dtype=torch.float64)
    points = grid.reshape(-1, 1) if dim == 1 else torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        assert float(model.encode(points)[1].abs().max()) > 0.02  # the flow is not the identity
    integral = density_integral(model, -8.0, 8.0, 1000 if dim == 1 else 60)
    assert integral == pytest.approx(1.0, abs=1e-4)


def small_config(**overrides) -> testbed.TestbedConfig:
    settings = {
        "testbed": "pinwheel-classes",
        "kind": "infocnf",
        "hidden": 8,
        "batch": 64,
        "iterations": 5,
        "eval_size": 100,
        "grid_points": 30,
        "log_every": 2,
    }
    return testbed.TestbedConfig(**{**settings, **overrides})


def test_arms_of_one_seed_share_batches_and_initial_flow() -> None:
    fixed = small_config(tolerance=ToleranceConfig(mode="fixed", train_tol=1e-3))
    learned = small_config(tolerance=ToleranceConfig(mode="learned"))
    x0, y0 = testbed.batch_at(fixed, 3)
    x1, y1 = testbed.batch_at(learned, 3)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(x0, testbed.batch_at(fixed, 4)[0])
    assert not torch.equal(x0, testbed.batch_at(small_config(seed=1), 3)[0])
    assert torch.equal(testbed.held_out_set(fixed)[0], testbed.held_out_set(small_config(seed=1))[0])
    fields = [{k: v for k, v in testbed.build(c).state_dict().items() if ".odefunc." in k} for c in (fixed, learned)]
    assert fields[0].keys() == fields[1].keys() and fields[0]
    assert all(torch.equal(fields[0][k], fields[1][k]) for k in fields[0])


SUMMARY_KEYS = {
    "nfe_forward",
    "nfe_backward",
    "probe_nfe_equivalent",
    "nfe_total",
    "final_log10_tolerance",
    "final_train_nll",
    "test_nll",
    "test_nll_marginal",
    "test_error",
    "test_nll_at_used_tol",
    "integral_at_used_tol",
    "integral_at_eval_tol",
    "seconds_per_iteration",
    "final_settings",
    "ladder_evaluation",
    "config",
}


@pytest.mark.parametrize(
    "tolerance",
    [
        ToleranceConfig(mode="fixed", train_tol=1e-4),
        ToleranceConfig(mode="adaptive", probe_every=2, probe_size=32),
        ToleranceConfig(mode="learned", estimator="probe", probe_every=2, probe_size=32),
        ToleranceConfig(mode="auto", probe_every=2, probe_size=32),
    ],
    ids=["fixed", "adaptive", "learned-probe", "auto"],
)
def test_run_testbed_writes_its_summary(tmp_path, tolerance: ToleranceConfig) -> None:
    config = small_config(tolerance=tolerance)
    summary = testbed.run_testbed(config, tmp_path)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= written.keys() and written["test_nll"] == summary["test_nll"]
    assert testbed.TestbedConfig.from_dict(written["config"]) == config
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["iteration"] for entry in log] == [2, 4, 5]
    assert len(summary["final_log10_tolerance"]) == config.n_blocks
    assert summary["nfe_total"] == pytest.approx(summary["nfe_forward"] + summary["probe_nfe_equivalent"])
    assert (summary["probe_nfe_equivalent"] > 0) == tolerance.probes
    assert 0.0 <= summary["test_error"] <= 1.0
    assert abs(summary["integral_at_eval_tol"] - 1.0) < 0.05
    if tolerance.mode == "fixed":
        assert summary["final_log10_tolerance"] == pytest.approx([-4.0, -4.0])


def fake_run(arm_tol: float | None, seed: int, nll: float, nfe: float, mode: str = "fixed") -> dict:
    metrics = dict.fromkeys(("nfe_backward", "probe_nfe_equivalent", "final_train_nll", "test_nll_marginal"), 0.0)
    metrics.update(dict.fromkeys(("test_error", "test_nll_at_used_tol", "seconds_per_iteration"), 0.0))
    metrics.update(dict.fromkeys(("integral_at_used_tol", "integral_at_eval_tol"), 1.0))
    tolerance = {"mode": mode, "train_tol": arm_tol or 1e-5}
    return {
        **metrics,
        "seed": seed,
        "test_nll": nll,
        "nfe_forward": nfe,
        "nfe_total": nfe,
        "final_log10_tolerance": [-3.0],
        "config": {"tolerance": tolerance},
    }


def test_best_fixed_is_the_loosest_within_the_margin_of_1e_5() -> None:
    runs = {
        "fixed-1e-5": [fake_run(1e-5, s, 2.00 + 0.001 * s, 100) for s in range(3)],
        "fixed-1e-4": [fake_run(1e-4, s, 2.01, 80) for s in range(3)],
        "fixed-1e-3": [fake_run(1e-3, s, 2.015, 60) for s in range(3)],
        "fixed-1e-2": [fake_run(1e-2, s, 2.10, 40) for s in range(3)],  # 0.1 nats worse: out
        "learned-probe": [fake_run(None, s, 2.0, 30, mode="learned") for s in range(3)],
    }
    report = build_report({"toy": runs})["toy"]
    assert report["best_fixed"]["arm"] == "fixed-1e-3"
    assert report["best_fixed"]["margin_nats"] == pytest.approx(0.02)
    ratios = report["ratios"]["learned-probe"]
    assert ratios["nfe_total_vs_best_fixed"] == pytest.approx(0.5)
    assert ratios["nfe_total_vs_reference"] == pytest.approx(0.3)
    assert report["arms"]["fixed-1e-5"]["test_nll"]["std"] == pytest.approx(0.001)
    paired = report["paired_test_nll_vs_reference"]["fixed-1e-4"]
    assert paired["mean"] == pytest.approx(0.009) and paired["std"] == pytest.approx(0.001)


def test_an_arm_with_levers_is_compared_not_taken_as_a_fixed_baseline() -> None:
    """An RNODE arm runs in tolerance mode 'fixed' (rk4 has no tolerance), yet it is a policy to
    compare with the fixed tolerances, never one of them."""
    rnode = [fake_run(1e-5, s, 2.0, 20) for s in range(2)]
    for summary in rnode:
        summary["config"]["levers"] = {"kinetic": 0.01, "jacobian": 0.01, "train_method": "rk4", "steer": 0.0}
    runs = {"fixed-1e-5": [fake_run(1e-5, s, 2.0, 100) for s in range(2)], "rnode": rnode}
    report = build_report({"toy": runs})["toy"]
    assert report["best_fixed"]["arm"] == "fixed-1e-5"
    assert report["arms"]["rnode"]["levers"] == {"kinetic": 0.01, "jacobian": 0.01, "train_method": "rk4"}
    assert report["arms"]["fixed-1e-5"]["levers"] == {}
    assert report["ratios"]["rnode"]["nfe_total_vs_best_fixed"] == pytest.approx(0.2)
