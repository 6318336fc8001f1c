"""One continuous normalizing flow block: the state ``(z, logp)`` solved through a GatedSolver.

Eq. 2 of the paper: along ``dz/dt = f(t, z)`` the log-density changes as
``d logp / dt = -Tr(df/dz)``. :class:`CNFBlock` integrates both from ``t = 0`` to ``t = 1``
(data side to latent side; ``reverse=True`` integrates from 1 to 0), FFJORD style.

The trace is either exact (one vector-Jacobian product per dimension: for small states and
evaluation checks) or Hutchinson's estimate ``eps^T (df/dz) eps`` with ``E[eps eps^T] = I``.
The noise ``eps`` is drawn once per solve and held fixed for that solve, including its adjoint
solve: then the estimate is the exact trace integral of one fixed quadratic form, a smooth
function of time the adaptive solver can integrate. Re-drawing it at every evaluation makes the
integrand white noise, and the step-size controller answers with exploding NFE.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tolgate import GatedSolver, PerSampleData

Divergence = Literal["hutchinson", "exact"]
Noise = Literal["rademacher", "gaussian"]
DIVERGENCES = ("hutchinson", "exact")
NOISES = ("rademacher", "gaussian")


def hutchinson_divergence(dz: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``eps^T (d dz / d z) eps`` per sample, shape ``(batch,)``; ``noise`` has ``z``'s shape."""
    (vjp,) = torch.autograd.grad(dz, z, noise, create_graph=create_graph, materialize_grads=True)
    return (vjp * noise).flatten(1).sum(dim=1)


def exact_divergence(dz: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``Tr(d dz / d z)`` per sample, shape ``(batch,)``: one VJP per dimension of the state.

    Samples are independent (the field acts on each row alone), so summing a column of ``dz``
    over the batch and differentiating gives that diagonal entry for every sample at once.
    """
    flat = dz.flatten(1)
    diagonal = []
    for i in range(flat.shape[1]):
        (row,) = torch.autograd.grad(
            flat[:, i].sum(), z, create_graph=create_graph, retain_graph=True, materialize_grads=True
        )
        diagonal.append(row.flatten(1)[:, i])
    return torch.stack(diagonal, dim=1).sum(dim=1)


class _AugmentedDynamics(nn.Module):
    """``(t, (z, logp)) -> (f(t, z), -Tr(df/dz))`` for one solve, holding that solve's noise.

    A fresh instance per solve, so the adjoint solve (run later by autograd) sees the same
    noise even if the block has been called again in between.

    An index-aware field (``takes_sample_index``): every backend calls it as ``(t, state, idx)``.
    Under torchdiffeq ``t`` is a scalar and ``idx`` every row; under the per-sample backend
    (``GatedSolver(backend="per_sample")``) ``t`` is ``(active,)`` and ``idx`` the rows still
    integrating: the noise follows its sample through ``noise[idx]`` and each row sees its own time.
    """

    takes_sample_index = True

    def __init__(self, odefunc: nn.Module, divergence: Divergence, noise: torch.Tensor | None) -> None:
        super().__init__()
        self.odefunc = odefunc
        self.divergence = divergence
        self.noise = None if noise is None else PerSampleData(noise)

    def forward(
        self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = state[0]
        noise = None if self.noise is None else self.noise[idx]
        if t.dim():
            t = per_row_time(t, z)
        # The trace needs autograd even where the caller disabled it (evaluation, the forward
        # pass of the adjoint method); the graph is kept only when the caller will backpropagate.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.odefunc(t, z)
            if self.divergence == "exact":
                div = exact_divergence(dz, z, create_graph)
            else:
                div = hutchinson_divergence(dz, z, noise, create_graph)
        if not create_graph:
            dz, div = dz.detach(), div.detach()
        return dz, -div


def per_row_time(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample times ``(active,)`` shaped ``(active, 1, ...)`` to broadcast against ``z``."""
    return t.reshape(-1, *([1] * (z.dim() - 1)))


class CNFBlock(nn.Module):
    """Integrates ``(z, logp)`` from ``t = 0`` to ``t = 1`` through one :class:`~tolgate.GatedSolver`.

    Args:
        odefunc: ``f(t, z)`` with ``t`` a scalar tensor and ``z`` of shape ``(batch, *state)``.
        solver: the block's GatedSolver; its gate reads the block's input ``z`` (detached by
            the solver).
        divergence: ``"hutchinson"`` or ``"exact"``; an attribute, switchable at evaluation.
        noise: Hutchinson noise, ``"rademacher"`` (+-1) or ``"gaussian"``.
    """

    def __init__(
        self,
        odefunc: nn.Module,
        solver: GatedSolver,
        divergence: Divergence = "hutchinson",
        noise: Noise = "rademacher",
    ) -> None:
        super().__init__()
        if not isinstance(solver, GatedSolver):
            raise TypeError(f"solver must be a tolgate.GatedSolver, got {type(solver).__name__}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        self.odefunc = odefunc
        self.solver = solver
        self.divergence = divergence
        self.noise = noise

    @property
    def divergence(self) -> Divergence:
        return self._divergence

    @divergence.setter
    def divergence(self, mode: Divergence) -> None:
        if mode not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {mode!r}")
        self._divergence = mode

    def forward(
        self, z: torch.Tensor, logp: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow ``z`` ``(batch, *state)`` through the block; ``logp`` ``(batch,)`` defaults to zeros.

        Returns ``(z_out, logp - integral of Tr(df/dz) dt)``, the integral taken from 0 to 1
        (from 1 to 0 when ``reverse``). If ``logp`` is the log-density (nats) of ``z``, the
        output is the log-density of ``z_out`` under the transported distribution; with the
        default zeros it is ``-log|det dz_out/dz|``.
        """
        if logp is None:
            logp = z.new_zeros(z.shape[0])
        if logp.shape != (z.shape[0],):
            raise ValueError(f"logp must have shape (batch,) = ({z.shape[0]},), got {tuple(logp.shape)}")
        noise = self._draw_noise(z) if self.divergence == "hutchinson" else None
        dynamics = _AugmentedDynamics(self.odefunc, self.divergence, noise)
        times = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=z.dtype, device=z.device)
        zs, logps = self.solver(dynamics, (z, logp), times, context=z)
        return zs[-1], logps[-1]

    def transport(self, z: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Flow ``z`` ``(batch, *state)`` through the block without the log-density (no trace):
        half the cost, for decoding and sampling. Same solver, so the solve is recorded."""
        times = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=z.dtype, device=z.device)
        return self.solver(self.odefunc, z, times, context=z)[-1]

    def _draw_noise(self, z: torch.Tensor) -> torch.Tensor:
        if self.noise == "rademacher":
            return torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2 - 1
        return torch.randn_like(z)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, noise={self.noise!r}"
