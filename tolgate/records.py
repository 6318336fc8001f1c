"""What one solve cost: :class:`SolveRecord`, filled in by :class:`~tolgate.GatedSolver`."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch

Tolerance = float | torch.Tensor


class SolveStatus(enum.Enum):
    """How a solve ended.

    ``RUNNING`` only while the solve runs: a record that a raised exception left behind always
    carries one of the failure statuses. With ``adjoint=True`` the status also covers the adjoint
    solve that autograd's backward runs: a failure there replaces ``SUCCESS``.
    """

    RUNNING = "running"
    SUCCESS = "success"
    #: more steps than ``max_num_steps`` (:class:`~tolgate.errors.StepBudgetExceeded`)
    STEP_BUDGET_EXCEEDED = "step_budget_exceeded"
    #: the step size fell to a few ulps of the time (:class:`~tolgate.errors.StepSizeUnderflow`)
    STEP_SIZE_UNDERFLOW = "step_size_underflow"
    #: NaN or inf in the field's output or the state (:class:`~tolgate.errors.NonFiniteStateError`)
    NON_FINITE = "non_finite"
    #: the vector field raised an exception (re-raised unchanged, with ``exc.record`` set)
    FIELD_ERROR = "field_error"
    #: interrupted (``KeyboardInterrupt`` or another non-``Exception``) while solving
    INTERRUPTED = "interrupted"
    #: any other exception raised while solving (inside torchdiffeq, say)
    FAILED = "failed"

    @property
    def code(self) -> int:
        """The integer code of this status in per-sample status tensors (``PerSampleStats.status``)."""
        return _CODES[self]

    def __int__(self) -> int:
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> SolveStatus:
        """The status whose :attr:`code` is ``code``; ``ValueError`` for an unknown code."""
        if not 0 <= code < len(_BY_CODE):
            raise ValueError(f"status code must be in [0, {len(_BY_CODE)}), got {code}")
        return _BY_CODE[code]


# One enum for both backends. A solve's record holds the member; the per-sample backend stores
# each sample's status in an int64 tensor, as these codes (the first four are the ones a sample
# can end with, so a per-sample status tensor counts with ``bincount(minlength=4)``).
_BY_CODE = (
    SolveStatus.SUCCESS,
    SolveStatus.STEP_BUDGET_EXCEEDED,
    SolveStatus.STEP_SIZE_UNDERFLOW,
    SolveStatus.NON_FINITE,
    SolveStatus.FIELD_ERROR,
    SolveStatus.INTERRUPTED,
    SolveStatus.FAILED,
    SolveStatus.RUNNING,
)
_CODES = {status: code for code, status in enumerate(_BY_CODE)}
#: the statuses a sample of a per-sample solve can end with
SAMPLE_STATUSES = _BY_CODE[:4]


@dataclass
class SolveRecord:
    """Statistics of one call of a :class:`~tolgate.GatedSolver`.

    Attributes:
        rtol, atol: the tolerances the solve used: a float, or a detached tensor of shape
            ``(batch,)`` for per-sample tolerances; ``None`` where no tolerance applied (a
            fixed-grid method: ``euler``, ``rk4``, ``explicit_adams``, ...).
        step_size: the fixed-grid step size (time units) the solve used, from the policy's
            choice or ``options["step_size"]``; ``None`` for adaptive methods and for a
            fixed-grid solve on the grid of ``t``.
        grid_steps: the number of equal steps over the time span, where the policy chose the grid
            that way (a :class:`~tolgate.ladder.SolverLadder` rung), else ``None``.
        log10_tolerance: ``log10(rtol)`` as drawn by the policy (detached; shape ``()`` or
            ``(batch,)``), or ``None`` for policies that do not work in log space.
        log_prob: log-probability of the drawn tolerance under the policy, shape ``()`` or
            ``(batch,)``, differentiable with respect to the gate's parameters; ``None`` for
            deterministic choices.
        nfe_forward: evaluations of the vector field during the forward solve.
        nfe_backward: evaluations of the vector field's vector-Jacobian product during the
            backward pass, filled in when autograd's backward runs through the solve.
            With ``adjoint=True`` these are the evaluations of the augmented adjoint dynamics
            (each costs one forward and one VJP of the field). With direct backpropagation
            it counts the forward evaluations whose graph autograd traversed (one VJP each):
            every evaluation of an accepted step; none of a rejected step (it only sets the next
            step size, computed without grad); the initial step-size probe only when the first
            step size depends on it (torchdiffeq does not detach that one). Evaluations whose
            outputs do not reach the loss cost no VJP and are not counted.
        n_steps_accepted, n_steps_rejected: steps of the forward solve. For dopri5,
            ``nfe_forward == 2 + 6 * (n_steps_accepted + n_steps_rejected)`` (FSAL, two
            evaluations for the initial step size).
        n_steps_backward: steps (accepted and rejected) of the adjoint solve.
        nfe_per_sample: per-sample evaluation counts ``(batch,)`` where the backend reports
            them, else ``None``.
        local_error, stiffness: the solver-aware penalties of :mod:`tolgate.penalties`, filled
            when the solver was built with ``penalties=True`` and the method is adaptive, else
            ``None``: ``sum_j E_j |h_j|`` and ``sum_j rho_j |h_j|`` over the accepted steps ``j``
            (``E_j`` the step's weighted error norm, ``rho_j`` its estimate of the field's local
            Lipschitz constant, ``h_j`` its size). Tensors in the graph of the solve, shape ``()``
            with the torchdiffeq backend and ``(batch,)`` with the per-sample one.
        status: how the solve ended; ``t_reached`` the last time the solver stepped from.
        extra: backend-specific facts, e.g. ``rows_evaluated`` (per-sample backend) or
            ``failed_in="adjoint"`` when the adjoint solve of autograd's backward failed.

    Deep copies and pickles hold detached tensors: ``log_prob`` is part of the graph of the solve
    that made it, which a copy of a model (an EMA or best-so-far copy) cannot share; ``copy.copy``
    shares the tensors as they are.
    """

    method: str
    adjoint: bool
    rtol: Tolerance | None
    atol: Tolerance | None
    step_size: float | None = None
    grid_steps: int | None = None
    log10_tolerance: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None
    nfe_forward: int = 0
    nfe_backward: int = 0
    n_steps_accepted: int = 0
    n_steps_rejected: int = 0
    n_steps_backward: int = 0
    nfe_per_sample: torch.Tensor | None = None
    local_error: torch.Tensor | None = None
    stiffness: torch.Tensor | None = None
    status: SolveStatus = SolveStatus.RUNNING
    t_reached: float | None = None
    extra: dict = field(default_factory=dict)

    def __copy__(self) -> SolveRecord:
        """A shallow copy shares the tensors, graph included (``__getstate__`` is for deep copies)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __getstate__(self) -> dict[str, Any]:
        """The fields, with every tensor detached (deepcopy and pickle copy this state)."""
        state = dict(self.__dict__)
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                state[name] = value.detach()
        state["extra"] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}
        return state

    @property
    def mean_log10_tolerance(self) -> float | None:
        """``log10`` of the solve's ``rtol`` (the mean over samples of per-sample tolerances), or
        ``None`` where no tolerance applied (fixed-grid methods)."""
        if self.log10_tolerance is not None:
            return float(self.log10_tolerance.double().mean())
        if self.rtol is None:
            return None
        if isinstance(self.rtol, torch.Tensor):
            return float(self.rtol.double().log10().mean())
        return math.log10(self.rtol)

    @property
    def setting(self) -> str:
        """The solver setting as :class:`~tolgate.ladder.SolverSetting` writes it: ``"dopri5:1e-05"``
        (method:rtol; per-sample tolerances by their geometric mean), ``"rk4:4"`` (method:grid
        steps); ``"rk4 h=0.25"`` for a step size; the method alone on the grid of ``t``."""
        if self.grid_steps is not None:
            return f"{self.method}:{self.grid_steps}"
        if self.step_size is not None:
            return f"{self.method} h={self.step_size:g}"
        log10 = self.mean_log10_tolerance
        return self.method if log10 is None else f"{self.method}:{10.0**log10:.3g}"

    @property
    def nfe_total(self) -> int:
        """Forward plus backward evaluations."""
        return self.nfe_forward + self.nfe_backward

    @property
    def n_steps(self) -> int:
        """Accepted plus rejected forward steps."""
        return self.n_steps_accepted + self.n_steps_rejected
