"""The levers (tolgate_flows.levers): RNODE's integrals against closed forms and quadrature, their
gradients by finite differences, STEER's end times, the fixed-grid training protocol (its NFE
identity, evaluation with dopri5 at the fixed tolerance), the loss term, validation, and both
entry points (testbed runner and the image training command line).

Linear fields ``f(z) = A z`` have ``z(t) = expm(t A) z0`` and a constant Jacobian ``A``, so the
integrals have closed forms (kinetic: a Gauss-Legendre quadrature of a smooth integrand, exact to
rounding). Float64 wherever a solve is compared with such a number.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

from tolgate import FixedStepSize, FixedTolerance, GatedSolver, MLPGate, SolveRecord, collect_records, gated_solvers
from tolgate_flows import testbed
from tolgate_flows.checkpoints import resume_conflicts
from tolgate_flows.cli import config_from_args, parser
from tolgate_flows.cnf import CNFBlock, Regularisers
from tolgate_flows.levers import (
    LEVER_FIELDS,
    PENALTIES,
    TRAIN_METHODS,
    LeverConfig,
    check_compatible,
    with_penalties,
)
from tolgate_flows.models import ModelConfig, build_model
from tolgate_flows.tolerance import ToleranceConfig, policy_factory
from tolgate_flows.train import TrainConfig
from tolgate_flows.vector_flows import VectorFlowConfig, build_vector_flow

MATRIX = torch.tensor([[0.3, 1.2, -0.7], [-0.4, 0.1, 0.9], [0.8, -1.1, -0.2]], dtype=torch.float64)
DIM = 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LinearField(nn.Module):
    """``f(t, z) = A z`` (rows: ``z @ A.T``); ``matrix`` may be a plain tensor (for gradcheck)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = matrix

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.matrix.T


class TanhField(nn.Module):
    """``f(t, z) = (1 + t) tanh(W z)``: non-linear, time-dependent, weight given as a tensor."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (1 + t) * torch.tanh(z @ self.weight.T)


def rk4_solver() -> GatedSolver:
    return GatedSolver(FixedStepSize(0.25), method="rk4")


def tight_solver(backend: str = "torchdiffeq") -> GatedSolver:
    return GatedSolver(FixedTolerance(1e-10), max_num_steps=5000, backend=backend)


def gauss_legendre(integrand, nodes: int = 40) -> torch.Tensor:
    """``int_0^1 integrand(t) dt``; ``integrand`` maps a float to a tensor."""
    points, weights = np.polynomial.legendre.leggauss(nodes)
    return sum(w / 2 * integrand((p + 1) / 2) for p, w in zip(points, weights, strict=True))


def all_signs(dim: int) -> torch.Tensor:
    """Every Rademacher vector of ``dim`` entries, ``(2**dim, dim)``."""
    return torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * dim)


# --- the integrals ---------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_kinetic_integral_matches_quadrature_of_the_linear_flow(reverse: bool) -> None:
    """K = int_0^1 1/2 ||A z(t)||^2 / D dt with z(t) = expm(t A) z0 (from 1 down to 0 when
    reversed: z(t) = expm((t - 1) A) z0), to 1e-8 relative; the exact Frobenius term is the
    constant ||A||_F^2 / D."""
    z0 = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    block = CNFBlock(LinearField(MATRIX), tight_solver(), "exact", kinetic=True, jacobian=True)
    with torch.no_grad():
        out = block.solve(z0, reverse=reverse)
    shift = -1.0 if reverse else 0.0

    def integrand(t: float) -> torch.Tensor:
        z = z0 @ torch.linalg.matrix_exp((t + shift) * MATRIX).T
        return 0.5 * (z @ MATRIX.T).square().sum(dim=1) / DIM

    torch.testing.assert_close(out.regularisers.kinetic, gauss_legendre(integrand), rtol=1e-8, atol=0)
    frobenius = MATRIX.square().sum() / DIM
    torch.testing.assert_close(out.regularisers.jacobian, frobenius.expand(5), rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", ["torchdiffeq", "per_sample"])
def test_jacobian_term_uses_the_solves_own_hutchinson_noise(backend: str) -> None:
    """For f = A z and the solve's Rademacher draw e: the trace gives -e^T A e and the Jacobian
    term ||A^T e||^2 / D = e^T A A^T e / D, both with the same e (per sample, on either backend:
    noise[idx] follows each row). Over all 2^D sign vectors its mean is ||A||_F^2 / D exactly."""
    noise = all_signs(DIM)
    block = CNFBlock(LinearField(MATRIX), tight_solver(backend), "hutchinson", "rademacher", jacobian=True)
    block._draw_noise = lambda z: noise
    with torch.no_grad():
        out = block.solve(torch.randn(len(noise), DIM, dtype=torch.float64))
    expected_trace = torch.einsum("ki,ij,kj->k", noise, MATRIX, noise)
    expected_frobenius = torch.einsum("ki,ij,lj,kl->k", noise, MATRIX, MATRIX, noise) / DIM
    torch.testing.assert_close(out.logp, -expected_trace, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.regularisers.jacobian, expected_frobenius, rtol=1e-8, atol=1e-10)
    assert float(out.regularisers.jacobian.mean()) == pytest.approx(float(MATRIX.square().sum()) / DIM, rel=1e-8)
    assert out.regularisers.kinetic is None


def test_hutchinson_jacobian_term_averages_to_the_exact_one() -> None:
    """A non-linear field, one fixed trajectory (rk4 grid, the same z for every row): the mean of
    the Hutchinson term over 4000 Gaussian draws is the exact Frobenius integral, within 4
    standard errors."""
    torch.manual_seed(3)
    weight = torch.randn(DIM, DIM, dtype=torch.float64)
    z0 = torch.randn(1, DIM, dtype=torch.float64).expand(4000, DIM)
    exact = CNFBlock(TanhField(weight), rk4_solver(), "exact", jacobian=True)
    estimate = CNFBlock(TanhField(weight), rk4_solver(), "hutchinson", "gaussian", jacobian=True)
    with torch.no_grad():
        reference = exact.solve(z0[:1]).regularisers.jacobian
        draws = estimate.solve(z0).regularisers.jacobian
    standard_error = float(draws.std()) / math.sqrt(draws.numel())
    assert standard_error > 1e-4  # the draws really differ
    assert float(draws.mean()) == pytest.approx(float(reference), abs=4 * standard_error)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_penalty_gradients_match_finite_differences(divergence: str) -> None:
    """gradcheck (float64) of both integrals with respect to the field's weight and the initial
    state, on rk4's fixed grid (the steps do not move with the inputs); the noise is held fixed."""
    noise = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)

    def integrals(weight: torch.Tensor, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = CNFBlock(TanhField(weight), rk4_solver(), divergence, kinetic=True, jacobian=True)
        block._draw_noise = lambda z: noise
        out = block.solve(z0)
        return out.regularisers.kinetic, out.regularisers.jacobian

    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(2, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(3, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(integrals, (weight, z0))


def test_without_levers_the_state_stays_z_logp() -> None:
    """No lever: the solver sees the two-tensor state and the output carries no integrals; with
    levers in eval mode the same (so evaluation NFE do not depend on the levers)."""
    states = []

    class Watching(GatedSolver):
        def forward(self, func, y0, t, *args, **kwargs):
            states.append(len(y0))
            return super().forward(func, y0, t, *args, **kwargs)

    z = torch.randn(4, DIM, dtype=torch.float64)
    plain = CNFBlock(LinearField(MATRIX), Watching(FixedTolerance(1e-6)), "exact")
    assert plain.solve(z).regularisers == Regularisers()
    levered = CNFBlock(LinearField(MATRIX), Watching(FixedTolerance(1e-6)), "exact", kinetic=True, jacobian=True)
    levered.solve(z)
    levered.eval()
    evaluated = levered.solve(z)
    assert states == [2, 4, 2]
    assert evaluated.regularisers == Regularisers()


# --- STEER -----------------------------------------------------------------------------------


def test_steer_draws_end_times_in_its_range_and_evaluates_at_one() -> None:
    block = CNFBlock(LinearField(MATRIX), GatedSolver(FixedTolerance(1e-4), max_records=None), "exact", steer=0.4)
    z = torch.randn(4, DIM, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            block(z)
    ends = [record.t_reached for record in block.solver.records]
    assert all(0.6 <= end <= 1.4 for end in ends)
    assert max(ends) - min(ends) > 0.3  # really drawn, not fixed
    block.eval()
    with torch.no_grad():
        block(z)
        _, logp_eval = block(z)
    assert block.solver.records[-1].t_reached == 1.0
    assert block.solver.records[-2].t_reached == 1.0
    # T = 1 exactly: the same as a block without STEER
    plain = CNFBlock(LinearField(MATRIX), GatedSolver(FixedTolerance(1e-4)), "exact").eval()
    with torch.no_grad():
        assert torch.equal(plain(z)[1], logp_eval)


def test_steer_is_validated() -> None:
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="steer"):
            CNFBlock(LinearField(MATRIX), GatedSolver(FixedTolerance(1e-4)), "exact", steer=bad)


# --- fixed-grid training, evaluation with dopri5 -------------------------------------------------


def vector_model(levers: LeverConfig, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = VectorFlowConfig(dim=2, hidden=8, levers=levers, **overrides)
    factory = policy_factory(ToleranceConfig(train_tol=1e-3), gate_net=lambda size: MLPGate(size))
    return build_vector_flow(config, factory, eval_policy=FixedTolerance(1e-6)).double()


def test_rk4_training_nfe_identity_and_dopri5_evaluation_at_the_eval_tolerance() -> None:
    """rk4 at h = 0.25 over [0, 1]: 4 steps of 4 evaluations, 16 forward NFE per block, and one VJP
    per evaluation backwards. Eval mode: dopri5 at the fixed 1e-6, NFE = 2 + 6 steps."""
    model = vector_model(LeverConfig(train_method="rk4", train_step_size=0.25))
    x = torch.randn(32, 2, dtype=torch.float64)
    model.train()
    with collect_records(model) as records:
        out = model(x)
    (-out.log_px.mean()).backward()
    assert [(r.method, r.step_size, r.rtol) for r in records] == [("rk4", 0.25, None)] * 2
    assert [r.nfe_forward for r in records] == [16, 16]
    assert [r.nfe_backward for r in records] == [16, 16]
    model.eval()
    with torch.no_grad(), collect_records(model) as records:
        model(x)
    assert [(r.method, r.rtol, r.atol, r.step_size) for r in records] == [("dopri5", 1e-6, 1e-6, None)] * 2
    assert all(r.nfe_forward == 2 + 6 * r.n_steps for r in records)


def test_image_model_trains_on_the_grid_and_evaluates_with_its_method() -> None:
    levers = LeverConfig(train_method="rk4", train_step_size=0.5)
    config = ModelConfig(kind="cnf", image_shape=(1, 4, 4), n_scales=1, n_flows=1, hidden=4, levers=levers)
    model = build_model(config, lambda i, c: FixedTolerance(1e-3), eval_policy=FixedTolerance(1e-5))
    solvers = list(gated_solvers(model))
    assert [(s.method, s.eval_method, type(s.policy)) for s in solvers] == [("rk4", "dopri5", FixedStepSize)]
    x = torch.rand(2, 1, 4, 4)
    with collect_records(model) as records:
        model(x, None)
    assert records[0].nfe_forward == 8  # 2 steps of 4 evaluations
    model.eval()
    with torch.no_grad(), collect_records(model) as records:
        model(x, None)
    assert (records[0].method, records[0].rtol) == ("dopri5", 1e-5)


def test_solver_penalties_reach_the_loss_and_evaluation_ignores_them() -> None:
    levers = LeverConfig(kinetic=0.1, jacobian=0.2, local_error=0.3, stiffness=0.4, steer=0.2)
    model = vector_model(levers)
    x = torch.randn(16, 2, dtype=torch.float64)
    with collect_records(model) as records:
        out = model(x)
    loss = -out.log_px.mean()
    total, values = with_penalties(loss, levers, out.regularisers, records)
    assert all(r.local_error is not None and r.stiffness is not None for r in records)
    expected = (
        loss
        + 0.1 * out.regularisers.kinetic.mean()
        + 0.2 * out.regularisers.jacobian.mean()
        + 0.3 * sum(r.local_error for r in records)
        + 0.4 * sum(r.stiffness for r in records)
    )
    torch.testing.assert_close(total, expected)
    assert all(isinstance(v, float) and v > 0 for v in values.as_dict().values())
    total.backward()
    assert all(p.grad is not None for p in model.blocks[0].odefunc.parameters())
    # evaluation: the same weights without levers give the very same numbers
    model.eval()
    plain = vector_model(LeverConfig()).eval()
    with torch.no_grad():
        assert torch.equal(model(x).log_px, plain(x).log_px)


# --- the loss term -----------------------------------------------------------------------------


def test_with_penalties_weights_each_value_and_averages_per_sample_ones() -> None:
    loss = torch.tensor(1.0, dtype=torch.float64)
    regularisers = Regularisers(kinetic=torch.tensor([1.0, 3.0]), jacobian=torch.tensor([2.0, 2.0]))
    records = [SolveRecord("dopri5", False, 1e-3, 1e-3) for _ in range(2)]
    records[0].local_error, records[0].stiffness = torch.tensor(0.5), torch.tensor(1.0)
    records[1].local_error, records[1].stiffness = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])  # per sample
    levers = LeverConfig(kinetic=0.1, jacobian=0.01, local_error=1.0, stiffness=2.0)
    total, values = with_penalties(loss, levers, regularisers, records)
    assert values.as_dict() == {"kinetic": 2.0, "jacobian": 2.0, "local_error": 2.0, "stiffness": 5.0}
    assert float(total) == pytest.approx(1.0 + 0.2 + 0.02 + 2.0 + 10.0)
    untouched, nothing = with_penalties(loss, LeverConfig(), Regularisers(), [])
    assert untouched is loss and nothing.as_dict() == dict.fromkeys(PENALTIES)


def test_with_penalties_refuses_a_weighted_penalty_nobody_computed() -> None:
    loss = torch.tensor(0.0)
    with pytest.raises(ValueError, match="kinetic"):
        with_penalties(loss, LeverConfig(kinetic=0.1), Regularisers(), [])
    record = SolveRecord("rk4", False, None, None)
    with pytest.raises(ValueError, match="record.stiffness"):
        with_penalties(loss, LeverConfig(stiffness=0.1), Regularisers(), [record])


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(kinetic=-0.1), "kinetic"),
        (dict(jacobian=math.nan), "jacobian"),
        (dict(local_error=math.inf), "local_error"),
        (dict(stiffness=True), "stiffness"),
        (dict(steer=1.0), "steer"),
        (dict(steer=-0.5), "steer"),
        (dict(train_method="dopri5"), "adaptive"),
        (dict(train_method="leapfrog"), "train_method"),
        (dict(train_method="implicit_adams"), "corrector"),
        (dict(train_step_size=0.0), "train_step_size"),
        (dict(train_step_size=-0.25), "train_step_size"),
    ],
)
def test_lever_config_refuses_bad_values(settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LeverConfig(**settings)


def test_levers_refuse_what_the_run_cannot_honour() -> None:
    rk4 = LeverConfig(train_method="rk4")
    with pytest.raises(ValueError, match="tolerance mode 'fixed'"):
        check_compatible(rk4, adjoint=False, per_sample=False, tolerance_mode="learned")
    with pytest.raises(ValueError, match="per-sample"):
        check_compatible(rk4, adjoint=False, per_sample=True)
    with pytest.raises(ValueError, match="adjoint"):
        check_compatible(LeverConfig(local_error=0.1), adjoint=True, per_sample=False)
    with pytest.raises(ValueError, match="fixed grid"):
        check_compatible(LeverConfig(stiffness=0.1, train_method="rk4"), adjoint=False, per_sample=False)
    check_compatible(LeverConfig(kinetic=0.1, jacobian=0.1, steer=0.5), adjoint=True, per_sample=True)
    # the entry points apply the same checks
    with pytest.raises(ValueError, match="tolerance mode 'fixed'"):
        TrainConfig.from_settings(train_method="rk4", tolerance="learned")
    with pytest.raises(ValueError, match="adjoint"):
        TrainConfig.from_settings(local_error=0.1, adjoint=True)
    with pytest.raises(ValueError, match="steer"):
        TrainConfig.from_settings(steer=2.0)
    with pytest.raises(ValueError, match="adjoint"):
        testbed.TestbedConfig(levers=LeverConfig(stiffness=1.0), adjoint=True)
    with pytest.raises(ValueError, match="seminorm"):
        testbed.TestbedConfig(seminorm=True)


# --- the entry points --------------------------------------------------------------------------


def small_testbed(**overrides) -> testbed.TestbedConfig:
    settings = dict(testbed="8gaussians", hidden=8, batch=32, iterations=3, eval_size=64, grid_points=20, log_every=2)
    return testbed.TestbedConfig(**{**settings, **overrides})


def test_testbed_trains_rk4_with_rnode_and_reports_the_penalties(tmp_path) -> None:
    config = small_testbed(levers=LeverConfig(kinetic=0.01, jacobian=0.01, train_method="rk4"))
    summary = testbed.run_testbed(config, tmp_path)
    assert summary["nfe_forward"] == 16 * config.n_blocks and summary["nfe_backward"] == 16 * config.n_blocks
    penalties = summary["penalties"]
    assert penalties["kinetic"] > 0 and penalties["jacobian"] > 0
    assert penalties["local_error"] is None and penalties["stiffness"] is None
    assert summary["test_nll_at_used_tol"] is None and summary["final_log10_tolerance"] == [None, None]
    assert summary["test_nfe_forward"] > 0 and math.isfinite(summary["test_nll"])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(entry["kinetic"] > 0 and entry["local_error"] is None for entry in log)
    assert testbed.TestbedConfig.from_dict(json.loads((tmp_path / "summary.json").read_text())["config"]) == config


def test_testbed_solver_penalties_and_seminorm_adjoint(tmp_path) -> None:
    config = small_testbed(iterations=2, levers=LeverConfig(local_error=0.1, stiffness=0.01, steer=0.3))
    summary = testbed.run_testbed(config, tmp_path / "penalties")
    assert summary["penalties"]["local_error"] > 0 and summary["penalties"]["stiffness"] > 0
    adjoint = small_testbed(iterations=2, adjoint=True, seminorm=True, levers=LeverConfig(kinetic=0.01))
    model = testbed.build(adjoint)
    assert all(s.adjoint and s.adjoint_options["norm"] == "seminorm" for s in gated_solvers(model))
    summary = testbed.run_testbed(adjoint, tmp_path / "adjoint")
    assert summary["nfe_backward"] > 0 and summary["penalties"]["kinetic"] > 0


LEVER_FLAGS = [
    "--kinetic",
    "0.01",
    "--jacobian",
    "0.03",
    "--steer",
    "0.5",
    "--train-method",
    "rk4",
    "--train-step-size",
    "0.125",
]


def test_every_lever_is_a_flag_with_its_default_in_the_help() -> None:
    text = " ".join(parser().format_help().split())
    for name in LEVER_FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert getattr(TrainConfig().levers, name) == getattr(LeverConfig(), name), name
    assert "(default: 0.25)" in text and "(default: off, train with --method)" in text
    actions = {flag: action for action in parser()._actions for flag in action.option_strings}
    assert tuple(actions["--train-method"].choices) == TRAIN_METHODS


def test_lever_flags_reach_the_config_and_round_trip_through_config_json(tmp_path) -> None:
    config = config_from_args(parser().parse_args([*LEVER_FLAGS, "--out", str(tmp_path)]))
    expected = LeverConfig(kinetic=0.01, jacobian=0.03, steer=0.5, train_method="rk4", train_step_size=0.125)
    assert config.levers == expected
    penalties = config_from_args(parser().parse_args(["--local-error", "0.2", "--stiffness", "0.1"]))
    assert (penalties.levers.local_error, penalties.levers.stiffness) == (0.2, 0.1)
    (tmp_path / "config.json").write_text(json.dumps(asdict(config)))
    resumed = config_from_args(parser().parse_args(["--resume", "--out", str(tmp_path)]))
    assert resumed == config
    # a lever changed on resume is refused; a configuration written before the levers existed resumes
    assert any("--kinetic" in p for p in resume_conflicts(config.settings(), resumed.settings() | {"kinetic": 0.5}, 1))
    old = {k: v for k, v in TrainConfig(out=str(tmp_path)).settings().items() if k not in LEVER_FIELDS}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert config_from_args(parser().parse_args(["--resume", "--out", str(tmp_path)])).levers == LeverConfig()
