"""What one solve cost: :class:`SolveRecord`, filled in by :class:`~tolgate.GatedSolver`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

Tolerance = float | torch.Tensor


class SolveStatus(enum.Enum):
    """How a solve ended."""

    RUNNING = "running"
    SUCCESS = "success"
    STEP_BUDGET_EXCEEDED = "step_budget_exceeded"
    STEP_SIZE_UNDERFLOW = "step_size_underflow"
    NON_FINITE = "non_finite"


@dataclass
class SolveRecord:
    """Statistics of one call of a :class:`~tolgate.GatedSolver`.

    Attributes:
        rtol, atol: the tolerances the solve used: a float, or a detached tensor of shape
            ``(batch,)`` for per-sample tolerances.
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
        status: how the solve ended; ``t_reached`` the last time the solver stepped from.
    """

    method: str
    adjoint: bool
    rtol: Tolerance
    atol: Tolerance
    log10_tolerance: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None
    nfe_forward: int = 0
    nfe_backward: int = 0
    n_steps_accepted: int = 0
    n_steps_rejected: int = 0
    n_steps_backward: int = 0
    nfe_per_sample: torch.Tensor | None = None
    status: SolveStatus = SolveStatus.RUNNING
    t_reached: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def nfe_total(self) -> int:
        """Forward plus backward evaluations."""
        return self.nfe_forward + self.nfe_backward

    @property
    def n_steps(self) -> int:
        """Accepted plus rejected forward steps."""
        return self.n_steps_accepted + self.n_steps_rejected
