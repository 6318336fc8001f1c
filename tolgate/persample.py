"""Per-sample adaptive ODE solves: each sample has its own tolerance, step size, statistics and fate.

Entry point: :func:`solve_per_sample`. Unlike ``torchdiffeq.odeint``, which solves a batch as one
big system with one step size (so an easy sample dilutes a hard sample's error and a hard sample
forces small steps on easy ones), every row of ``y0`` here is an independent initial-value
problem: a sample's solution, step sequence and NFE do not depend on which other samples share
the batch. Rows that reach ``t[-1]`` (or fail) leave the active set and are no longer evaluated.

Vector-field contract
---------------------
``func(t, y, idx) -> dy/dt``, called only on the rows still integrating:

* ``t``: ``(active,)`` each row's own time, in ``y0``'s dtype (as torchdiffeq passes it; the
  solver itself keeps time in the promoted dtype of ``y0`` and ``t``).
* ``y``: ``(active, *state)`` the rows' states (a tuple of such tensors if ``y0`` is a tuple).
* ``idx``: ``(active,)`` int64, the rows' original sample indices into ``y0``. Per-sample data
  must be indexed with it, e.g. a CNF's Hutchinson noise ``eps[idx]``, so that it follows its
  sample as rows leave the active set (drawing fresh noise per call is wrong in any solver).
  ``idx`` is the same tensor object for every call until the active set changes, so
  :class:`PerSampleData` gathers such data once per active set instead of once per call.
* returns the time derivative with the shape of ``y``.
* rows must not be coupled: no batch norm over the batch, no mean over rows. A coupled field
  breaks the independence that the per-sample error control assumes.

Fields written for ``torchdiffeq`` (``func(t, y)`` with a scalar ``t``) can be wrapped with
:func:`from_torchdiffeq` when they satisfy the last point; a :class:`~tolgate.GatedSolver` with
``backend="per_sample"`` does that itself for every field not marked :func:`index_aware`.

Gradients: backpropagate through the solve (``loss.backward()``). Step-size decisions carry no
gradient. The adjoint method is not supported by this backend (``adjoint=True`` raises
``NotImplementedError``); gradients with respect to ``t`` and the tolerances are not computed.

Solver-aware penalties (:mod:`tolgate.penalties`; a :class:`~tolgate.GatedSolver` with
``penalties=True`` asks for them through :func:`run_prepared`) come per sample, ``(batch,)``:
each sample's sums over its own accepted steps, with its own error norm (the one above).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from .checks import check_rtol_for_dtype, check_times, control_dtype
from .sample_stats import PerSampleStats
from .stepping import PerSamplePenalties, integrate, mean_square
from .tableaux import ButcherTableau, get_tableau

State = torch.Tensor | tuple[torch.Tensor, ...]
#: ``func(t: (active,), y: (active, *state) or tuple, idx: (active,) int64) -> same as y``
PerSampleField = Callable[[torch.Tensor, State, torch.Tensor], State]
Tolerance = float | torch.Tensor
F = TypeVar("F", bound=Callable[..., Any])
#: the attribute that marks a field ``f(t, y, idx)`` (see :func:`index_aware`)
INDEX_AWARE = "takes_sample_index"
#: a flat ``(..., total)`` tensor back to the tuple state's tensors
Unpack = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class PreparedSolve:
    """A validated per-sample problem (:func:`prepare_per_sample`), ready for :func:`run_prepared`.

    ``y0``: ``(batch, *state)`` (a tuple state flattened to ``(batch, total)``); ``rtol``, ``atol``:
    ``(batch,)`` in the error-control dtype (float32 for a 16-bit state, else the state's).
    """

    y0: torch.Tensor
    t: torch.Tensor
    rtol: torch.Tensor
    atol: torch.Tensor
    tableau: ButcherTableau
    max_num_steps: int | None
    unpack: Unpack | None
    norm: Callable[[torch.Tensor], torch.Tensor]


def solve_per_sample(
    func: PerSampleField,
    y0: State,
    t: torch.Tensor,
    rtol: Tolerance = 1e-7,
    atol: Tolerance = 1e-9,
    method: str = "dopri5",
    max_num_steps: int | None = None,
    on_failure: Literal["raise", "status"] = "status",
    adjoint: bool = False,
) -> tuple[State, PerSampleStats]:
    """Solve ``dy/dt = func(t, y, idx)`` for every sample of ``y0`` with its own adaptive steps.

    Args:
        func: the vector field; see the module docstring for the contract.
        y0: ``(batch, *state)``, or a tuple of tensors ``(batch, *state_i)`` of one dtype.
        t: ``(n_times,)`` output times shared by all samples, strictly increasing or strictly
            decreasing, ``n_times >= 2``; ``t[0]`` is the initial time.
        rtol, atol: relative and absolute tolerance, a float or a ``(batch,)`` tensor (one per
            sample); finite and positive. Used without gradient. A 16-bit state needs
            ``rtol >= 10 * eps`` of its dtype (:mod:`tolgate.checks`), else ``ValueError``.
        method: ``"dopri5"``, ``"bosh3"`` or ``"tsit5"`` (see :mod:`tolgate.tableaux`).
        max_num_steps: steps (accepted and rejected) each sample may attempt; ``None``: no limit.
        on_failure: ``"status"`` records a failing sample's status in the stats and freezes it
            while the others finish; ``"raise"`` raises :class:`~tolgate.StepBudgetExceeded`,
            :class:`~tolgate.StepSizeUnderflow` or :class:`~tolgate.NonFiniteStateError` naming
            the sample and the time it reached.
        adjoint: not supported; ``True`` raises ``NotImplementedError``.

    Returns:
        ``ys``: ``(n_times, batch, *state)`` (a tuple for a tuple ``y0``), the dense-output
        solution at ``t``; entries at times a failed sample never reached are NaN.
        ``stats``: :class:`~tolgate.sample_stats.PerSampleStats`.

    The error norm is the RMS over each sample's state of ``err / (atol + rtol * max(|y0|, |y1|))``;
    for a tuple state it is the largest of the per-tensor RMS values, as torchdiffeq's default norm
    for tuples, so a small component (a CNF's log-density) is controlled on its own.

    Every failure is detected by the step loop itself (no ``assert``), so it holds under ``python -O``.
    """
    if adjoint:
        raise NotImplementedError(
            "the per-sample backend does not implement the adjoint method; use adjoint=False "
            "(backpropagation through the solve) or the torchdiffeq backend for adjoint solves"
        )
    if on_failure not in ("raise", "status"):
        raise ValueError(f"on_failure must be 'raise' or 'status', got {on_failure!r}")
    problem = prepare_per_sample(y0, t, rtol, atol, method, max_num_steps)
    ys, stats, _ = run_prepared(func, problem, raise_on_failure=on_failure == "raise")
    return ys, stats


def prepare_per_sample(
    y0: State,
    t: torch.Tensor,
    rtol: Tolerance,
    atol: Tolerance,
    method: str,
    max_num_steps: int | None,
) -> PreparedSolve:
    """Validate a per-sample problem (the arguments of :func:`solve_per_sample`) without solving it.

    Raises ``ValueError`` or ``TypeError`` naming the bad argument; evaluates nothing.
    """
    if max_num_steps is not None and (not isinstance(max_num_steps, int) or max_num_steps < 1):
        raise ValueError(f"max_num_steps must be a positive int or None, got {max_num_steps!r}")
    tableau = get_tableau(method)
    flat0, unpack, norm = _pack_state(y0)
    _check_times(t, flat0)
    batch = flat0.shape[0]
    rtol_rows = _per_sample_tolerance(rtol, "rtol", batch, flat0)
    atol_rows = _per_sample_tolerance(atol, "atol", batch, flat0)
    check_rtol_for_dtype(rtol_rows, flat0.dtype)
    return PreparedSolve(flat0, t, rtol_rows, atol_rows, tableau, max_num_steps, unpack, norm)


def run_prepared(
    func: PerSampleField, problem: PreparedSolve, raise_on_failure: bool, penalties: bool = False
) -> tuple[State, PerSampleStats, PerSamplePenalties | None]:
    """Solve a :class:`PreparedSolve`: what :func:`solve_per_sample` returns, and with ``penalties``
    the per-sample solver-aware penalties (``(batch,)`` tensors, :mod:`tolgate.stepping`), else ``None``."""
    unpack = problem.unpack
    field = func if unpack is None else _packed_field(func, unpack)
    ys, stats, sums = integrate(
        field,
        problem.y0,
        problem.t,
        problem.rtol,
        problem.atol,
        problem.tableau,
        problem.max_num_steps,
        raise_on_failure,
        problem.norm,
        penalties,
    )
    return (ys if unpack is None else unpack(ys)), stats, sums


def zero_penalties(y0: State) -> PerSamplePenalties:
    """The penalties of a solve that takes no step (a single output time): zeros ``(batch,)`` in the
    error-control dtype of ``y0`` (a tensor ``(batch, *state)`` or a tuple of them)."""
    first = y0[0] if isinstance(y0, tuple) else y0
    return PerSamplePenalties.zeros(first.shape[0], control_dtype(first.dtype), first.device)


def index_aware(func: F) -> F:
    """Mark ``func`` as an index-aware field ``f(t, y, idx)`` (the contract above) and return it.

    A :class:`~tolgate.GatedSolver` calls a marked field with the row indices on either backend
    (every row's, ``arange(batch)``, and a scalar ``t`` under torchdiffeq), and an unmarked one as
    ``f(t, y)``. A class can set ``takes_sample_index = True`` instead (an ``nn.Module`` field).
    """
    setattr(func, INDEX_AWARE, True)
    return func


def takes_sample_index(func: Callable[..., Any]) -> bool:
    """Whether ``func`` is marked index-aware (:func:`index_aware`)."""
    return bool(getattr(func, INDEX_AWARE, False))


def from_torchdiffeq(func: Callable[[torch.Tensor, State], State]) -> PerSampleField:
    """Adapt a torchdiffeq-style field ``func(t, y)`` to the per-sample contract.

    ``func`` receives ``t`` reshaped to ``(active, 1, ..., 1)``, broadcastable against a
    ``(active, *state)`` state, and ignores ``idx``. Valid when ``func`` has no cross-row coupling
    and uses ``t`` only in arithmetic that broadcasts against per-row tensors (a time-independent
    field; FFJORD's ``torch.ones_like(x[:, :1]) * t`` time channel). A field that needs a Python
    number (``float(t)``, ``t.item()``) fails loudly, because the rows are at different times. For
    a tuple state ``t`` is shaped for the first tensor.
    """

    def field(t: torch.Tensor, y: State, idx: torch.Tensor) -> State:
        first = y[0] if isinstance(y, tuple) else y
        return func(t.view(-1, *([1] * (first.dim() - 1))), y)

    return index_aware(field)


class PerSampleData:
    """Per-sample auxiliary data ``(batch, ...)`` for a per-sample field, gathered by ``idx``.

    ``data[idx]`` returns ``data.index_select(0, idx)``, recomputed only when ``idx`` is a new
    tensor (the active set changed), so a field evaluated six times per step on the same rows
    gathers once. Example: ``noise = PerSampleData(eps)``, then ``noise[idx]`` inside the field.
    """

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self._idx: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if idx is not self._idx:
            self._idx, self._rows = idx, self.data.index_select(0, idx)
        return self._rows


def _check_times(t: torch.Tensor, y0: torch.Tensor) -> None:
    check_times(t)
    if not torch.is_floating_point(t):
        raise TypeError(f"t must be floating point, got dtype {t.dtype}")
    if t.device != y0.device:
        raise ValueError(f"t is on {t.device} but y0 is on {y0.device}")


def _per_sample_tolerance(value: Tolerance, name: str, batch: int, y0: torch.Tensor) -> torch.Tensor:
    """``value`` as a ``(batch,)`` tensor in the error-control dtype of ``y0`` (float32 for a 16-bit
    state, where a small atol would round to zero); ``ValueError`` unless finite and > 0."""
    dtype = control_dtype(y0.dtype)
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(
                f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, got shape {tuple(value.shape)}"
            )
        rows = value.detach().to(device=y0.device, dtype=dtype).expand(batch)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and positive, got {value!r}")
        rows = torch.full((batch,), float(value), dtype=dtype, device=y0.device)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    bad = ~torch.isfinite(rows) | (rows <= 0)
    if bool(bad.any()):
        sample = int(torch.nonzero(bad)[0])
        raise ValueError(f"{name} must be finite and > 0 for every sample; sample {sample} has {float(rows[sample])!r}")
    return rows.contiguous()


def _pack_state(y0: State) -> tuple[torch.Tensor, Unpack | None, Callable[[torch.Tensor], torch.Tensor]]:
    """A single ``(batch, *state)`` tensor, or a tuple flattened into ``(batch, total)``.

    Returns the flat initial state, the inverse map for a tuple (``None`` for a tensor), and the
    per-row mean-square norm (per-tensor means, their maximum for a tuple).
    """
    if isinstance(y0, torch.Tensor):
        _check_tensor(y0, "y0")
        return y0, None, mean_square
    if not isinstance(y0, tuple) or not y0:
        raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got {type(y0).__name__}")
    for k, tensor in enumerate(y0):
        _check_tensor(tensor, f"y0[{k}]")
    batch, dtype, device = y0[0].shape[0], y0[0].dtype, y0[0].device
    for k, tensor in enumerate(y0):
        if tensor.shape[0] != batch or tensor.dtype != dtype or tensor.device != device:
            raise ValueError(
                f"every tensor of y0 needs batch {batch}, dtype {dtype}, device {device}; y0[{k}] has "
                f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"
            )
    shapes = [tuple(tensor.shape[1:]) for tensor in y0]
    sizes = [math.prod(shape) for shape in shapes]

    def unpack(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lead = flat.shape[:-1]
        return tuple(p.reshape(*lead, *s) for p, s in zip(flat.split(sizes, -1), shapes, strict=True))

    def norm(scaled_sq: torch.Tensor) -> torch.Tensor:
        return torch.stack([part.mean(1) for part in scaled_sq.split(sizes, 1)], 1).amax(1)

    flat = torch.cat([tensor.reshape(batch, -1) for tensor in y0], 1)
    return flat, unpack, norm


def _check_tensor(tensor: object, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not torch.is_floating_point(tensor):
        raise TypeError(f"{name} must be floating point, got dtype {tensor.dtype}")
    if tensor.dim() < 1 or tensor.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension first, got shape {tuple(tensor.shape)}")


def _packed_field(func: PerSampleField, unpack: Unpack) -> Callable:
    def field(t: torch.Tensor, flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = func(t, unpack(flat), idx)
        return torch.cat([o.reshape(flat.shape[0], -1) for o in out], 1)

    return field
