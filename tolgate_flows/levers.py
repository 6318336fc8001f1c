"""Levers that cut the cost of training a CNF, each off by default: RNODE, solver-aware penalties,
STEER and fixed-grid training. One :class:`LeverConfig` says which are on; this module turns it
into the blocks' and solvers' settings (:func:`block_kwargs`, :func:`solver_kwargs`) and into the
training loss (:func:`with_penalties`), so every entry point applies a lever the same way.

============================  ===================================================================
``kinetic`` (lambda_K)        RNODE (Finlay et al. 2020, "How to train your neural ODE"):
                              ``K = int_0^T 1/2 mean_d f_d(t, z(t))^2 dt`` per sample.
``jacobian`` (lambda_J)       RNODE: ``B = int_0^T mean_d (eps^T df/dz)_d^2 dt`` per sample, with
                              ``eps`` the block's own Hutchinson noise of the solve (its VJP is the
                              one the trace estimate computes anyway), so ``E[B] = int
                              ||df/dz||_F^2 / D dt``; with the exact divergence the Frobenius norm
                              is exact (the Jacobian's rows are computed for the trace already).
``local_error`` (lambda_E)    ERNODE (Pal et al. 2021): ``record.local_error`` of every training
                              solve (:mod:`tolgate.penalties`), summed over the blocks.
``stiffness`` (lambda_S)      SRNODE: ``record.stiffness``, summed over the blocks.
``steer`` (b)                 STEER (Ghosh et al. 2020): in training every solve ends at
                              ``T ~ Uniform(1 - b, 1 + b)``; evaluation at ``T = 1``.
``train_method``              RNODE's protocol: training solves with this fixed-grid torchdiffeq
(``train_step_size``)         method at a constant step (:class:`tolgate.FixedStepSize`); the
                              run's adaptive ``method`` (dopri5) at the fixed evaluation tolerance
                              stays the method of every evaluation (``eval_method``).
============================  ===================================================================

Normalisation. ``K`` and ``B`` follow RNODE's code (``ffjord-rnode``), not its paper's notation:
per dimension (mean over the ``D`` state elements, not the sum, so one ``lambda`` suits MNIST
and CIFAR-10) and ``K`` with the physical 1/2. So RNODE's published ``lambda_K = lambda_J = 0.01``
mean the same here. Both are integrated as extra state of the block's augmented dynamics, only in
training mode and only when their ``lambda > 0``: otherwise the state stays ``(z, logp)`` and
costs nothing. As state they enter an adaptive solver's error norm (as in RNODE), which can add
steps; under RK4 they change nothing but the loss.

The loss (:func:`with_penalties`) is ``J + lambda_K mean_b K_b + lambda_J mean_b B_b +
lambda_E sum_blocks local_error + lambda_S sum_blocks stiffness``: ``K`` and ``B`` per sample
summed over blocks then averaged over the batch (RNODE's choice); the solver penalties summed over
the blocks' training solves (averaged over the batch where a backend gives one per sample).
Evaluation never sees a lever: eval mode solves ``(z, logp)`` to ``T = 1`` with the adaptive
method at the fixed evaluation tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from tolgate import FixedStepSize, SolveRecord, TolerancePolicy
from tolgate.solver import ADAPTIVE_METHODS, FIXED_GRID_METHODS
from tolgate.torchdiffeq_backend import TOLERANCE_METHODS

from .cnf import Regularisers

#: the penalties, in the order metrics report them
PENALTIES = ("kinetic", "jacobian", "local_error", "stiffness")
#: methods ``train_method`` accepts: torchdiffeq's fixed-grid methods whose result the step alone
#: sets (not the implicit Adams ones, whose corrector iterates to a tolerance)
TRAIN_METHODS = tuple(m for m in FIXED_GRID_METHODS if m not in TOLERANCE_METHODS)


@dataclass
class LeverConfig:
    """Which levers a run pulls; every one off by default (see the module docstring).

    ``kinetic``, ``jacobian``, ``local_error``, ``stiffness``: the penalties' weights (lambda >= 0;
    0 is off). ``steer``: STEER's half-width ``b`` in ``[0, 1)`` (0 is off). ``train_method``: a
    fixed-grid method for training solves (``None``: train with the run's adaptive method) at
    ``train_step_size`` (time units, > 0; RNODE: rk4 at 0.25, 4 steps over ``[0, 1]``).
    """

    kinetic: float = 0.0
    jacobian: float = 0.0
    local_error: float = 0.0
    stiffness: float = 0.0
    steer: float = 0.0
    train_method: str | None = None
    train_step_size: float = 0.25

    def __post_init__(self) -> None:
        for name in PENALTIES:
            _check_weight(name, getattr(self, name))
        _check_steer(self.steer)
        _check_train_method(self.train_method)
        _check_step_size(self.train_step_size)

    @property
    def solver_penalties(self) -> bool:
        """Do the solvers fill ``record.local_error`` / ``record.stiffness`` (``penalties=True``)?"""
        return self.local_error > 0 or self.stiffness > 0

    @property
    def weights(self) -> dict[str, float]:
        """``{penalty: lambda}`` for every penalty of :data:`PENALTIES`."""
        return {name: float(getattr(self, name)) for name in PENALTIES}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LeverConfig:
        """Inverse of ``dataclasses.asdict``; keys it does not know are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown lever settings {unknown}; known: {sorted(known)}")
        return cls(**values)


#: LeverConfig's field names (each is also its setting's flat name and flag: ``kinetic``, ``--kinetic``)
LEVER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LeverConfig))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_weight(name: str, value: object) -> None:
    if not (_is_real(value) and value >= 0):
        raise ValueError(f"{name} (a penalty weight lambda) must be finite and >= 0; got {value!r}")


def _check_steer(value: object) -> None:
    if not (_is_real(value) and 0 <= value < 1):
        raise ValueError(f"steer (STEER's half-width b: T ~ Uniform(1 - b, 1 + b)) must be in [0, 1); got {value!r}")


def _check_train_method(method: object) -> None:
    if method is None:
        return
    if method in ADAPTIVE_METHODS:
        raise ValueError(
            f"train_method {method!r} is adaptive; it takes a fixed-grid method ({', '.join(TRAIN_METHODS)}), "
            "or None to train with the run's own method"
        )
    if method not in TRAIN_METHODS:
        why = " (its corrector iterates to a tolerance)" if method in FIXED_GRID_METHODS else ""
        raise ValueError(f"train_method must be one of {', '.join(TRAIN_METHODS)} or None; got {method!r}{why}")


def _check_step_size(value: object) -> None:
    if not (_is_real(value) and value > 0):
        raise ValueError(f"train_step_size must be finite and > 0 (time units); got {value!r}")


def check_compatible(
    levers: LeverConfig, *, adjoint: bool, per_sample: bool, tolerance_mode: str | None = None
) -> None:
    """Refuse levers the rest of a run cannot honour (``ValueError`` naming both settings).

    ``adjoint``: the run solves its backward pass by the adjoint method; ``per_sample``: the
    per-sample backend; ``tolerance_mode``: one of :data:`~tolgate_flows.tolerance.TOLERANCE_MODES`
    (``None``: not known here, not checked).
    """
    if levers.train_method is not None:
        if tolerance_mode not in (None, "fixed"):
            raise ValueError(
                f"train_method {levers.train_method!r} trains on a fixed grid, which has no tolerance to "
                f"schedule, learn or adapt: it needs tolerance mode 'fixed', got {tolerance_mode!r}"
            )
        if per_sample:
            raise ValueError(
                f"train_method {levers.train_method!r} is a torchdiffeq fixed-grid method; the per-sample backend "
                "has adaptive methods only"
            )
    if levers.solver_penalties:
        if tolerance_mode in ("auto", "auto-learned"):
            raise ValueError(
                "local_error / stiffness penalties come from an adaptive solver's error estimate; tolerance mode "
                f"{tolerance_mode!r} may train on fixed-grid rungs without one"
            )
        if adjoint:
            raise ValueError(
                "local_error / stiffness penalties need adjoint off: the adjoint method's forward solve keeps "
                "no graph, so the solver's estimates could not be differentiated"
            )
        if levers.train_method is not None:
            raise ValueError(
                f"local_error / stiffness penalties come from an adaptive solver's error estimate; train_method "
                f"{levers.train_method!r} is a fixed grid without one"
            )


def block_kwargs(levers: LeverConfig) -> dict[str, Any]:
    """Keyword arguments of :class:`~tolgate_flows.cnf.CNFBlock` that the levers set: which RNODE
    integrals it carries as extra state, and STEER's half-width."""
    return {"kinetic": levers.kinetic > 0, "jacobian": levers.jacobian > 0, "steer": float(levers.steer)}


def solver_kwargs(levers: LeverConfig, policy: TolerancePolicy, method: str) -> dict[str, Any]:
    """Keyword arguments of a block's :class:`~tolgate.GatedSolver` that the levers set.

    ``policy``: the block's training policy from the tolerance configuration; ``method``: the run's
    adaptive method. With ``train_method`` the training solves use it at
    ``FixedStepSize(train_step_size)`` and ``method`` becomes the evaluation method
    (``eval_method``); ``penalties`` is on when a solver penalty is weighted.
    """
    if levers.train_method is None:
        return {"policy": policy, "method": method, "penalties": levers.solver_penalties}
    return {
        "policy": FixedStepSize(levers.train_step_size),
        "method": levers.train_method,
        "eval_method": method,
        "penalties": False,
    }


def seminorm_options(max_num_steps: int | None) -> dict[str, Any]:
    """``adjoint_options`` of the seminorm adjoint (Kidger et al. 2021: the error norm of the
    adjoint solve ignores the parameters' adjoint). Explicit adjoint options replace torchdiffeq's
    copy of the forward options, so the step budget is repeated here."""
    budget = {} if max_num_steps is None else {"max_num_steps": max_num_steps}
    return {"norm": "seminorm", **budget}


@dataclass(frozen=True)
class PenaltyValues:
    """Each penalty of one training step before its weight, as floats for logging; ``None`` where
    its lambda is 0. ``kinetic``, ``jacobian``: batch means of the per-sample integrals summed over
    blocks (squared state units per unit time, per dimension); ``local_error``, ``stiffness``:
    summed over the step's training solves (dimensionless error-norm x time; Lipschitz x time)."""

    kinetic: float | None = None
    jacobian: float | None = None
    local_error: float | None = None
    stiffness: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in PENALTIES}


def with_penalties(
    loss: torch.Tensor, levers: LeverConfig, regularisers: Regularisers, records: Sequence[SolveRecord]
) -> tuple[torch.Tensor, PenaltyValues]:
    """The training loss with every weighted penalty added: ``loss + sum_k lambda_k value_k``.

    ``loss``: the task loss, shape ``()``; ``regularisers``: the model output's RNODE integrals
    (``(batch,)`` each, summed over blocks); ``records``: the step's training solves
    (:func:`tolgate.collect_records` around the forward pass). Returns the total, shape ``()``
    (``loss`` itself when no lever is weighted), and the values before weighting.
    ``ValueError`` when a weighted penalty was not computed (a model built without the lever, a
    solve without ``penalties=True`` or a method without an error estimate).
    """
    weights = levers.weights
    terms = {
        "kinetic": _batch_mean("kinetic", regularisers.kinetic) if weights["kinetic"] > 0 else None,
        "jacobian": _batch_mean("jacobian", regularisers.jacobian) if weights["jacobian"] > 0 else None,
        "local_error": _solver_total("local_error", records) if weights["local_error"] > 0 else None,
        "stiffness": _solver_total("stiffness", records) if weights["stiffness"] > 0 else None,
    }
    total = loss
    for name, value in terms.items():
        if value is not None:
            total = total + weights[name] * value
    values = {name: None if value is None else float(value.detach()) for name, value in terms.items()}
    return total, PenaltyValues(**values)


def _batch_mean(name: str, value: torch.Tensor | None) -> torch.Tensor:
    if value is None:
        raise ValueError(
            f"{name} is weighted but the model's output carries no {name} integral: build the model with these "
            "levers (its config's levers) and call it in training mode"
        )
    return value.mean()


def _solver_total(name: str, records: Sequence[SolveRecord]) -> torch.Tensor:
    if not records:
        raise ValueError(f"{name} is weighted but the step made no solves to take it from")
    total = None
    for record in records:
        value = getattr(record, name)
        if value is None:
            raise ValueError(
                f"{name} is weighted but a {record.method!r} solve left record.{name} empty: it needs "
                "GatedSolver(penalties=True), an adaptive method and a backend that fills it"
            )
        value = value.mean()  # (batch,) per sample on the per-sample backend, () on torchdiffeq
        total = value if total is None else total + value
    return total
