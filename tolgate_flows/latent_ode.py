"""Latent ODE (Chen et al. 2018) and its InfoCNF-style partitioned variant (InfoCNF paper, Sec. 4.6, App. E).

Generative model: ``z(t0) ~ p(z0)``, ``dz/dt = f(z)`` solved by a :class:`~tolgate.GatedSolver`,
``x(t_i) ~ N(decoder(z(t_i)), obs_std^2 I)``. Inference: an RNN reads the observations backwards
(last to first) so its final state summarises the whole window as seen from ``t0``, and maps it to
the diagonal Gaussian ``q(z0 | x)``. Training maximises the single-sample ELBO

    ELBO = E_q[ sum_i log N(x_i; decoder(z(t_i)), obs_std^2) ] - KL(q(z0 | x) || p(z0 | y)).

Baseline (:class:`LatentODE`): ``p(z0) = N(0, I)``.

Partitioned (:class:`PartitionedLatentODE`): ``z0 = (z_y, z_u)``. The supervised code ``z_y``
(first ``code_dim`` dims) has the conditional prior ``N(mu(y), sigma(y)^2)`` from the linear
``q_phi(y)``; ``z_u ~ N(0, I)``. A linear predictor ``q_theta(z_y)`` predicts the labels (Gaussian
regression with unit variance on the continuous columns, logistic on the binary ones) and its
negative log-likelihood is added to the loss with weight ``supervised_weight``. Both linear maps
are zero-initialised (paper Sec. 4.1), so at initialisation the partitioned model's prior is the
baseline's, and with ``supervised_weight = 0`` its objective is exactly the baseline's.

``obs_std = 0.3`` by default: the noise the bi-directional spiral data are generated with
(App. E.1), which is also the value the neural-ODE paper's spiral example used.

``obs_shift``/``obs_scale`` (fixed buffers, default 0 and 1) standardise what the encoder reads,
``(x - shift) / scale``, and un-standardise what the decoder writes, ``shift + scale * net(z)``,
so the networks work in O(1) units while the likelihood stays in data units. For the spirals
(centres at x = +-5, radii up to ~13) this matters: at Adam's lr 1e-3 a decoder in raw units
spends thousands of steps just moving its output bias and scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tolgate import FixedTolerance, GatedSolver

LOG_2PI = math.log(2.0 * math.pi)
# (mean, logvar) of a diagonal Gaussian, each (batch, dim)
GaussianParams = tuple[torch.Tensor, torch.Tensor]


class RecognitionRNN(nn.Module):
    """Fully connected (Elman) RNN run backwards in time; returns ``q(z0 | x)``.

    ``forward(x)``: ``x`` of shape ``(batch, time, obs_dim)``; returns ``(mean, logvar)``, each
    ``(batch, latent_dim)``.
    """

    def __init__(self, obs_dim: int = 2, hidden: int = 25, latent_dim: int = 5) -> None:
        super().__init__()
        self.hidden = hidden
        self.i2h = nn.Linear(obs_dim + hidden, hidden)
        self.h2o = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> GaussianParams:
        if x.dim() != 3:
            raise ValueError(f"observations must have shape (batch, time, obs_dim), got {tuple(x.shape)}")
        h = x.new_zeros(x.shape[0], self.hidden)
        for i in reversed(range(x.shape[1])):
            h = torch.tanh(self.i2h(torch.cat([x[:, i], h], dim=1)))
        mean, logvar = self.h2o(h).chunk(2, dim=1)
        return mean, logvar


class LatentDynamics(nn.Module):
    """Autonomous latent vector field ``f(z)``: one hidden layer (ELU). ``z``: ``(batch, latent_dim)``."""

    def __init__(self, latent_dim: int = 5, hidden: int = 20) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, latent_dim))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Decoder(nn.Module):
    """``z (..., latent_dim) -> x_mean (..., obs_dim)``: one hidden layer (ReLU)."""

    def __init__(self, latent_dim: int = 5, obs_dim: int = 2, hidden: int = 20) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, obs_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConditionalPrior(nn.Module):
    """``q_phi``: linear map from labels ``(batch, label_dim)`` to the prior's ``(mean, logvar)``
    of the supervised code, each ``(batch, code_dim)``. Zero-initialised: starts at ``N(0, I)``."""

    def __init__(self, label_dim: int, code_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(label_dim, 2 * code_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, y: torch.Tensor) -> GaussianParams:
        mean, logvar = self.linear(y).chunk(2, dim=1)
        return mean, logvar


class LabelPredictor(nn.Module):
    """``q_theta``: linear map from the supervised code ``(batch, code_dim)`` to label predictions
    ``(batch, n_continuous + n_binary)``: regression values, then logits. Zero-initialised."""

    def __init__(self, code_dim: int, n_continuous: int, n_binary: int) -> None:
        super().__init__()
        self.n_continuous = n_continuous
        self.linear = nn.Linear(code_dim, n_continuous + n_binary)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, z_y: torch.Tensor) -> torch.Tensor:
        return self.linear(z_y)

    def negative_log_likelihood(self, z_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample NLL ``(batch,)``: unit-variance Gaussian on the continuous labels (constant
        dropped, i.e. half the squared error) plus binary cross-entropy on the binary ones (0/1)."""
        out = self(z_y)
        k = self.n_continuous
        regression = 0.5 * (out[:, :k] - y[:, :k]).pow(2).sum(dim=1)
        logistic = F.binary_cross_entropy_with_logits(out[:, k:], y[:, k:], reduction="none").sum(dim=1)
        return regression + logistic


@dataclass
class LatentODELoss:
    """One minibatch's objective. ``total`` (scalar) is minimised; the rest are batch means, for logging.

    ``elbo``: per-sample ELBO (nats, summed over the window); ``log_likelihood`` and ``kl`` its
    two terms; ``supervised``: the label predictor's NLL (zero for the baseline).
    """

    total: torch.Tensor
    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    kl: torch.Tensor
    supervised: torch.Tensor


def gaussian_kl(
    mean_q: torch.Tensor, logvar_q: torch.Tensor, mean_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """``KL(N(mean_q, e^logvar_q) || N(mean_p, e^logvar_p))`` of diagonal Gaussians, summed over
    the last dimension: ``(batch, d) -> (batch,)``."""
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p).pow(2)) / logvar_p.exp() - 1.0)
    return kl.sum(dim=-1)


def default_solver() -> GatedSolver:
    """dopri5 at a fixed tolerance 1e-5 in training and evaluation (the paper's test-time value)."""
    return GatedSolver(FixedTolerance(1e-5), eval_policy=FixedTolerance(1e-5))


class LatentODE(nn.Module):
    """Baseline latent ODE with prior ``N(0, I)`` (App. E.2: RNN 25, latent 5, f and decoder 20 hidden).

    Shapes: observations ``x`` ``(batch, time, obs_dim)``; times ``t`` ``(time,)``, strictly
    increasing, ``t[0]`` the time of ``z0``; labels ``y`` ``(batch, label_dim)`` (ignored here).
    Every ODE solve goes through ``self.solver``; its ``records`` hold the NFE of each solve.
    """

    def __init__(
        self,
        obs_dim: int = 2,
        latent_dim: int = 5,
        rnn_hidden: int = 25,
        ode_hidden: int = 20,
        decoder_hidden: int = 20,
        obs_std: float = 0.3,
        solver: GatedSolver | None = None,
        obs_shift: torch.Tensor | None = None,
        obs_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if obs_std <= 0:
            raise ValueError(f"obs_std must be > 0, got {obs_std!r}")
        shift = torch.zeros(obs_dim) if obs_shift is None else torch.as_tensor(obs_shift, dtype=torch.float32)
        scale = torch.ones(obs_dim) if obs_scale is None else torch.as_tensor(obs_scale, dtype=torch.float32)
        if shift.shape != (obs_dim,) or scale.shape != (obs_dim,) or not bool((scale > 0).all()):
            raise ValueError(
                f"obs_shift and obs_scale must have shape ({obs_dim},) with scale > 0, "
                f"got {tuple(shift.shape)} and {scale.tolist()}"
            )
        self.register_buffer("obs_shift", shift)
        self.register_buffer("obs_scale", scale)
        self.latent_dim = latent_dim
        self.obs_std = float(obs_std)
        self.encoder = RecognitionRNN(obs_dim, rnn_hidden, latent_dim)
        self.dynamics = LatentDynamics(latent_dim, ode_hidden)
        self.decoder = Decoder(latent_dim, obs_dim, decoder_hidden)
        self.solver = default_solver() if solver is None else solver

    def prior(self, y: torch.Tensor | None, batch: int, like: torch.Tensor) -> GaussianParams:
        """``(mean, logvar)`` of ``p(z0 | y)``, each ``(batch, latent_dim)``: here ``N(0, I)``."""
        zeros = like.new_zeros(batch, self.latent_dim)
        return zeros, zeros

    def supervised_loss(self, z0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Per-sample label NLL ``(batch,)``; the baseline has no labels, so zero."""
        return z0.new_zeros(z0.shape[0])

    def latent_trajectory(self, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Solve from ``z0`` ``(batch, latent_dim)`` at ``t[0]``; returns ``(batch, time, latent_dim)``."""
        return self.solver(self.dynamics, z0, t).transpose(0, 1)

    def encode(self, x: torch.Tensor) -> GaussianParams:
        """``(mean, logvar)`` of ``q(z0 | x)``, each ``(batch, latent_dim)``."""
        return self.encoder((x - self.obs_shift) / self.obs_scale)

    def decode(self, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean observations ``(batch, time, obs_dim)`` at times ``t`` from ``z0``, in data units."""
        return self.obs_shift + self.obs_scale * self.decoder(self.latent_trajectory(z0, t))

    def loss(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, eps: torch.Tensor | None = None
    ) -> LatentODELoss:
        """Negative ELBO plus the supervised term, averaged over the batch.

        ``eps`` ``(batch, latent_dim)``: the reparameterisation noise; drawn from ``N(0, I)`` when
        ``None`` (pass it to compare models on the same draw).
        """
        if x.dim() != 3 or x.shape[1] != t.shape[0]:
            raise ValueError(f"x must be (batch, len(t), obs_dim); got x {tuple(x.shape)} and t {tuple(t.shape)}")
        mean_q, logvar_q = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mean_q)
        z0 = mean_q + eps * (0.5 * logvar_q).exp()
        x_mean = self.decode(z0, t)
        log_likelihood = (-0.5 * ((x - x_mean) / self.obs_std).pow(2) - math.log(self.obs_std) - 0.5 * LOG_2PI).sum(
            dim=(1, 2)
        )
        mean_p, logvar_p = self.prior(y, x.shape[0], x)
        kl = gaussian_kl(mean_q, logvar_q, mean_p, logvar_p)
        elbo = log_likelihood - kl
        supervised = self.supervised_loss(z0, y)
        return LatentODELoss(
            total=(-elbo + supervised).mean(),
            elbo=elbo.mean(),
            log_likelihood=log_likelihood.mean(),
            kl=kl.mean(),
            supervised=supervised.mean(),
        )

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, t_obs: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
        """Decode from the posterior mean of ``z0`` given ``x`` observed at ``t_obs``; ``t_out``
        ``(time_out,)`` starts at ``t_obs[0]`` and may run past ``t_obs[-1]`` (extrapolation).
        Returns ``(batch, time_out, obs_dim)``."""
        if t_out[0] != t_obs[0]:
            raise ValueError(f"t_out must start at t_obs[0]={float(t_obs[0])}, got {float(t_out[0])}")
        mean_q, _ = self.encode(x)
        return self.decode(mean_q, t_out)


class PartitionedLatentODE(LatentODE):
    """Latent ODE with ``z0 = (z_y, z_u)``: conditional prior on ``z_y`` and a label predictor.

    ``y`` ``(batch, n_continuous + n_binary)``: continuous labels first (ideally standardised),
    then binary ones in {0, 1}. For the spirals: ``(a, b, direction)``, ``n_continuous = 2``.
    """

    def __init__(
        self,
        *,
        code_dim: int = 3,
        n_continuous: int = 2,
        n_binary: int = 1,
        supervised_weight: float = 1.0,
        **model: Any,
    ) -> None:
        """``model``: :class:`LatentODE`'s keyword arguments (sizes, ``obs_std``, ``solver``,
        ``obs_shift``/``obs_scale``), with its defaults: the partitioned model differs from the
        baseline only in what is listed here. Keyword-only, so no argument lands in the wrong place."""
        super().__init__(**model)
        if not 0 < code_dim <= self.latent_dim:
            raise ValueError(f"code_dim must be in [1, latent_dim={self.latent_dim}], got {code_dim!r}")
        if supervised_weight < 0:
            raise ValueError(f"supervised_weight must be >= 0, got {supervised_weight!r}")
        self.code_dim = code_dim
        self.label_dim = n_continuous + n_binary
        self.supervised_weight = float(supervised_weight)
        self.conditional_prior = ConditionalPrior(self.label_dim, code_dim)
        self.predictor = LabelPredictor(code_dim, n_continuous, n_binary)

    def _check_labels(self, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        if y is None or y.shape != (batch, self.label_dim):
            shape = None if y is None else tuple(y.shape)
            raise ValueError(f"labels y must have shape ({batch}, {self.label_dim}), got {shape}")
        return y

    def prior(self, y: torch.Tensor | None, batch: int, like: torch.Tensor) -> GaussianParams:
        y = self._check_labels(y, batch)
        mean_y, logvar_y = self.conditional_prior(y)
        zeros = like.new_zeros(batch, self.latent_dim - self.code_dim)
        return torch.cat([mean_y, zeros], dim=1), torch.cat([logvar_y, zeros], dim=1)

    def supervised_loss(self, z0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        y = self._check_labels(y, z0.shape[0])
        return self.supervised_weight * self.predictor.negative_log_likelihood(z0[:, : self.code_dim], y)

    @torch.no_grad()
    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        """Label predictions ``(batch, label_dim)`` from the posterior mean's ``z_y``: regression
        values for the continuous labels, probabilities for the binary ones."""
        mean_q, _ = self.encode(x)
        out = self.predictor(mean_q[:, : self.code_dim])
        k = self.predictor.n_continuous
        return torch.cat([out[:, :k], torch.sigmoid(out[:, k:])], dim=1)
