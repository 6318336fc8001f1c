"""Backends: what actually integrates a :class:`~tolgate.GatedSolver` call.

A backend is an object with one interface, chosen by what it does:

==================  =======================================================================
``"torchdiffeq"``   :class:`~tolgate.torchdiffeq_backend.TorchdiffeqBackend`: torchdiffeq's
                    ``odeint``/``odeint_adjoint``, every method, one step size per batch.
``"per_sample"``    :class:`PerSampleBackend`: :mod:`tolgate.persample`, every sample with its
                    own steps and tolerance; backpropagation only. (``"tolgate"``: the old,
                    deprecated name of the same backend.)
==================  =======================================================================

Each backend answers for itself:

* ``check(method, adjoint, adjoint_method)`` refuses what it cannot do, at construction;
* ``adapt(func, y0)`` turns the user's field into its own calling convention, so either kind of
  field works with either backend: a torchdiffeq field ``f(t, y)``, or an *index-aware* field
  ``f(t, y, idx)`` (marked with :func:`~tolgate.persample.index_aware`) that needs each row's sample index for
  per-sample data (a CNF's Hutchinson noise). Under torchdiffeq an index-aware field gets every
  row's index and a scalar ``t``; under the per-sample backend a torchdiffeq field gets ``t``
  shaped ``(active, 1, ...)`` (see :func:`~tolgate.persample.from_torchdiffeq`);
* ``prepare(request)`` validates a call before any record exists and returns a run, whose
  ``run(record)`` solves, fills the record and returns the solution.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .counting import CountingField, check_solution
from .persample import (
    PreparedSolve,
    from_torchdiffeq,
    prepare_per_sample,
    run_prepared,
    takes_sample_index,
    zero_penalties,
)
from .records import SolveRecord, SolveStatus
from .tableaux import TABLEAUX
from .torchdiffeq_backend import TorchdiffeqBackend, step_callbacks

if TYPE_CHECKING:
    from .policies import ToleranceChoice

State = torch.Tensor | tuple[torch.Tensor, ...]

#: methods of the per-sample backend (its Butcher tableaux)
PER_SAMPLE_METHODS = tuple(TABLEAUX)


class Settings(Protocol):
    """What a backend reads from its :class:`~tolgate.GatedSolver`."""

    adjoint: bool
    adjoint_method: str | None
    penalties: bool
    options: dict[str, Any]
    max_num_steps: int | None
    adjoint_tolerance: tuple[Any, Any] | None
    adjoint_options: dict[str, Any] | None


@dataclass(frozen=True)
class SolveRequest:
    """One call of a GatedSolver, checked by the solver (``times``: ``t`` as floats, 1-D, monotone;
    ``method``: this call's method, the solver's ``method`` or, in eval mode, its ``eval_method``)."""

    settings: Settings
    method: str
    func: Callable[..., State]
    adapted_func: Callable[..., State]
    y0: State
    t: torch.Tensor
    times: list[float]
    choice: ToleranceChoice
    state_dtype: torch.dtype
    adjoint_params: tuple[torch.Tensor, ...] | None = None
    event_fn: Callable[..., torch.Tensor] | None = None


class Run(Protocol):
    """A prepared solve: ``rtol``/``atol``/``step_size`` for the record, ``field`` once running."""

    rtol: Any
    atol: Any
    step_size: float | None
    field: CountingField | None

    def run(self, record: SolveRecord) -> Any: ...


class Backend(Protocol):
    """The interface every backend implements (see the module docstring)."""

    name: str
    methods: tuple[str, ...]

    def check(self, method: str, adjoint: bool, adjoint_method: str | None) -> None: ...

    def adapt(self, func: Callable[..., State], y0: State) -> Callable[..., State]: ...

    def prepare(self, request: SolveRequest) -> Run: ...


@dataclass
class PerSampleRun:
    """One validated per-sample solve (``problem`` ``None``: a single output time, nothing to solve)."""

    request: SolveRequest
    problem: PreparedSolve | None
    rtol: Any
    atol: Any
    step_size: float | None = None
    field: CountingField | None = None

    def run(self, record: SolveRecord) -> State:
        """Solve, filling ``record`` (per-sample NFE, summed steps, rows evaluated; with
        ``penalties`` the ``(batch,)`` ``local_error`` and ``stiffness``)."""
        request = self.request
        field = CountingField(request.adapted_func, record, request.state_dtype)
        self.field = field
        penalties = request.settings.penalties
        if self.problem is None:
            y0 = request.y0
            ys = tuple(y[None] for y in y0) if isinstance(y0, tuple) else y0[None]
            sums = zero_penalties(y0) if penalties else None
        else:
            ys, stats, sums = run_prepared(field, self.problem, raise_on_failure=True, penalties=penalties)
            record.nfe_per_sample = stats.nfe
            record.n_steps_accepted = int(stats.n_accepted.sum())
            record.n_steps_rejected = int(stats.n_rejected.sum())
            record.extra["rows_evaluated"] = int(stats.rows_evaluated)
        if sums is not None:
            record.local_error, record.stiffness = sums.local_error, sums.stiffness
        check_solution(ys, request.times, field, record)
        record.status = SolveStatus.SUCCESS
        record.t_reached = request.times[-1]
        return ys


class PerSampleBackend:
    """:mod:`tolgate.persample`: each sample its own adaptive steps and tolerance, rows that are
    done leave the batch; gradients by backpropagation through the solve (no adjoint). With
    ``penalties=True`` the record's ``local_error`` and ``stiffness`` are ``(batch,)``, one per sample."""

    name = "per_sample"
    methods = PER_SAMPLE_METHODS

    def check(self, method: str, adjoint: bool, adjoint_method: str | None) -> None:
        """``ValueError`` for a method without a tableau here; ``NotImplementedError`` for adjoint."""
        if method not in PER_SAMPLE_METHODS:
            raise ValueError(f"backend 'per_sample' supports methods {PER_SAMPLE_METHODS}, got {method!r}")
        if adjoint or adjoint_method is not None:
            raise NotImplementedError(
                "backend 'per_sample' has no adjoint: use adjoint=False (backpropagation through the solve), "
                "or backend='torchdiffeq' for adjoint solves"
            )

    def adapt(self, func: Callable[..., State], y0: State) -> Callable[..., State]:
        """``func`` as ``f(t, y, idx)``: an index-aware field as it is, a torchdiffeq field adapted."""
        return func if takes_sample_index(func) else from_torchdiffeq(func)

    def prepare(self, request: SolveRequest) -> PerSampleRun:
        """Validate ``request``: no events, no step-size or per-element choices."""
        choice = request.choice
        if request.event_fn is not None:
            raise NotImplementedError(
                "backend 'per_sample' has no event handling (every sample would stop at its own time and "
                "the output would be ragged); use backend='torchdiffeq' for event_fn"
            )
        grid = choice.step_size is not None or choice.grid_steps is not None
        if request.t.requires_grad:
            raise NotImplementedError(
                "backend 'per_sample' does not differentiate with respect to t (its gradient would be silently "
                "zero): pass t.detach(), or use backend='torchdiffeq' for gradients in t"
            )
        if choice.rtol is None or choice.atol is None or grid or choice.per_element:
            raise ValueError(
                "backend 'per_sample' takes rtol/atol (a float or one per sample) from the policy, "
                f"got rtol={choice.rtol!r}, step_size={choice.step_size!r}, grid_steps={choice.grid_steps!r}, "
                f"per_element={choice.per_element}"
            )
        callbacks = step_callbacks(request.func)
        if callbacks:  # torchdiffeq, too, warns about the callbacks a solver does not call
            warnings.warn(
                f"backend 'per_sample' does not call torchdiffeq's step callbacks {callbacks} of the field: "
                "every sample takes its own steps; use backend='torchdiffeq' for them",
                stacklevel=4,
            )
        settings = request.settings
        if len(request.times) == 1:
            problem = None
        else:
            problem = prepare_per_sample(
                request.y0, request.t, choice.rtol, choice.atol, request.method, settings.max_num_steps
            )
        return PerSampleRun(request, problem, choice.rtol, choice.atol)


_BACKENDS: dict[str, type] = {"torchdiffeq": TorchdiffeqBackend, "per_sample": PerSampleBackend}
_ALIASES = {"tolgate": "per_sample"}
#: the backends, each once by its own name
BACKENDS = tuple(_BACKENDS)
#: every name a GatedSolver's ``backend`` accepts: :data:`BACKENDS` and the deprecated aliases
#: (``"tolgate"`` for ``"per_sample"``)
BACKEND_NAMES = BACKENDS + tuple(_ALIASES)


def get_backend(backend: str | Backend) -> Backend:
    """The backend object for a name in :data:`BACKEND_NAMES`, or ``backend`` itself if it is one."""
    if not isinstance(backend, str):
        return backend
    if backend in _ALIASES:
        warnings.warn(f"backend={backend!r} is deprecated; use {_ALIASES[backend]!r}", DeprecationWarning, stacklevel=3)
        backend = _ALIASES[backend]
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return _BACKENDS[backend]()
