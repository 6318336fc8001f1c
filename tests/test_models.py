"""Tests of tolgate_flows' models: change of variables, invertibility, conditioning identities.

Tolerances are stated next to each check. Models are tiny (hidden width 8, one flow per side of
each squeeze) and in float64 wherever a solve is compared against a tight number.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tolgate import FixedTolerance, GatedSolver, ToleranceChoice, TolerancePolicy, gated_solvers
from tolgate_flows import (
    CNFBlock,
    ConvODENet,
    MLPODENet,
    ModelConfig,
    bits_per_dim,
    build_model,
    set_divergence,
)
from tolgate_flows.conditioning import LatentSplit
from tolgate_flows.multiscale import LogitTransform


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a shared 2-core machine two threads
    spin against each other and a 0.1 s solve takes seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixed(tol: float):
    return lambda index, channels: FixedTolerance(tol)


def vector_block(dim: int, divergence: str, noise: str = "rademacher", tol: float = 1e-8, adjoint=False):
    """A CNF block on ``(batch, dim)`` vectors whose field is strong enough that log|det| is O(0.1-1)."""
    torch.manual_seed(0)
    field = MLPODENet(dim, hidden=8).double()
    with torch.no_grad():
        for p in field.parameters():
            p.mul_(2.0)
    # the step budget turns a solve that never settles (noise re-drawn per evaluation) into a failure
    solver = GatedSolver(FixedTolerance(tol), adjoint=adjoint, max_num_steps=2000)
    return CNFBlock(field, solver, divergence, noise)


def tiny_model(kind: str = "infocnf", image_shape=(1, 8, 8), tol: float = 1e-6, **overrides):
    config = ModelConfig(kind=kind, image_shape=image_shape, n_flows=1, hidden=8, **overrides)
    torch.manual_seed(0)
    return build_model(config, fixed(tol), eval_policy=FixedTolerance(tol)).double()


def randomize_conditioning(model) -> None:
    """Move the zero-initialised prior and classifier away from zero, so identities are not trivial."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (model.prior, model.classifier):
            for p in module.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def images(batch: int, shape=(1, 8, 8), seed: int = 2) -> torch.Tensor:
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- change of variables --------------------------------------------------------------------


def test_exact_log_det_matches_jacobian_of_the_flow_map():
    """-logp_out = log|det dz/dx| of the flow map; brute force: integrate dz/dt = f alone with
    torchdiffeq at 1e-10 and take the Jacobian by autograd through that solve. The block solves
    at 1e-8 (with the trace in the error control), so they agree to 1e-6 nats."""
    block = vector_block(3, "exact")
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        z, logp = block(x)
    times = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def flow_map(xi: torch.Tensor) -> torch.Tensor:
        return torchdiffeq.odeint(block.odefunc, xi[None], times, rtol=1e-10, atol=1e-10)[-1, 0]

    base = torch.distributions.Normal(0.0, 1.0)
    for i in range(x.shape[0]):
        log_det = torch.linalg.slogdet(torch.autograd.functional.jacobian(flow_map, x[i])).logabsdet.detach()
        assert abs(float(log_det)) > 0.1  # the flow is far from volume preserving
        assert float(-logp[i]) == pytest.approx(float(log_det), abs=1e-6)
        # Eq. 2 as a density, standard normal base on the latent side: log p(x) = log N(z) + log|det|
        log_px = base.log_prob(z[i]).sum() - logp[i]
        brute_force = (base.log_prob(flow_map(x[i])).sum() + log_det).detach()
        assert float(log_px) == pytest.approx(float(brute_force), abs=1e-6)


def test_reverse_solve_inverts_state_and_log_density():
    block = vector_block(3, "exact")
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z, logp = block(x)
    x_back, logp_back = block(z, logp, reverse=True)
    assert torch.allclose(x_back, x, atol=1e-6)  # solves at 1e-8
    assert torch.allclose(logp_back, torch.zeros_like(logp_back), atol=1e-6)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_exact_trace(noise):
    """The mean over 2000 independent draws (one per row) is within 4 standard errors of the exact value
    (solves at 1e-7, far below the standard error)."""
    exact_block = vector_block(3, "exact", tol=1e-7)
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        _, exact = exact_block(x)
    block = vector_block(3, "hutchinson", noise, tol=1e-7)
    torch.manual_seed(6)
    with torch.no_grad():
        _, estimates = block(x.expand(2000, 3))
    standard_error = float(estimates.std()) / math.sqrt(estimates.numel())
    assert standard_error > 1e-4  # the estimates really vary between draws
    assert float(estimates.mean()) == pytest.approx(float(exact), abs=4 * standard_error)


class LinearField(nn.Module):
    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(matrix)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.matrix.T


def test_hutchinson_noise_is_fixed_within_one_solve():
    """For f(z) = A z and a Rademacher draw e held for the whole solve, the estimate is exactly
    -e^T A e (t from 0 to 1): one of 2^(d-1) values. A draw per evaluation would average many."""
    matrix = torch.tensor([[0.3, 1.2, -0.7], [-0.4, 0.1, 0.9], [0.8, -1.1, -0.2]], dtype=torch.float64)
    solver = GatedSolver(FixedTolerance(1e-9), max_num_steps=2000)
    block = CNFBlock(LinearField(matrix), solver, "hutchinson", "rademacher")
    with torch.no_grad():
        _, logp = block(torch.randn(64, 3, dtype=torch.float64))
    signs = torch.tensor([[1.0, a, b] for a in (-1, 1) for b in (-1, 1)], dtype=torch.float64)
    allowed = -torch.einsum("ki,ij,kj->k", signs, matrix, signs)
    distance = (logp[:, None] - allowed[None]).abs().min(dim=1).values
    assert float(distance.max()) < 1e-7
    assert len(set(torch.round(logp, decimals=6).tolist())) > 1


def test_adjoint_gradient_reuses_the_forward_noise():
    """Same seed, same noise: the adjoint's parameter gradient equals direct backpropagation's
    to 1e-4 relative (both solved at 1e-8; another draw changes it by O(1))."""
    grads = []
    for adjoint in (False, True):
        block = vector_block(3, "hutchinson", adjoint=adjoint)
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        torch.manual_seed(8)
        z, logp = block(x)
        (z.square().sum() + logp.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in block.odefunc.parameters()]))
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_divergence_is_switchable_and_validated():
    model = tiny_model()
    set_divergence(model, "exact")
    assert {b.divergence for b in model.blocks} == {"exact"}
    set_divergence(model, "hutchinson")
    assert {b.divergence for b in model.blocks} == {"hutchinson"}
    with pytest.raises(ValueError, match="divergence"):
        set_divergence(model, "approximate")


# --- multiscale architecture -----------------------------------------------------------------


def test_multiscale_log_det_matches_jacobian_of_decode():
    """The bookkeeping of logit, squeeze and factor-out: log_det of the encoder (exact trace)
    equals -log|det dx/dz| of the decoder, Jacobian by autograd through its solves (1x4x4
    images, two scales, tolerance 1e-8), to 1e-5 nats."""
    model = tiny_model("cnf", image_shape=(1, 4, 4), n_scales=2, divergence="exact", tol=1e-8)
    x = 0.1 + 0.8 * images(2, (1, 4, 4))
    with torch.no_grad():
        z, log_det = model.encode(x)
    for i in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda zi: model.decode(zi[None])[0], z[i])
        expected = -torch.linalg.slogdet(jacobian.reshape(16, 16)).logabsdet
        assert float(log_det[i]) == pytest.approx(float(expected), abs=1e-5)


def test_encode_then_decode_returns_the_image():
    """1x8x8, two scales, solves at rtol = atol = 1e-8: x comes back to 1e-6."""
    model = tiny_model(tol=1e-8)
    x = images(4)
    with torch.no_grad():
        z, log_det = model.encode(x)
        x_back = model.decode(z)
    _, logit_log_det = LogitTransform(model.config.logit_alpha)(x)
    assert float((log_det - logit_log_det).abs().min()) > 1e-3  # the CNF blocks are not the identity
    assert float((x_back - x).abs().max()) < 1e-6


def test_logit_transform_log_det_and_inverse():
    logit = LogitTransform(1e-6)
    x = images(3, (1, 2, 2))
    y, log_det = logit(x)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda xi: logit(xi[None])[0][0], x[i]).reshape(4, 4)
        assert float(log_det[i]) == pytest.approx(float(torch.linalg.slogdet(jacobian).logabsdet), rel=1e-10)
    assert torch.allclose(logit.inverse(y), x, atol=1e-12)


def recording_factory():
    calls: list[tuple[int, int]] = []

    def factory(index: int, channels: int) -> TolerancePolicy:
        calls.append((index, channels))
        return FixedTolerance(1e-3)

    return calls, factory


@pytest.mark.parametrize(
    ("image_shape", "n_blocks", "channels", "latent_sizes"),
    [
        ((3, 32, 32), 14, [3, 3, 12, 12, 6, 6, 24, 24, 12, 12, 48, 48, 24, 24], [1536, 768, 384, 384]),
        ((1, 28, 28), 10, [1, 1, 4, 4, 2, 2, 8, 8, 4, 4], [392, 196, 196]),
        ((1, 8, 8), 6, [1, 1, 4, 4, 2, 2], [32, 32]),
    ],
)
def test_block_count_order_and_latent_layout(image_shape, n_blocks, channels, latent_sizes):
    """Appendix B / REFERENCE-FACTS: CIFAR-10 4 scales 14 blocks, MNIST 3 scales 10, digits 2 scales 6."""
    calls, factory = recording_factory()
    model = build_model(ModelConfig(image_shape=image_shape, hidden=4), factory)
    assert len(model.blocks) == n_blocks
    assert calls == list(enumerate(channels))
    assert list(gated_solvers(model)) == [block.solver for block in model.blocks]
    assert [block.odefunc.layers[0].layer.in_channels - 1 for block in model.blocks] == channels
    assert model.flow.latent_sizes == latent_sizes
    assert sum(latent_sizes) == model.dims


class RecordingPolicy(TolerancePolicy):
    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[torch.Tensor] = []

    def forward(self, context, progress):
        self.contexts.append(context)
        return ToleranceChoice(1e-4, 1e-4)


def test_each_gate_reads_its_blocks_input_detached():
    policies = []

    def factory(index, channels):
        policies.append(RecordingPolicy())
        return policies[-1]

    model = build_model(ModelConfig(kind="cnf", n_flows=1, hidden=8), factory).double()
    x = images(3)
    model(x, None)
    shapes = [tuple(p.contexts[0].shape) for p in policies]
    assert shapes == [(3, 1, 8, 8), (3, 4, 4, 4), (3, 2, 4, 4)]
    assert not any(p.contexts[0].requires_grad for p in policies)
    first_input, _ = model.flow.logit(x)
    assert torch.equal(policies[0].contexts[0], first_input)


def test_geometry_and_config_are_validated():
    with pytest.raises(ValueError, match="divisible"):
        build_model(ModelConfig(image_shape=(1, 6, 6), n_scales=3), fixed(1e-3))
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="glow")
    with pytest.raises(ValueError, match="zy_fraction"):
        ModelConfig(zy_fraction=0.0)
    model = tiny_model()
    with pytest.raises(ValueError, match="labels"):
        model(images(2), None)
    with pytest.raises(ValueError, match="shape"):
        model(images(2, (1, 4, 4)), torch.zeros(2, dtype=torch.int64))


# --- conditioning ------------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["first-scale", "top-scale"])
def test_infocnf_with_the_whole_latent_is_ccnf(location):
    """Same parameters, same noise seed: identical z, log p(x|y) and logits (bitwise)."""
    ccnf = tiny_model("ccnf")
    randomize_conditioning(ccnf)
    info = tiny_model("infocnf", zy_fraction=1.0, zy_location=location)
    info.load_state_dict(ccnf.state_dict(), strict=True)
    x, y = images(4), torch.tensor([0, 3, 7, 9])
    outputs = []
    for model in (ccnf, info):
        model.eval()
        torch.manual_seed(9)
        outputs.append(model(x, y))
    assert torch.equal(outputs[0].z, outputs[1].z)
    assert torch.equal(outputs[0].log_px, outputs[1].log_px)
    assert torch.equal(outputs[0].logits, outputs[1].logits)


@pytest.mark.parametrize("kind", ["infocnf", "ccnf", "cnf"])
def test_marginal_and_per_class_densities(kind):
    """log p(x|y) is the y-th column of the per-class densities; marginal bits/dim <= conditional
    bits/dim + log2(K)/D for every sample and every class (logsumexp >= any term)."""
    model = tiny_model(kind).eval()
    if kind != "cnf":
        randomize_conditioning(model)
    x, y = images(4), torch.tensor([1, 2, 5, 8])
    out = model(x, y)
    per_class = model.log_px_all_classes(out)
    assert per_class.shape == (4, 10)
    assert torch.allclose(per_class[torch.arange(4), y], out.log_px, rtol=0, atol=1e-10)
    marginal = model.marginal_log_px(out)
    conditional_bpd = bits_per_dim(per_class, model.dims, 256)
    marginal_bpd = bits_per_dim(marginal, model.dims, 256)
    slack = math.log2(10) / model.dims
    assert bool((marginal_bpd[:, None] <= conditional_bpd + slack + 1e-12).all())
    if kind == "cnf":
        assert out.logits is None
        assert torch.equal(marginal, out.log_px)
    else:
        assert per_class.std(dim=1).min() > 1e-3  # the classes' priors really differ


def test_zy_location_selects_the_first_or_the_top_scale():
    first = tiny_model("infocnf", zy_location="first-scale")
    top = tiny_model("infocnf", zy_location="top-scale")
    z = torch.arange(64, dtype=torch.float64)[None]
    assert torch.equal(first.latent_split.split(z)[0], z[:, :32])  # the first scale's factor-out
    assert torch.equal(top.latent_split.split(z)[0], z[:, 32:])  # the top scale's latent
    assert first.prior.dim == top.prior.dim == 32 == first.flow.latent_sizes[0]


@settings(max_examples=30, deadline=None)
@given(
    dims=st.integers(1, 40),
    data=st.data(),
    location=st.sampled_from(["first-scale", "top-scale"]),
)
def test_latent_split_round_trips(dims, data, location):
    zy_dims = data.draw(st.integers(0, dims))
    split = LatentSplit(dims, zy_dims, location)
    z = torch.randn(3, dims)
    z_y, z_u = split.split(z)
    assert z_y.shape == (3, zy_dims) and z_u.shape == (3, dims - zy_dims)
    assert torch.equal(split.merge(z_y, z_u), z)


def test_loss_is_bits_per_dim_plus_beta_cross_entropy():
    """At initialisation the classifier is zero: cross-entropy log(10) nats exactly."""
    model = tiny_model()
    x, y = images(3), torch.tensor([0, 1, 2])
    out = model(x, y)
    total, parts = model.loss(out, y, beta=0.5, levels=256)
    assert float(parts.cross_entropy) == pytest.approx(math.log(10), rel=1e-12)
    expected_bpd = -(out.log_px - model.dims * math.log(256)) / (model.dims * math.log(2))
    assert float(parts.bits_per_dim) == pytest.approx(float(expected_bpd.mean().detach()), rel=1e-12)
    assert float(total.detach()) == pytest.approx(float(parts.bits_per_dim + 0.5 * parts.cross_entropy), rel=1e-12)
    total.backward()
    assert all(p.grad is not None for p in model.classifier.parameters())
    # a uniform density on [0,1]^D costs exactly log2(levels) bits per dimension
    assert float(bits_per_dim(torch.zeros(1), 64, 256)) == pytest.approx(8.0)


# --- sampling and vector fields -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["infocnf", "cnf"])
def test_samples_have_the_image_shape_and_range(kind):
    model = tiny_model(kind, tol=1e-5).eval()
    if kind != "cnf":
        randomize_conditioning(model)
    samples = model.sample(torch.tensor([0, 4, 9]), temperature=0.7)
    assert samples.shape == (3, 1, 8, 8)
    assert bool(torch.isfinite(samples).all())
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0
    assert float(samples.std()) > 0.0


@pytest.mark.parametrize("time", ["concat", "concatsquash"])
def test_fields_keep_the_shape_and_depend_on_time(time):
    conv = ConvODENet(3, hidden=8, time=time)
    mlp = MLPODENet(5, hidden=8, time=time)
    for net, state in ((conv, torch.randn(2, 3, 4, 4)), (mlp, torch.randn(2, 5))):
        early, late = net(torch.tensor(0.0), state), net(torch.tensor(1.0), state)
        assert early.shape == state.shape
        assert not torch.allclose(early, late)
