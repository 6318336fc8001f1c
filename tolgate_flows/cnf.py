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

RNODE's regularisers (Finlay et al. 2020; weights and normalisation in :mod:`.levers`) ride along
as extra state, ``(z, logp, K, B)``, only when a block is asked for them and only in training
mode. ``B``, the Jacobian's squared Frobenius norm, reuses the trace's own work: under Hutchinson
the VJP ``eps^T df/dz`` with the solve's noise (one draw per solve, as for the trace, so ``B`` is
the exact integral of ``||eps^T df/dz||^2`` for that draw); under the exact divergence the
Jacobian's rows, already computed for the trace, give the exact norm. STEER draws each training
solve's end time around 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from tolgate import GatedSolver, PerSampleData

Divergence = Literal["hutchinson", "exact"]
Noise = Literal["rademacher", "gaussian"]
DIVERGENCES = ("hutchinson", "exact")
NOISES = ("rademacher", "gaussian")


def noise_vjp(dz: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``eps^T (d dz / d z)``, ``z``'s shape: the one VJP of Hutchinson's estimator."""
    (vjp,) = torch.autograd.grad(dz, z, noise, create_graph=create_graph, materialize_grads=True)
    return vjp


def hutchinson_divergence(dz: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``eps^T (d dz / d z) eps`` per sample, shape ``(batch,)``; ``noise`` has ``z``'s shape."""
    return (noise_vjp(dz, z, noise, create_graph) * noise).flatten(1).sum(dim=1)


def jacobian_rows(dz: torch.Tensor, z: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
    """Row ``i`` of every sample's Jacobian ``d dz / d z``, each ``(batch, D)``: one VJP per dimension.

    Samples are independent (the field acts on each row alone), so summing a column of ``dz``
    over the batch and differentiating gives that row for every sample at once.
    """
    flat = dz.flatten(1)
    rows = []
    for i in range(flat.shape[1]):
        (row,) = torch.autograd.grad(
            flat[:, i].sum(), z, create_graph=create_graph, retain_graph=True, materialize_grads=True
        )
        rows.append(row.flatten(1))
    return rows


def exact_divergence(dz: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``Tr(d dz / d z)`` per sample, shape ``(batch,)``: one VJP per dimension of the state."""
    return _trace(jacobian_rows(dz, z, create_graph))


def _trace(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([row[:, i] for i, row in enumerate(rows)], dim=1).sum(dim=1)


@dataclass(frozen=True)
class Regularisers:
    """RNODE's integrals over one pass, per sample ``(batch,)``, summed over the blocks that carry
    them; ``None`` where no block does (the default, and always in eval mode).

    ``kinetic``: ``int 1/2 mean_d f_d^2 dt``; ``jacobian``: ``int mean_d (eps^T df/dz)_d^2 dt``
    (Hutchinson) or ``int ||df/dz||_F^2 / D dt`` (exact divergence). Units: squared state per unit
    time, per dimension; see :mod:`tolgate_flows.levers` for why.
    """

    kinetic: torch.Tensor | None = None
    jacobian: torch.Tensor | None = None

    def __add__(self, other: Regularisers) -> Regularisers:
        return Regularisers(_plus(self.kinetic, other.kinetic), _plus(self.jacobian, other.jacobian))


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class BlockOutput(NamedTuple):
    """One block's pass: ``z`` ``(batch, *state)``, ``logp`` ``(batch,)`` nats, and the RNODE
    integrals it carried (:class:`Regularisers`)."""

    z: torch.Tensor
    logp: torch.Tensor
    regularisers: Regularisers


class Encoding(NamedTuple):
    """A flow's pass from data to latent: ``z``, ``log_det`` ``(batch,)`` nats (``log|det dz/dx|``)
    and the :class:`Regularisers` summed over its blocks."""

    z: torch.Tensor
    log_det: torch.Tensor
    regularisers: Regularisers


class _AugmentedDynamics(nn.Module):
    """``(t, (z, logp[, K][, B])) -> (f, -Tr(df/dz)[, 1/2 mean f^2][, mean (eps^T df/dz)^2])``
    for one solve, holding that solve's noise. ``kinetic``/``jacobian``: carry ``K``/``B``.

    A fresh instance per solve, so the adjoint solve (run later by autograd) sees the same
    noise even if the block has been called again in between.

    An index-aware field (``takes_sample_index``): every backend calls it as ``(t, state, idx)``.
    Under torchdiffeq ``t`` is a scalar and ``idx`` every row; under the per-sample backend
    (``GatedSolver(backend="per_sample")``) ``t`` is ``(active,)`` and ``idx`` the rows still
    integrating: the noise follows its sample through ``noise[idx]`` and each row sees its own time.
    """

    takes_sample_index = True

    def __init__(
        self,
        odefunc: nn.Module,
        divergence: Divergence,
        noise: torch.Tensor | None,
        kinetic: bool = False,
        jacobian: bool = False,
    ) -> None:
        super().__init__()
        self.odefunc = odefunc
        self.divergence = divergence
        self.noise = None if noise is None else PerSampleData(noise)
        self.kinetic = kinetic
        self.jacobian = jacobian

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...], idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
                rows = jacobian_rows(dz, z, create_graph)
                div = _trace(rows)
                frobenius = sum(row.square().sum(dim=1) for row in rows) if self.jacobian else None
            else:
                vjp = noise_vjp(dz, z, noise, create_graph)
                div = (vjp * noise).flatten(1).sum(dim=1)
                frobenius = vjp.flatten(1).square().sum(dim=1) if self.jacobian else None
        derivatives = [dz, -div]
        dims = math.prod(z.shape[1:])
        if self.kinetic:
            derivatives.append(0.5 * dz.flatten(1).square().sum(dim=1) / dims)
        if frobenius is not None:
            derivatives.append(frobenius / dims)
        if not create_graph:
            derivatives = [d.detach() for d in derivatives]
        return tuple(derivatives)


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
        kinetic, jacobian: in training mode, carry RNODE's kinetic-energy / Jacobian-Frobenius
            integral as extra state and return it (:meth:`solve`); see :class:`Regularisers`.
        steer: STEER's half-width ``b`` in ``[0, 1)``: in training mode each solve ends at
            ``T ~ Uniform(1 - b, 1 + b)`` (one draw per solve, from torch's global generator);
            in eval mode, and in :meth:`transport` (decoding, sampling), always at ``T = 1``.
    """

    def __init__(
        self,
        odefunc: nn.Module,
        solver: GatedSolver,
        divergence: Divergence = "hutchinson",
        noise: Noise = "rademacher",
        kinetic: bool = False,
        jacobian: bool = False,
        steer: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(solver, GatedSolver):
            raise TypeError(f"solver must be a tolgate.GatedSolver, got {type(solver).__name__}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        if not (isinstance(steer, (int, float)) and not isinstance(steer, bool) and 0 <= steer < 1):
            raise ValueError(f"steer (STEER's half-width b) must be in [0, 1), got {steer!r}")
        self.odefunc = odefunc
        self.solver = solver
        self.divergence = divergence
        self.noise = noise
        self.kinetic = bool(kinetic)
        self.jacobian = bool(jacobian)
        self.steer = float(steer)

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
        (from 1 to 0 when ``reverse``; to STEER's ``T`` instead of 1 in training). If ``logp`` is
        the log-density (nats) of ``z``, the output is the log-density of ``z_out`` under the
        transported distribution; with the default zeros it is ``-log|det dz_out/dz|``.
        :meth:`solve` also returns the RNODE integrals.
        """
        out = self.solve(z, logp, reverse)
        return out.z, out.logp

    def solve(self, z: torch.Tensor, logp: torch.Tensor | None = None, reverse: bool = False) -> BlockOutput:
        """:meth:`forward`, with the RNODE integrals the block carries (``(batch,)`` each, positive
        in either direction; ``None`` in eval mode or when not asked for)."""
        if logp is None:
            logp = z.new_zeros(z.shape[0])
        if logp.shape != (z.shape[0],):
            raise ValueError(f"logp must have shape (batch,) = ({z.shape[0]},), got {tuple(logp.shape)}")
        noise = self._draw_noise(z) if self.divergence == "hutchinson" else None
        kinetic, jacobian = self.training and self.kinetic, self.training and self.jacobian
        dynamics = _AugmentedDynamics(self.odefunc, self.divergence, noise, kinetic, jacobian)
        end = self._end_time()
        times = torch.tensor([end, 0.0] if reverse else [0.0, end], dtype=z.dtype, device=z.device)
        extra = [logp.new_zeros(z.shape[0]) for wanted in (kinetic, jacobian) if wanted]
        states = self.solver(dynamics, (z, logp, *extra), times, context=z)
        z_out, logp_out, *carried = (state[-1] for state in states)
        if reverse:  # integrated from T to 0, the extra states end at minus the integral
            carried = [-value for value in carried]
        kinetic_value = carried.pop(0) if kinetic else None
        jacobian_value = carried.pop(0) if jacobian else None
        return BlockOutput(z_out, logp_out, Regularisers(kinetic_value, jacobian_value))

    def _end_time(self) -> float:
        """1, or in training with STEER a draw from ``Uniform(1 - steer, 1 + steer)``."""
        if not (self.training and self.steer > 0):
            return 1.0
        return 1.0 + self.steer * (2.0 * float(torch.rand(())) - 1.0)

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
        levers = (("kinetic", self.kinetic), ("jacobian", self.jacobian), ("steer", self.steer))
        shown = "".join(f", {name}={value!r}" for name, value in levers if value)
        return f"divergence={self.divergence!r}, noise={self.noise!r}{shown}"
