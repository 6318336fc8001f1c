"""CNF, CCNF and InfoCNF on vectors (the 1-D and 2-D testbeds): a stack of CNF blocks, exact trace.

The three kinds of :mod:`.models`, built for ``(batch, dim)`` data from :mod:`.conditioning`'s
parts (the image model is tied to the multiscale architecture and to bits/dim):

* ``"cnf"``: prior ``N(0, I)``.
* ``"ccnf"``: ``z_y = z``: a class-conditional diagonal Gaussian on the whole latent
  (:class:`~tolgate_flows.conditioning.ClassConditionalGaussian`, zero-initialised, so ``N(0, I)``
  at the start) and a linear classifier ``p(y | z)``.
* ``"infocnf"``: the same on the first ``max(1, dim // 2)`` dimensions ``z_y``; the rest ``z_u``
  is standard normal.

The trace is exact (one vector-Jacobian product per dimension: cheap in one or two dimensions),
so there is no Hutchinson noise: a solve's log-density depends on the data and the tolerance
alone, which is what a study of solver error needs. Densities are in nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tolgate import GatedSolver, TolerancePolicy

from .cnf import CNFBlock, Encoding, Regularisers
from .conditioning import (
    ClassConditionalGaussian,
    ConditionedLatent,
    LatentClassifier,
    LatentSplit,
)
from .levers import LeverConfig, block_kwargs, check_compatible, seminorm_options, solver_kwargs
from .models import DEFAULT_EVAL_POLICY, MODEL_KINDS, ModelKind, PolicyFactory
from .odefuncs import TIME_EMBEDDINGS, MLPODENet, TimeEmbedding


@dataclass
class VectorFlowConfig:
    """Everything that defines a :class:`VectorFlow` except its tolerance policies.

    ``n_blocks`` CNF blocks, each with an :class:`~tolgate_flows.odefuncs.MLPODENet` field of
    ``n_layers`` hidden layers of width ``hidden``. ``n_classes``: needed (>= 2) by the
    conditional kinds. ``dropout``: the classifier's; 0 by default, since dropping half of a
    one-dimensional ``z_y`` blinds the classifier half the time. ``max_num_steps``: step budget
    per solve (a diverging solve raises :class:`~tolgate.StepBudgetExceeded` instead of hanging).
    ``adjoint``: backward pass by the adjoint method; ``seminorm``: its error norm ignores the
    parameters' adjoint (Kidger et al. 2021; needs ``adjoint``). ``levers``: RNODE, solver
    penalties, STEER, fixed-grid training (:mod:`.levers`); with ``levers.train_method``,
    ``method`` is the evaluation method.
    """

    kind: ModelKind = "cnf"
    dim: int = 2
    n_classes: int = 0
    n_blocks: int = 2
    hidden: int = 32
    n_layers: int = 2
    time_embedding: TimeEmbedding = "concat"
    method: str = "dopri5"
    max_num_steps: int | None = 1000
    dropout: float = 0.0
    adjoint: bool = False
    seminorm: bool = False
    levers: LeverConfig = field(default_factory=LeverConfig)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {self.time_embedding!r}")
        for name in ("dim", "n_blocks", "hidden", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.kind != "cnf" and self.n_classes < 2:
            raise ValueError(f"a {self.kind} model needs n_classes >= 2, got {self.n_classes}")
        if self.seminorm and not self.adjoint:
            raise ValueError("seminorm applies to the adjoint solve: set adjoint as well")
        if not isinstance(self.levers, LeverConfig):
            raise TypeError(f"levers must be a LeverConfig, got {type(self.levers).__name__}")
        check_compatible(self.levers, adjoint=self.adjoint, per_sample=False)

    @property
    def zy_dims(self) -> int:
        """Size of the supervised code: 0 (cnf), ``dim`` (ccnf), ``max(1, dim // 2)`` (infocnf)."""
        return {"cnf": 0, "ccnf": self.dim, "infocnf": max(1, self.dim // 2)}[self.kind]


@dataclass
class VectorOutput:
    """What :meth:`VectorFlow.forward` returns. ``z``: ``(B, dim)``; ``log_px``: ``(B,)`` nats,
    ``log p(x | y)`` (``log p(x)`` for cnf); ``log_det``: ``(B,)`` ``log |det dz/dx|``;
    ``logits``: ``(B, n_classes)`` of ``p(y | z_y)``, ``None`` for cnf; ``regularisers``: RNODE's
    integrals ``(B,)`` summed over the blocks where the levers ask for them (training mode)."""

    z: torch.Tensor
    log_px: torch.Tensor
    log_det: torch.Tensor
    logits: torch.Tensor | None
    regularisers: Regularisers = field(default_factory=Regularisers)


class VectorFlow(ConditionedLatent, nn.Module):
    """``n_blocks`` CNF blocks from data ``x`` to latent ``z``, then the kind's prior and classifier.
    Build with :func:`build_vector_flow`."""

    def __init__(self, config: VectorFlowConfig, blocks: list[CNFBlock]) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(blocks)
        self.latent_split = LatentSplit(config.dim, config.zy_dims, "first-scale")
        self.conditional = config.kind != "cnf"
        if self.conditional:
            self.prior = ClassConditionalGaussian(config.n_classes, config.zy_dims)
            self.classifier = LatentClassifier(config.zy_dims, config.n_classes, config.dropout)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, dim)`` -> ``(z (B, dim), log |det dz/dx| (B,))``, one solve per block."""
        encoding = self.transform(x)
        return encoding.z, encoding.log_det

    def transform(self, x: torch.Tensor) -> Encoding:
        """:meth:`encode`, with the RNODE integrals summed over the blocks."""
        z, logp, regularisers = x, x.new_zeros(x.shape[0]), Regularisers()
        for block in self.blocks:
            z, logp, carried = block.solve(z, logp)
            regularisers += carried
        return Encoding(z, -logp, regularisers)  # each block subtracts its trace integral, i.e. adds -log|det|

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> VectorOutput:
        """``x``: ``(B, dim)``; ``y``: ``(B,)`` int64 labels (conditional kinds; ignored by cnf)."""
        if x.dim() != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"x must have shape (batch, {self.config.dim}), got {tuple(x.shape)}")
        if self.conditional:
            self._check_labels(y, x.shape[0])
        z, log_det, regularisers = self.transform(x)
        log_pz, logits = self.latent_log_prob(z, y)
        return VectorOutput(z=z, log_px=log_pz + log_det, log_det=log_det, logits=logits, regularisers=regularisers)

    def objective(self, out: VectorOutput, y: torch.Tensor | None, beta: float) -> torch.Tensor:
        """Per-sample training objective ``(B,)`` nats: ``-log p(x | y) + beta * CE(p(y | z_y), y)``
        (cnf: the negative log-likelihood alone)."""
        nll = -out.log_px
        if out.logits is None:
            return nll
        self._check_labels(y, out.logits.shape[0])
        return nll + beta * F.cross_entropy(out.logits, y, reduction="none")


def build_vector_flow(
    config: VectorFlowConfig,
    policy_factory: PolicyFactory,
    eval_policy: TolerancePolicy | None = DEFAULT_EVAL_POLICY,
) -> VectorFlow:
    """The model of ``config``; ``policy_factory(block_index, dim)`` gives each block's training
    policy (its gate reads the block's input), ``eval_policy`` every solver's evaluation policy.

    The vector fields are built before any policy, so under one ``torch.manual_seed`` every
    tolerance mode starts from the same flow (a gate network draws its weights after them), and
    runs that differ only in the tolerance share their initial weights (common random numbers).
    The prior and classifier are zero-initialised and need no such care.
    """
    odefuncs = [
        MLPODENet(config.dim, config.hidden, config.n_layers, config.time_embedding) for _ in range(config.n_blocks)
    ]
    adjoint_options = seminorm_options(config.max_num_steps) if config.seminorm else None
    blocks = [
        CNFBlock(
            odefunc,
            GatedSolver(
                **solver_kwargs(config.levers, policy_factory(index, config.dim), config.method),
                adjoint=config.adjoint,
                adjoint_options=adjoint_options,
                max_num_steps=config.max_num_steps,
                eval_policy=eval_policy,
            ),
            divergence="exact",
            **block_kwargs(config.levers),
        )
        for index, odefunc in enumerate(odefuncs)
    ]
    return VectorFlow(config, blocks)


@torch.no_grad()
def density_integral(model: VectorFlow, low: float, high: float, points: int) -> float:
    """Midpoint-rule integral of the model's density ``p(x)`` (the class mixture for conditional
    kinds) over the box ``[low, high]^dim``, ``points`` per axis, the whole grid in one solve.

    Solved at whatever tolerance the solvers use now: in eval mode their ``eval_policy``, or an
    override from :func:`tolgate.use_policies`. torchdiffeq's error norm is the RMS over the
    batch, so the grid's step sizes are chosen for the grid as a whole.
    """
    if points < 2 or not high > low:
        raise ValueError(f"need points >= 2 and high > low, got points={points}, box=({low}, {high})")
    param = next(model.parameters())
    step = (high - low) / points
    axis = low + step * (torch.arange(points, dtype=param.dtype, device=param.device) + 0.5)
    grid = torch.cartesian_prod(*[axis] * model.config.dim).reshape(-1, model.config.dim)
    labels = None if not model.conditional else torch.zeros(grid.shape[0], dtype=torch.int64, device=grid.device)
    log_px = model.marginal_log_px(model(grid, labels))
    return float(log_px.exp().sum()) * step**model.config.dim
