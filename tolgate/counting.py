"""Where NFEs are counted: :class:`CountingField`, the user's vector field plus its counters.

Every backend calls the field through one of these. It counts every call (forward solve, and the
adjoint solve when autograd's backward runs it), marks the record when the field raises, and for
direct backpropagation registers a gradient hook on each evaluation's output, so a VJP through
that evaluation is counted when autograd actually runs it. The torchdiffeq backend extends it with
torchdiffeq's step callbacks and the step checks (:mod:`tolgate.torchdiffeq_backend`).

The helpers below (:func:`non_finite`, :func:`check_solution`, ...) are the failure checks both
backends share.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import NonFiniteStateError
from .records import SolveRecord, SolveStatus

State = torch.Tensor | tuple[torch.Tensor, ...]
Field = Callable[..., State]


class CountingField:
    """The user's field (already adapted to the backend's calling convention), counted.

    The field itself is called unchanged, so outputs are bitwise those of a raw call. A plain
    object with slots, not an ``nn.Module``: it is called once per evaluation, and module call
    and attribute machinery there cost more than the counting itself.
    """

    __slots__ = ("func", "record", "in_backward", "last_t", "last_dt", "last_output", "state_dtype")

    def __init__(self, func: Field, record: SolveRecord, state_dtype: torch.dtype | None = None) -> None:
        self.func = func
        self.record = record
        self.in_backward = False
        self.last_t: torch.Tensor | None = None
        self.last_dt: torch.Tensor | None = None
        self.last_output: State | None = None
        self.state_dtype = state_dtype

    def __call__(self, t: torch.Tensor, y: State, *per_sample: torch.Tensor) -> State:
        if self.in_backward:
            self.record.nfe_backward += 1
        else:
            self.record.nfe_forward += 1
        try:
            out = self.func(t, y, *per_sample)  # per_sample: the row indices, for the per-sample backend
        except BaseException as exc:
            self._field_raised(exc, t)
            raise
        if self.record.nfe_forward == 1 and not self.in_backward:  # the first evaluation: is it a derivative of y?
            check_field_output(out, y)
        self.last_output = out
        if not self.in_backward and torch.is_grad_enabled():
            self._count_vjp_when_backpropagated(out)
        return out

    def _field_raised(self, exc: BaseException, t: torch.Tensor) -> None:
        """Mark the record (status, time) and hand it to the exception, which is re-raised unchanged."""
        record = self.record
        if record.status in (SolveStatus.RUNNING, SolveStatus.SUCCESS):  # SUCCESS: in the adjoint's backward
            record.status = SolveStatus.FIELD_ERROR if isinstance(exc, Exception) else SolveStatus.INTERRUPTED
            if self.in_backward:
                record.extra["failed_in"] = "adjoint"
            else:
                record.t_reached = time_of(self.last_t if self.last_t is not None else t)
        attach_record(exc, record)
        phase = "the adjoint solve (in autograd's backward)" if self.in_backward else "the forward solve"
        exc.add_note(
            f"tolgate: raised by the vector field during {phase} ({describe(record)}, "
            f"t={time_of(t):.6g}, after {record.nfe_total} evaluations); the SolveRecord is exc.record"
        )

    def _count_vjp_when_backpropagated(self, out: State) -> None:
        tensors = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if not tensors:
            return
        fired = [False]  # one count per evaluation, whichever of its outputs receives a gradient first
        # The hook holds the record, not self: self.last_output is this very output, and a cycle
        # through a tensor's hooks passes through autograd's C++ graph, which Python's garbage
        # collector cannot see, so it would keep every training solve's graph alive for good.
        record = self.record

        def hook(grad: torch.Tensor) -> None:
            if not fired[0]:
                fired[0] = True
                record.nfe_backward += 1

        for tensor in tensors:
            tensor.register_hook(hook)


def check_field_output(out: object, y: State) -> None:
    """Raise ``TypeError`` (type, tuple structure, dtype, device) or ``ValueError`` (shape) unless
    ``out`` can be the derivative of ``y``: the same structure, shapes, dtypes and devices. Both
    are named; torchdiffeq would otherwise fail deep inside a step with an ``AttributeError`` or a
    broadcasting error, or broadcast a wrong shape silently."""
    expected = y if isinstance(y, tuple) else (y,)
    if isinstance(y, tuple) != isinstance(out, tuple) or (isinstance(out, tuple) and len(out) != len(y)):
        raise TypeError(f"the vector field returned {_described(out)}; the state y is {_described(y)}")
    for k, (got, state) in enumerate(zip(out if isinstance(out, tuple) else (out,), expected, strict=True)):
        where = f" (element {k} of the tuple)" if isinstance(y, tuple) else ""
        if not isinstance(got, torch.Tensor):
            raise TypeError(f"the vector field returned {_described(out)}{where}; the state y is {_described(y)}")
        if got.dtype != state.dtype or got.device != state.device:
            raise TypeError(
                f"the vector field returned {_described(got)}{where} for a state {_described(state)}: "
                "dtype and device must match the state's"
            )
        if got.shape != state.shape:
            raise ValueError(
                f"the vector field returned {_described(got)}{where} for a state {_described(state)}: "
                "dy/dt must have the state's shape"
            )


def _described(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}, {value.dtype} on {value.device}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(_described(v) for v in value)})"
    return f"{type(value).__name__} {value!r}"[:200]


def check_solution(ys: State, times: list[float], field: CountingField, record: SolveRecord) -> None:
    """Raise :class:`NonFiniteStateError` if the returned solution ``(len(times), ...)`` holds NaN
    or inf: a state that overflowed on the last step (its error scale is then inf, so the step
    passes the error test) or that a ``min_step`` option forced through. One reduction per tensor."""
    tensors = ys if isinstance(ys, tuple) else (ys,)
    if not non_finite(tensors):
        return
    bad = [i for i in range(len(times)) if non_finite(tuple(tensor[i] for tensor in tensors))] or [len(times) - 1]
    record.status = SolveStatus.NON_FINITE
    record.t_reached = times[bad[0] - 1] if bad[0] > 0 else times[0]
    source = "the vector field produced NaN or inf" if non_finite(field.last_output) else "the state overflowed"
    raise NonFiniteStateError(
        f"the solution is NaN or inf from t={times[bad[0]]:.6g} on ({source}; solve with "
        f"{describe(record)}, state dtype {field.state_dtype})",
        record,
    )


def non_finite(output: State | None) -> bool:
    """Whether a tensor or tuple of tensors holds NaN or inf.

    Through ``aminmax``: one pass, and min and max propagate NaN while an inf is an extreme. On
    CPU ``torch.isfinite(x).all()`` costs about ten times as much, and arithmetic on the two 0-d
    results more than reading them.
    """
    if output is None:
        return False
    for tensor in (output,) if isinstance(output, torch.Tensor) else output:
        if tensor.numel():
            low, high = torch.aminmax(tensor.detach())
            if not (math.isfinite(low.item()) and math.isfinite(high.item())):
                return True
    return False


def attach_record(exc: BaseException, record: SolveRecord) -> None:
    """Set ``exc.record`` unless the exception has one already (a nested solve's) or takes no attributes."""
    if getattr(exc, "record", None) is None:
        try:
            exc.record = record  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with __slots__
            pass


def time_of(t: torch.Tensor | None) -> float:
    """A time tensor as a float (the first entry of a per-row time); NaN for ``None``."""
    if t is None:
        return math.nan
    return float(t.detach().reshape(-1)[0]) if t.numel() else math.nan


def describe(record: SolveRecord) -> str:
    """The solve's settings for an error message: ``rtol=1e-05, dopri5`` or ``step_size=0.1, rk4``."""
    if record.rtol is None:
        knob = "no tolerance" if record.step_size is None else f"step_size={record.step_size:.3g}"
    else:
        knob = f"rtol={short(record.rtol)}"
    return f"{knob}, {record.method}"


def short(tol: float | torch.Tensor | tuple[torch.Tensor, ...]) -> str:
    """A tolerance for a message: the float, or the range of a per-sample or per-element tensor."""
    if isinstance(tol, tuple):
        tol = torch.cat([part.reshape(-1) for part in tol])
    if isinstance(tol, torch.Tensor):
        return f"per-sample in [{float(tol.min()):.3g}, {float(tol.max()):.3g}]"
    return f"{tol:.3g}"
