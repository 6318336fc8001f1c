"""REINFORCE (Eq. 6-7): returns by hand, an unbiased gradient, and a gate that really learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tolgate import (
    FixedTolerance,
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


def record(nfe_forward: float, nfe_backward: int = 0, log_prob: torch.Tensor | None = None, **kw) -> SolveRecord:
    return SolveRecord(
        method="dopri5",
        adjoint=False,
        rtol=1e-5,
        atol=1e-5,
        nfe_forward=nfe_forward,
        nfe_backward=nfe_backward,
        log_prob=log_prob,
        **kw,
    )


class ConstantNet(nn.Module):
    """Gate network with one learnable ``(mu offset, log-sigma offset)`` row for every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw.expand(x.shape[0], 2)


# ---------------------------------------------------------------- Eq. 7 by hand


def test_cumulative_returns_match_eq7_by_hand() -> None:
    # N = 3 solves, NFE 10, 20, 40, L = 2, alpha = 0.3: alpha/N = 0.1 and
    # r_i = -(L - alpha/N * sum_{j>=i} R_j) = -(L + 0.1 * sum_{j>=i} NFE_j).
    records = [record(10), record(20), record(40)]
    loss = torch.tensor(2.0, requires_grad=True)
    returns = cumulative_returns(loss, solve_rewards(records), alpha=0.3)
    assert returns.tolist() == pytest.approx([-(2 + 0.1 * 70), -(2 + 0.1 * 60), -(2 + 0.1 * 40)])
    assert not returns.requires_grad  # the task loss enters as a number


def test_backward_nfe_and_scale_enter_rewards_only_when_asked() -> None:
    records = [record(10, nfe_backward=30), record(20, nfe_backward=50)]
    assert [float(r) for r in solve_rewards(records)] == [-10.0, -20.0]
    assert [float(r) for r in solve_rewards(records, include_backward=True)] == [-40.0, -70.0]
    assert [float(r) for r in solve_rewards(records, nfe_scale=10.0)] == [-1.0, -2.0]
    with pytest.raises(ValueError, match="nfe_scale"):
        solve_rewards(records, nfe_scale=0.0)


def test_alpha_means_the_same_for_2_and_16_solves() -> None:
    # alpha/N * sum_j NFE_j = alpha * mean NFE: the first return depends on the mean cost, not on N.
    for n in (2, 16):
        returns = cumulative_returns(torch.tensor(0.0), solve_rewards([record(30)] * n), alpha=0.5)
        assert float(returns[0]) == pytest.approx(-0.5 * 30)


def test_per_sample_rewards_give_per_sample_returns() -> None:
    records = [record(0, nfe_per_sample=torch.tensor([10.0, 20.0])), record(6)]
    returns = cumulative_returns(torch.tensor(1.0), solve_rewards(records), alpha=2.0)
    # alpha/N = 1: r_1 = -(1 + [10, 20] + 6), r_2 = -(1 + 6) broadcast over the batch.
    assert returns.tolist() == [[-17.0, -27.0], [-7.0, -7.0]]


def test_surrogate_value_and_gradient_by_hand() -> None:
    log_probs = [torch.tensor(-1.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)]
    records = [record(10, log_prob=log_probs[0]), record(30, log_prob=log_probs[1])]
    loss = reinforce_loss(records, torch.tensor(1.0), alpha=1.0)
    # alpha/N = 0.5: r_1 = -(1 + 20) = -21, r_2 = -(1 + 15) = -16;
    # surrogate = -(lp_1 * r_1 + lp_2 * r_2) = -(21 + 32) = -53; d/dlp_i = -r_i.
    assert float(loss.detach()) == pytest.approx(-53.0)
    loss.backward()
    assert [float(lp.grad) for lp in log_probs] == [21.0, 16.0]


def test_deterministic_records_count_in_returns_but_add_no_term() -> None:
    log_prob = torch.tensor(-1.0, requires_grad=True)
    records = [record(10, log_prob=log_prob), record(1000)]  # second solve: a fixed tolerance
    loss = reinforce_loss(records, torch.tensor(0.0), alpha=2.0)
    # r_1 = -(0 + alpha/N * 1010) = -1010 and the surrogate is -(log p * r_1) = -(-1 * -1010).
    assert float(loss.detach()) == pytest.approx(-1010.0)
    only_fixed = reinforce_loss([record(1000)], torch.tensor(0.0), alpha=2.0)
    assert float(only_fixed) == 0.0 and not only_fixed.requires_grad


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="-1.0"):
        reinforce_loss([record(1)], torch.tensor(0.0), alpha=-1.0)
    with pytest.raises(ValueError, match="no solve records"):
        reinforce_loss([], torch.tensor(0.0), alpha=1.0)
    with pytest.raises(ValueError, match="momentum"):
        RunningMeanBaseline(momentum=1.0)


# ---------------------------------------------------------------- baseline


def test_running_mean_baseline_and_state_dict_round_trip() -> None:
    baseline = RunningMeanBaseline(momentum=0.5)
    first = baseline.update(torch.tensor([-10.0, -4.0], dtype=torch.float64))
    assert first.tolist() == [-10.0, -4.0]  # initialised to the first returns: zero advantage
    second = baseline.update(torch.tensor([-20.0, -8.0], dtype=torch.float64))
    assert second.tolist() == [-10.0, -4.0]  # the baseline never contains the returns it is used on
    restored = RunningMeanBaseline()
    restored.load_state_dict(baseline.state_dict())
    assert restored.momentum == 0.5
    nxt = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    assert restored.update(nxt).tolist() == baseline.update(nxt).tolist() == [-15.0, -6.0]


def test_baseline_averages_per_sample_returns_over_the_batch() -> None:
    baseline = RunningMeanBaseline()
    returns = torch.tensor([[-1.0, -3.0], [-5.0, -7.0]], dtype=torch.float64)
    assert baseline.update(returns).tolist() == [[-2.0], [-6.0]]


# ---------------------------------------------------------------- unbiased gradient


def _toy_gradient(loss_offset: float, baseline: RunningMeanBaseline | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One REINFORCE estimate over a batch of draws for the cost (g + 4)^2, and its standard error."""
    net = ConstantNet()
    gate = GaussianGate(net, low=1e-12, high=1e-1, reduction="none", initial_log10=-5.0, initial_std=0.5)
    choice = gate(torch.zeros(100_000, 1), Progress())
    cost = (choice.log10_tolerance.double() + 4.0) ** 2
    rec = record(0, log_prob=choice.log_prob, nfe_per_sample=cost)
    loss = reinforce_loss([rec], torch.tensor(loss_offset), alpha=1.0, baseline=baseline)
    (grad,) = torch.autograd.grad(loss, net.raw)
    # Per-draw terms of the same estimator, for its standard error: score * (L + cost - b).
    z = (choice.log10_tolerance.double() + 5.0) / 0.5
    advantage = loss_offset + cost - (0.0 if baseline is None else float(-baseline.values[0]))
    terms = torch.stack([z / 0.5 * advantage, (z**2 - 1) * advantage])
    return grad, terms.std(dim=1) / terms.shape[1] ** 0.5


def test_reinforce_gradient_is_unbiased_on_a_gaussian_toy() -> None:
    # g ~ N(mu=-5, sigma=0.5), cost (g + 4)^2, so E[cost] = (mu + 4)^2 + sigma^2 and
    # dE/dmu = 2 (mu + 4) = -2, dE/dlog(sigma) = 2 sigma^2 = 0.5 (the gate's two raw outputs).
    # The clip bounds are 8 sigma and 14 sigma away, so censoring is negligible.
    analytic = torch.tensor([-2.0, 0.5], dtype=torch.float64)
    grad, stderr = _toy_gradient(loss_offset=0.0, baseline=None)
    # 100k draws: stderr ~ 0.015; 5 standard errors is a false-alarm rate below 1e-6.
    assert torch.all((grad - analytic).abs() < 5 * stderr), (grad, stderr)
    assert torch.all((grad - analytic).abs() < 0.1)


def test_baseline_removes_the_loss_offset_without_biasing() -> None:
    # A task loss of 50 adds 50 * score to every term: unbiased but noisy. A warmed-up baseline
    # (built from an earlier batch, so independent of these draws) removes it.
    analytic = torch.tensor([-2.0, 0.5], dtype=torch.float64)
    baseline = RunningMeanBaseline()
    _toy_gradient(loss_offset=50.0, baseline=baseline)  # warm-up
    grad, stderr = _toy_gradient(loss_offset=50.0, baseline=baseline)
    assert torch.all((grad - analytic).abs() < 5 * stderr), (grad, stderr)
    _, stderr_without = _toy_gradient(loss_offset=50.0, baseline=None)
    assert torch.all(stderr < stderr_without / 5)


# ---------------------------------------------------------------- gradient reaches only the gates


def test_reinforce_gradient_reaches_only_gate_parameters() -> None:
    encoder, flow = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    gate = GaussianGate(MLPGate(3).double())
    solver = GatedSolver(gate)
    x = torch.randn(4, 3, dtype=torch.float64)
    h = encoder(x)  # the gate reads a context that carries the encoder's graph
    ys = solver(lambda t, y: torch.tanh(flow(y)), h, torch.tensor([0.0, 1.0], dtype=torch.float64), context=h)
    task_loss = ys[-1].pow(2).mean()
    surrogate = reinforce_loss(solver.records, task_loss, alpha=0.1)
    flow_and_encoder = [*flow.parameters(), *encoder.parameters()]
    grads = torch.autograd.grad(surrogate, [*flow_and_encoder, *gate.parameters()], allow_unused=True)
    assert all(g is None for g in grads[: len(flow_and_encoder)])
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads[len(flow_and_encoder) :])


# ---------------------------------------------------------------- end to end


A_OSCILLATOR = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
T_SPAN = torch.tensor([0.0, 2.0], dtype=torch.float64)


def _field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y @ A_OSCILLATOR.T


def _train_gate(gate: GaussianGate, steps: int, lr: float = 0.05) -> tuple[float, float, int, int]:
    """Train ``gate`` by REINFORCE alone on one fixed batch; return the deterministic gate's
    log10 tolerance before and after, and its NFE before and after."""
    solver = GatedSolver(gate, method="dopri5", eval_policy=None)
    batch = torch.randn(16, 2, dtype=torch.float64)

    def evaluate() -> tuple[float, int]:
        solver.eval()
        with torch.no_grad():
            solver(_field, batch, T_SPAN)
        solver.train()
        rec = solver.records[-1]
        return float(rec.log10_tolerance), rec.nfe_forward

    log10_before, nfe_before = evaluate()
    params = [p for p in gate.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr) if params else None
    baseline = RunningMeanBaseline(momentum=0.8)
    for _ in range(steps):
        solver.reset()
        ys = solver(_field, batch, T_SPAN)
        # The task loss is a function of the solution only; on a fixed batch it moves by about
        # the tolerance (< 1e-3) between draws, nothing against NFE differences of tens, so the
        # NFE reward alone drives the gate. (A fresh batch per step would add the loss's
        # batch-to-batch spread to every return: unbiased, but noise for the gate.)
        task_loss = ys[-1].pow(2).mean()
        surrogate = reinforce_loss(solver.records, task_loss, alpha=1.0, baseline=baseline, nfe_scale=10.0)
        if optimizer is not None:
            optimizer.zero_grad()
            surrogate.backward()
            optimizer.step()
    log10_after, nfe_after = evaluate()
    return log10_before, log10_after, nfe_before, nfe_after


def test_training_the_gate_raises_its_tolerance_and_lowers_nfe() -> None:
    gate = GaussianGate(MLPGate(2).double(), low=1e-8, high=1e-1, initial_log10=-5.0, initial_std=0.5)
    log10_before, log10_after, nfe_before, nfe_after = _train_gate(gate, steps=20)
    # Over 8 seeds, 15 steps raised the mean by 0.7 to 4 decades and cut NFE by 29-68%.
    assert log10_after > log10_before + 0.5, (log10_before, log10_after)
    assert nfe_after < 0.8 * nfe_before, (nfe_before, nfe_after)


def test_frozen_gate_does_not_move() -> None:
    gate = GaussianGate(MLPGate(2).double(), initial_log10=-5.0, initial_std=0.5).freeze()
    state = {k: v.clone() for k, v in gate.state_dict().items()}
    log10_before, log10_after, nfe_before, nfe_after = _train_gate(gate, steps=10)
    assert log10_after == log10_before and nfe_after == nfe_before
    assert all(torch.equal(state[k], v) for k, v in gate.state_dict().items())


def test_fixed_tolerance_at_the_trained_mean_reproduces_its_cost() -> None:
    gate = GaussianGate(MLPGate(2).double(), initial_log10=-5.0, initial_std=0.5)
    _train_gate(gate, steps=5)
    probe = torch.randn(16, 2, dtype=torch.float64)
    fixed = FixedTolerance.from_gate(gate, [probe])
    gated = GatedSolver(gate, eval_policy=None).eval()
    ablation = GatedSolver(fixed)
    gated(_field, probe, T_SPAN)
    ablation(_field, probe, T_SPAN)
    assert ablation.records[-1].rtol == pytest.approx(gated.records[-1].rtol, rel=1e-6)
    assert ablation.records[-1].nfe_forward == gated.records[-1].nfe_forward
