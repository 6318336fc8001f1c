"""Priors over the latent and the classifier on it (Eq. 3-5 of the paper).

* :class:`ClassConditionalGaussian`: ``N(mu(y), sigma(y)^2)``, diagonal, with
  ``(mu, log sigma) = q_phi(one_hot(y))`` a zero-initialised linear map (Glow's ``LinearZeros``:
  its output is scaled by ``exp(3 * log_scale)`` with a learnable per-output ``log_scale``,
  which lets the prior move fast once the map has learned a direction). At initialisation the
  prior is ``N(0, I)`` for every class.
* :class:`LatentClassifier`: ``q_theta``, dropout (p = 0.5) and a zero-initialised linear layer.
* :class:`LatentSplit`: which contiguous slice of the canonical latent (see
  :mod:`tolgate_flows.multiscale`) is the supervised code ``z_y``; the rest is ``z_u``.

The standard normal log-density is :func:`standard_normal_log_prob`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ZyLocation = Literal["first-scale", "top-scale"]
ZY_LOCATIONS = ("first-scale", "top-scale")
_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the last dim: ``(B, d) -> (B,)`` nats (zeros when ``d = 0``)."""
    return -0.5 * (z**2 + _LOG_2PI).sum(dim=-1)


def diagonal_normal_log_prob(z: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``log N(z; mean, exp(log_scale)^2)`` summed over the last dim (broadcasting), nats."""
    return -0.5 * (((z - mean) * torch.exp(-log_scale)) ** 2 + 2 * log_scale + _LOG_2PI).sum(dim=-1)


class LinearZeros(nn.Linear):
    """Glow's zero-initialised linear layer: ``(W x + b) * exp(logscale_factor * log_scale)``."""

    def __init__(self, in_features: int, out_features: int, logscale_factor: float = 3.0) -> None:
        super().__init__(in_features, out_features)
        self.logscale_factor = logscale_factor
        self.log_scale = nn.Parameter(torch.zeros(out_features))
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.exp(self.log_scale * self.logscale_factor)


class ClassConditionalGaussian(nn.Module):
    """``p(z_y | y) = N(mu(y), sigma(y)^2)`` over ``dim`` dimensions, ``q_phi`` a :class:`LinearZeros`."""

    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        if n_classes < 2 or dim < 1:
            raise ValueError(f"need n_classes >= 2 and dim >= 1, got n_classes={n_classes}, dim={dim}")
        self.n_classes, self.dim = n_classes, dim
        self.encoder = LinearZeros(n_classes, 2 * dim)

    def parameters_for(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_scale)``, each ``(B, dim)``, for labels ``y`` ``(B,)`` int64."""
        out = self.encoder(F.one_hot(y, self.n_classes).to(self.encoder.weight.dtype))
        return out[:, : self.dim], out[:, self.dim :]

    def log_prob(self, z_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log p(z_y | y)``: ``z_y`` ``(B, dim)``, ``y`` ``(B,)`` -> ``(B,)`` nats."""
        mean, log_scale = self.parameters_for(y)
        return diagonal_normal_log_prob(z_y, mean, log_scale)

    def log_prob_all_classes(self, z_y: torch.Tensor) -> torch.Tensor:
        """``log p(z_y | y = k)`` for every class: ``(B, dim) -> (B, n_classes)`` nats."""
        classes = torch.arange(self.n_classes, device=z_y.device)
        mean, log_scale = self.parameters_for(classes)
        return diagonal_normal_log_prob(z_y[:, None, :], mean[None], log_scale[None])

    def sample(self, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Draw ``z_y ~ N(mu(y), (temperature * sigma(y))^2)``, shape ``(B, dim)``."""
        mean, log_scale = self.parameters_for(y)
        return mean + temperature * torch.exp(log_scale) * torch.randn_like(mean)


class LatentClassifier(nn.Module):
    """``q_theta(y | z_y)``: dropout, then a zero-initialised linear layer.

    ``z_y``: ``(B, dim)``; returns logits ``(B, n_classes)``.
    """

    def __init__(self, dim: int, n_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, n_classes)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, z_y: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(z_y))


class LatentSplit:
    """Split the canonical latent ``z`` ``(B, dims)`` into ``(z_y, z_u)`` and merge them back.

    ``z_y`` is a contiguous slice of ``zy_dims`` dimensions: the first ones for
    ``"first-scale"`` (the canonical order starts with the first scale's factor-out, so with
    ``zy_dims = dims / 2`` this is exactly that factor-out, as in the original InfoCNF code), the
    last ones for ``"top-scale"`` (the canonical order ends with the top scale's latent, so with
    ``zy_dims`` equal to the top scale's size this is conditional Glow's choice; a larger
    ``zy_dims`` extends ``z_y`` into the scales below).
    """

    def __init__(self, dims: int, zy_dims: int, location: ZyLocation) -> None:
        if location not in ZY_LOCATIONS:
            raise ValueError(f"zy_location must be one of {ZY_LOCATIONS}, got {location!r}")
        if not 0 <= zy_dims <= dims:
            raise ValueError(f"zy_dims must be in [0, {dims}], got {zy_dims}")
        self.dims, self.zy_dims, self.location = dims, zy_dims, location
        start = 0 if location == "first-scale" else dims - zy_dims
        self.zy_slice = slice(start, start + zy_dims)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_y (B, zy_dims), z_u (B, dims - zy_dims))``."""
        z_y = z[:, self.zy_slice]
        z_u = torch.cat([z[:, : self.zy_slice.start], z[:, self.zy_slice.stop :]], dim=1)
        return z_y, z_u

    def merge(self, z_y: torch.Tensor, z_u: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        start = self.zy_slice.start
        return torch.cat([z_u[:, :start], z_y, z_u[:, start:]], dim=1)


class ConditionedLatent:
    """The latent side shared by the image and vector flows (a mixin of their ``nn.Module``).

    Needs ``latent_split``, ``prior``, ``classifier``, ``conditional`` and ``config.n_classes`` on
    the model. ``z_u`` has a standard normal prior; for conditional kinds ``z_y`` has the class
    prior and feeds the classifier. Outputs carry ``z``, ``log_px`` and ``log_det`` (nats).
    """

    def _check_labels(self, y: torch.Tensor | None, batch: int) -> None:
        """``ValueError`` unless ``y`` is an int64 ``(batch,)`` tensor of classes in ``[0, n_classes)``."""
        if y is None or y.shape != (batch,) or y.dtype != torch.int64:
            got = None if y is None else f"{y.dtype} {tuple(y.shape)}"
            raise ValueError(f"a {self.config.kind} model needs int64 labels y of shape ({batch},), got {got}")
        if bool((y < 0).any()) or bool((y >= self.config.n_classes).any()):
            raise ValueError(f"labels must be in [0, {self.config.n_classes}), got values {y.unique().tolist()}")

    def latent_log_prob(self, z: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log p(z | y) (B,), logits (B, n_classes) or None)`` of the latent ``z`` ``(B, dims)``."""
        z_y, z_u = self.latent_split.split(z)
        log_pz = standard_normal_log_prob(z_u)
        if not self.conditional:
            return log_pz, None
        return log_pz + self.prior.log_prob(z_y, y), self.classifier(z_y)

    def log_px_all_classes(self, out) -> torch.Tensor:
        """``log p(x | y = k)`` for every class, ``(B, n_classes)`` nats, from one forward's output.

        The flow is shared by all classes, only the prior of ``z_y`` changes, so no re-solve.
        For cnf every column is ``log p(x)``.
        """
        if not self.conditional:
            return out.log_px[:, None].expand(-1, self.config.n_classes)
        z_y, z_u = self.latent_split.split(out.z)
        shared = standard_normal_log_prob(z_u) + out.log_det
        return self.prior.log_prob_all_classes(z_y) + shared[:, None]

    def marginal_log_px(self, out) -> torch.Tensor:
        """``log sum_k p(x | k) p(k)``, uniform ``p(k) = 1/n_classes``: ``(B,)`` nats (cnf: ``log_px``)."""
        if not self.conditional:
            return out.log_px
        return torch.logsumexp(self.log_px_all_classes(out), dim=1) - math.log(self.config.n_classes)
