"""LatentODE and its partitioned variant: shapes, the ELBO identity at initialisation, NFE records."""

import math

import pytest
import torch

from tolgate import FixedTolerance, GatedSolver
from tolgate_flows.latent_ode import LatentODE, PartitionedLatentODE, gaussian_kl

BATCH, TIME = 4, 7


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, TIME, 2, generator=gen)
    t = torch.linspace(0.0, 1.0, TIME)
    direction = torch.randint(0, 2, (BATCH, 1), generator=gen).float()
    return x, t, torch.cat([torch.randn(BATCH, 2, generator=gen), direction], dim=1)


def _pair() -> tuple[LatentODE, PartitionedLatentODE]:
    torch.manual_seed(0)
    baseline = LatentODE()
    partitioned = PartitionedLatentODE(supervised_weight=0.0)
    result = partitioned.load_state_dict(baseline.state_dict(), strict=False)  # shared encoder, f, decoder
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} == {"conditional_prior", "predictor"}
    return baseline, partitioned


def test_partitioned_equals_baseline_with_standard_prior_and_zero_predictor_weight():
    baseline, partitioned = _pair()
    x, t, y = _data()
    eps = torch.randn(BATCH, 5)
    # zero-initialised q_phi: the conditional prior is N(0, I)
    mean_p, logvar_p = partitioned.prior(y, BATCH, x)
    assert torch.equal(mean_p, torch.zeros(BATCH, 5)) and torch.equal(logvar_p, torch.zeros(BATCH, 5))
    base, part = baseline.loss(x, t, y, eps=eps), partitioned.loss(x, t, y, eps=eps)
    torch.testing.assert_close(part.elbo, base.elbo, rtol=0, atol=0)
    torch.testing.assert_close(part.total, base.total, rtol=0, atol=0)
    assert float(part.supervised.detach()) == 0.0


def test_conditional_prior_changes_the_elbo_only_through_the_kl():
    baseline, partitioned = _pair()
    x, t, y = _data()
    eps = torch.randn(BATCH, 5)
    with torch.no_grad():
        partitioned.conditional_prior.linear.bias.fill_(0.3)
    base, part = baseline.loss(x, t, y, eps=eps), partitioned.loss(x, t, y, eps=eps)
    torch.testing.assert_close(part.log_likelihood, base.log_likelihood, rtol=0, atol=0)
    assert not torch.isclose(part.kl, base.kl)


def test_supervised_weight_adds_the_predictor_nll():
    torch.manual_seed(1)
    model = PartitionedLatentODE(supervised_weight=2.0)
    x, t, y = _data()
    out = model.loss(x, t, y, eps=torch.zeros(BATCH, 5))
    # zero-initialised predictor: regression term 0.5*|y_cont|^2, logistic term log 2 per binary label
    expected = 2.0 * (0.5 * y[:, :2].pow(2).sum(dim=1) + math.log(2.0)).mean()
    torch.testing.assert_close(out.supervised, expected)
    torch.testing.assert_close(out.total, -out.elbo + out.supervised)


def test_shapes_and_nfe_recorded():
    model = PartitionedLatentODE(solver=GatedSolver(FixedTolerance(1e-4)))
    x, t, y = _data()
    out = model.loss(x, t, y)
    out.total.backward()
    record = model.solver.records[-1]
    assert record.nfe_forward > 0 and record.nfe_backward > 0
    assert record.nfe_forward == 2 + 6 * record.n_steps
    model.eval()
    t_out = torch.linspace(0.0, 2.0, 2 * TIME - 1)
    assert model.reconstruct(x, t, t_out).shape == (BATCH, 2 * TIME - 1, 2)
    assert model.solver.records[-1].rtol == 1e-5  # evaluation uses the eval policy
    labels = model.predict_labels(x)
    assert labels.shape == (BATCH, 3)
    assert bool(((labels[:, 2] >= 0) & (labels[:, 2] <= 1)).all())
    assert model.encoder(x)[0].shape == (BATCH, 5)


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(3)
    mq, lq, mp, lp = (torch.randn(6, 5, generator=gen) for _ in range(4))
    q = torch.distributions.Normal(mq, (0.5 * lq).exp())
    p = torch.distributions.Normal(mp, (0.5 * lp).exp())
    torch.testing.assert_close(gaussian_kl(mq, lq, mp, lp), torch.distributions.kl_divergence(q, p).sum(-1))


def test_bad_inputs_raise():
    model = PartitionedLatentODE()
    x, t, y = _data()
    with pytest.raises(ValueError, match="labels y"):
        model.loss(x, t, None)
    with pytest.raises(ValueError, match="x must be"):
        model.loss(x, t[:-1], y)
    with pytest.raises(ValueError, match="code_dim"):
        PartitionedLatentODE(code_dim=6)


def test_partitioned_model_takes_the_baselines_arguments_by_keyword_only():
    model = PartitionedLatentODE(code_dim=4, obs_dim=3, latent_dim=7, obs_std=0.5, ode_hidden=8)
    assert model.latent_dim == 7 and model.obs_std == 0.5 and model.obs_shift.shape == (3,)
    mean, logvar = model.prior(torch.zeros(2, 3), 2, torch.zeros(1))
    assert mean.shape == logvar.shape == (2, 7)
    assert model.dynamics.net[0].out_features == 8 and model.decoder.net[-1].out_features == 3
    with pytest.raises(ValueError, match="latent_dim=7"):
        PartitionedLatentODE(code_dim=8, latent_dim=7)
    with pytest.raises(TypeError):
        PartitionedLatentODE(2, 5)  # a size given by position cannot land on code_dim
    with pytest.raises(TypeError, match="latent_size"):
        PartitionedLatentODE(latent_size=5)


def test_observation_normalisation_is_an_exact_affine_wrapper():
    torch.manual_seed(2)
    plain = LatentODE()
    shift, scale = torch.tensor([5.0, -1.0]), torch.tensor([6.0, 4.0])
    scaled = LatentODE(obs_shift=shift, obs_scale=scale)
    scaled.load_state_dict({**plain.state_dict(), "obs_shift": shift, "obs_scale": scale})
    x, t, _ = _data()
    z0 = torch.randn(BATCH, 5)
    torch.testing.assert_close(scaled.decode(z0, t), shift + scale * plain.decode(z0, t))
    torch.testing.assert_close(scaled.encode(shift + scale * x), plain.encode(x))
    with pytest.raises(ValueError, match="obs_scale"):
        LatentODE(obs_scale=torch.tensor([1.0, 0.0]))
