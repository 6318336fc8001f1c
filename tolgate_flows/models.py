"""Unconditional CNF, CCNF and InfoCNF on the multiscale flow, and the loss of Eq. 4.

One code path serves all three kinds: the canonical latent ``z`` is split into a supervised
code ``z_y`` (class-conditional Gaussian prior, classifier) and an unsupervised code ``z_u``
(standard normal prior):

* ``"cnf"``: ``z_y`` empty; prior ``N(0, I)``; no classifier (``logits`` is ``None``).
* ``"ccnf"``: ``z_y = z`` (Eq. 3: conditional prior and classifier on the whole latent).
* ``"infocnf"``: ``z_y`` is ``round(zy_fraction * dims)`` dimensions at ``zy_location``
  (see :class:`~tolgate_flows.conditioning.LatentSplit`). With ``zy_fraction = 1`` it is
  CCNF, parameter for parameter.

Densities are of the dequantized image ``x`` in ``[0,1]^D`` and in nats; :func:`bits_per_dim`
converts them to bits per dimension of the data's discrete levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tolgate import GatedSolver, TolerancePolicy
from tolgate.solver import DEFAULT_EVAL_POLICY  # Section 4.2: evaluate at a fixed tight tolerance

from .cnf import DIVERGENCES, NOISES, CNFBlock, Divergence, Noise, Regularisers
from .conditioning import (
    ZY_LOCATIONS,
    ClassConditionalGaussian,
    ConditionedLatent,
    LatentClassifier,
    LatentSplit,
    ZyLocation,
)
from .data import bits_per_dim
from .levers import LeverConfig, block_kwargs, check_compatible, solver_kwargs
from .multiscale import ImageShape, MultiscaleFlow, default_n_scales
from .odefuncs import TIME_EMBEDDINGS, ConvODENet, TimeEmbedding

ModelKind = Literal["cnf", "ccnf", "infocnf"]
MODEL_KINDS = ("cnf", "ccnf", "infocnf")
# policy_factory(block_index, in_channels) -> the tolerance policy of that block's GatedSolver.
PolicyFactory = Callable[[int, int], TolerancePolicy]


@dataclass
class ModelConfig:
    """Everything that defines a :class:`FlowModel` except its tolerance policies.

    ``n_scales=None`` adapts to the image (8x8: 2, 28x28: 3, 32x32: 4). ``n_flows`` CNF blocks
    sit on each side of every squeeze. ``zy_fraction``/``zy_location`` apply to ``"infocnf"``
    only. ``odefunc_layers`` hidden convs of width ``hidden`` per block's field.
    ``max_num_steps``: step budget per solve (None: unlimited). ``backend``: ``"torchdiffeq"``
    (one step size per batch) or ``"tolgate"`` (every sample its own step size and tolerance).
    ``levers``: RNODE, solver penalties, STEER, fixed-grid training (:mod:`.levers`); with
    ``levers.train_method``, ``method`` is the evaluation method.
    """

    kind: ModelKind = "infocnf"
    image_shape: ImageShape = (1, 8, 8)
    n_classes: int = 10
    n_scales: int | None = None
    n_flows: int = 2
    hidden: int = 64
    odefunc_layers: int = 3
    time_embedding: TimeEmbedding = "concat"
    divergence: Divergence = "hutchinson"
    noise: Noise = "rademacher"
    zy_fraction: float = 0.5
    zy_location: ZyLocation = "first-scale"
    method: str = "dopri5"
    adjoint: bool = False
    max_num_steps: int | None = None
    backend: str = "torchdiffeq"
    logit_alpha: float = 1e-6
    dropout: float = 0.5
    levers: LeverConfig = field(default_factory=LeverConfig)

    def __post_init__(self) -> None:
        self.image_shape = tuple(self.image_shape)
        if not isinstance(self.levers, LeverConfig):
            raise TypeError(f"levers must be a LeverConfig, got {type(self.levers).__name__}")
        check_compatible(self.levers, adjoint=self.adjoint, per_sample=self.backend in ("per_sample", "tolgate"))
        _check_choice("kind", self.kind, MODEL_KINDS)
        _check_choice("time_embedding", self.time_embedding, TIME_EMBEDDINGS)
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check_choice("noise", self.noise, NOISES)
        _check_choice("zy_location", self.zy_location, ZY_LOCATIONS)
        if self.kind != "cnf" and self.n_classes < 2:
            raise ValueError(f"a conditional model needs n_classes >= 2, got {self.n_classes}")
        if not 0.0 < self.zy_fraction <= 1.0:
            raise ValueError(f"zy_fraction must be in (0, 1], got {self.zy_fraction!r}")

    @property
    def dims(self) -> int:
        return math.prod(self.image_shape)

    @property
    def resolved_n_scales(self) -> int:
        return default_n_scales(self.image_shape) if self.n_scales is None else self.n_scales

    @property
    def zy_dims(self) -> int:
        """Size of the supervised code: 0 (cnf), ``dims`` (ccnf), ``round(zy_fraction * dims)`` (infocnf)."""
        if self.kind == "cnf":
            return 0
        if self.kind == "ccnf":
            return self.dims
        return max(1, round(self.zy_fraction * self.dims))


@dataclass
class FlowOutput:
    """What :meth:`FlowModel.forward` returns.

    z: ``(B, dims)``, every latent dimension in the canonical order of
        :mod:`tolgate_flows.multiscale` (first scale's factor-out first, top scale last).
    log_px: ``(B,)`` nats, ``log p(x | y)`` for conditional models (``log p(x)`` for ``cnf``):
        the density of the dequantized ``x`` in ``[0,1]^D``, logit log-det included.
    log_det: ``(B,)`` nats, ``log |det dz/dx|`` including the logit transform.
    logits: ``(B, n_classes)``, the classifier on ``z_y`` (infocnf) or ``z`` (ccnf); ``None`` for cnf.
    regularisers: RNODE's integrals ``(B,)`` summed over the blocks, where the levers ask for them
        (training mode only); the training loss adds them (:func:`tolgate_flows.levers.with_penalties`).
    """

    z: torch.Tensor
    log_px: torch.Tensor
    log_det: torch.Tensor
    logits: torch.Tensor | None
    regularisers: Regularisers = field(default_factory=Regularisers)


@dataclass
class LossParts:
    """The terms of Eq. 4, detached, shape ``()``: ``bits_per_dim`` of x given y (bits per
    dimension) and ``cross_entropy`` (nats; ``None`` for cnf)."""

    bits_per_dim: torch.Tensor
    cross_entropy: torch.Tensor | None


class FlowModel(ConditionedLatent, nn.Module):
    """A multiscale CNF with an unconditional, CCNF or InfoCNF prior; build with :func:`build_model`."""

    def __init__(self, config: ModelConfig, flow: MultiscaleFlow) -> None:
        super().__init__()
        self.config = config
        self.dims = config.dims
        self.flow = flow
        self.latent_split = LatentSplit(self.dims, config.zy_dims, config.zy_location)
        self.conditional = config.kind != "cnf"
        if self.conditional:
            self.prior = ClassConditionalGaussian(config.n_classes, config.zy_dims)
            self.classifier = LatentClassifier(config.zy_dims, config.n_classes, config.dropout)

    @property
    def blocks(self) -> list[CNFBlock]:
        """The CNF blocks in network order (their ``.solver`` are the model's GatedSolvers)."""
        return self.flow.blocks

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, C, H, W)`` in ``[0,1]`` -> ``(z (B, dims), log|det dz/dx| (B,))``."""
        return self.flow(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``(B, dims)`` canonical order -> ``x`` ``(B, C, H, W)`` (solved backwards)."""
        return self.flow.inverse(z)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> FlowOutput:
        """``x``: ``(B, C, H, W)`` dequantized, in ``[0,1]``; ``y``: ``(B,)`` int64 labels
        (required for conditional kinds, ignored for cnf)."""
        if self.conditional:
            self._check_labels(y, x.shape[0])
        z, log_det, regularisers = self.flow.encode(x)
        log_pz, logits = self.latent_log_prob(z, y)
        return FlowOutput(z=z, log_px=log_pz + log_det, log_det=log_det, logits=logits, regularisers=regularisers)

    def loss(self, out: FlowOutput, y: torch.Tensor | None, beta: float, levels: int) -> tuple[torch.Tensor, LossParts]:
        """Eq. 4: ``J = bits/dim of x given y + beta * cross-entropy``, shape ``()``.

        The first term is the batch mean of :func:`bits_per_dim` (bits per dimension, with
        ``levels`` discrete values per dimension); the cross-entropy of the classifier is the
        batch mean in nats (the original code's mix of units, kept so ``beta`` means the same).
        For cnf, ``J`` is the bits/dim alone and ``y``/``beta`` are ignored.
        """
        bpd = bits_per_dim(out.log_px, self.dims, levels).mean()
        if out.logits is None:
            return bpd, LossParts(bits_per_dim=bpd.detach(), cross_entropy=None)
        self._check_labels(y, out.logits.shape[0])
        cross_entropy = F.cross_entropy(out.logits, y)
        return bpd + beta * cross_entropy, LossParts(bpd.detach(), cross_entropy.detach())

    @torch.no_grad()
    def sample(self, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Class-conditional samples ``(B, C, H, W)`` in ``[0,1]`` for labels ``y`` ``(B,)``.

        ``z_y ~ N(mu(y), (temperature sigma(y))^2)``, ``z_u ~ N(0, temperature^2 I)``, then the
        flow is solved backwards. For cnf ``y`` only sets the batch size. The tolerance is the
        solvers' current mode's (call ``model.eval()`` for the evaluation tolerance).
        """
        batch = y.shape[0]
        param = next(self.parameters())
        z_u = temperature * torch.randn(
            batch, self.dims - self.latent_split.zy_dims, device=param.device, dtype=param.dtype
        )
        if self.conditional:
            self._check_labels(y, batch)
            z_y = self.prior.sample(y.to(param.device), temperature)
        else:
            z_y = z_u.new_zeros(batch, 0)
        x = self.decode(self.latent_split.merge(z_y, z_u))
        return x.clamp(0.0, 1.0)


def build_model(
    config: ModelConfig,
    policy_factory: PolicyFactory,
    eval_policy: TolerancePolicy | None = DEFAULT_EVAL_POLICY,
) -> FlowModel:
    """Build the model of ``config``, one :class:`~tolgate.GatedSolver` per CNF block.

    ``policy_factory(block_index, in_channels)`` gives each block's training policy (e.g.
    ``lambda i, c: GaussianGate(ConvGate(c))``); blocks are numbered in network order, data side
    first, so ``tolgate.gated_solvers(model)`` yields their solvers in that order. The gate of
    a block reads that block's input. ``eval_policy`` is every solver's evaluation policy
    (``None``: the training policy's deterministic choice). ``config.levers`` set the blocks'
    RNODE integrals and STEER and the solvers' training method and penalties (:mod:`.levers`).
    """

    def make_block(index: int, shape: ImageShape) -> CNFBlock:
        channels = shape[0]
        solver = GatedSolver(
            **solver_kwargs(config.levers, policy_factory(index, channels), config.method),
            adjoint=config.adjoint,
            max_num_steps=config.max_num_steps,
            eval_policy=eval_policy,
            backend=config.backend,
        )
        odefunc = ConvODENet(channels, config.hidden, config.odefunc_layers, config.time_embedding)
        return CNFBlock(
            odefunc, solver, divergence=config.divergence, noise=config.noise, **block_kwargs(config.levers)
        )

    flow = MultiscaleFlow(
        config.image_shape, config.resolved_n_scales, config.n_flows, make_block, alpha=config.logit_alpha
    )
    return FlowModel(config, flow)


def set_divergence(model: nn.Module, mode: Divergence) -> None:
    """Switch every CNF block in ``model`` to ``"exact"`` or ``"hutchinson"`` divergence."""
    if mode not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {mode!r}")
    for module in model.modules():
        if isinstance(module, CNFBlock):
            module.divergence = mode


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
