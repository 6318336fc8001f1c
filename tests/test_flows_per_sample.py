"""CNF blocks on the per-sample backend: same density as torchdiffeq, and a sample's result does
not depend on the batch it is solved in (its Hutchinson noise follows it through the active set)."""

import torch

from tolgate import FixedTolerance, GatedSolver, GaussianGate, MLPGate, reinforce_loss
from tolgate_flows.cnf import CNFBlock
from tolgate_flows.odefuncs import MLPODENet


def _block(backend: str, policy=None, divergence="exact") -> CNFBlock:
    torch.manual_seed(0)
    field = MLPODENet(3, hidden=16, time="concatsquash").double()
    solver = GatedSolver(policy or FixedTolerance(1e-9), backend=backend, eval_policy=FixedTolerance(1e-9))
    return CNFBlock(field, solver, divergence=divergence)


def test_per_sample_backend_matches_torchdiffeq_density():
    z = torch.randn(16, 3, dtype=torch.float64)
    z_ref, logp_ref = _block("torchdiffeq")(z)
    z_ps, logp_ps = _block("per_sample")(z)
    assert torch.allclose(z_ps, z_ref, atol=1e-6)
    assert torch.allclose(logp_ps, logp_ref, atol=1e-6)


def test_sample_result_is_independent_of_its_batch():
    torch.manual_seed(1)
    z = torch.randn(64, 3, dtype=torch.float64) * torch.logspace(-1, 1, 64, dtype=torch.float64)[:, None]
    noise = torch.randint(0, 2, z.shape).double() * 2 - 1
    block = _block("per_sample", FixedTolerance(1e-5), divergence="hutchinson")
    block._draw_noise = lambda zz: noise[: zz.shape[0]] if zz.shape[0] == 64 else noise[37:38]
    with torch.no_grad():
        _, logp_batch = block(z)
        nfe_batch = block.solver.records[-1].nfe_per_sample
        _, logp_alone = block(z[37:38])  # row 37 alone, with its own row of the noise
    assert abs(float(logp_alone[0] - logp_batch[37])) < 1e-12
    assert int(block.solver.records[-1].nfe_per_sample[0]) == int(nfe_batch[37])


def test_per_sample_gate_gets_per_sample_rewards():
    gate = GaussianGate(MLPGate(3).double(), reduction="none", initial_log10=-4.0)
    block = _block("per_sample", gate, divergence="hutchinson")
    z = torch.randn(8, 3, dtype=torch.float64)
    _, logp = block(z)
    record = block.solver.records[-1]
    assert record.log_prob.shape == (8,) and record.nfe_per_sample.shape == (8,)
    loss = -logp.mean()
    surrogate = reinforce_loss([record], loss, alpha=1.0)
    surrogate.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gate.parameters())
    assert all(p.grad is None for p in block.odefunc.parameters())
