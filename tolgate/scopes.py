"""Scopes over a model's solves: collect the records a step made, or swap every solver's policy.

Both are context managers over a module (a whole model, say) rather than over one solver, because
the unit a training step cares about is "every solve this forward pass made", in call order:

    with collect_records(model) as solves:
        loss = model(x)
    # solves: one SolveRecord per GatedSolver call inside model, in the order they ran

    with use_policies(model, lambda solver: FixedTolerance(1e-7)):
        reference = model(x)            # every solve at 1e-7, whatever the mode or the policy

:func:`use_policies` is how probes (:mod:`tolgate.probes`) solve the same batch at a reference
tolerance and at several draws of a gate without touching the solvers' own configuration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from torch import nn

from .records import SolveRecord

if TYPE_CHECKING:
    from .policies import TolerancePolicy
    from .solver import GatedSolver

# Active collectors: (ids of the solvers each one watches, the list it fills), innermost last.
_COLLECTORS: list[tuple[frozenset[int], list[SolveRecord]]] = []
# Active policy overrides by solver id. Kept here, not on the solver: a policy assigned to an
# nn.Module attribute would be registered as a submodule and leak into parameters() and state_dict.
_OVERRIDES: dict[int, TolerancePolicy] = {}


def _solvers(module: nn.Module) -> list[GatedSolver]:
    from .solver import GatedSolver

    solvers = [m for m in module.modules() if isinstance(m, GatedSolver)]
    if not solvers:
        raise ValueError(f"{type(module).__name__} contains no GatedSolver: nothing to collect or override")
    return solvers


def override_for(solver: GatedSolver) -> TolerancePolicy | None:
    """The policy :func:`use_policies` put in place for ``solver``, or ``None``."""
    return _OVERRIDES.get(id(solver))


def announce(solver: GatedSolver, record: SolveRecord) -> None:
    """Called by a GatedSolver for every solve it starts: hand the record to the collectors watching it."""
    for watched, records in _COLLECTORS:
        if id(solver) in watched:
            records.append(record)


@contextlib.contextmanager
def collect_records(module: nn.Module) -> Iterator[list[SolveRecord]]:
    """Yield a list that fills with every :class:`SolveRecord` the GatedSolvers inside ``module``
    start while the block runs, in call order (failed solves included: their status says so).

    Nested and concurrent scopes each get their own list.
    """
    entry: tuple[frozenset[int], list[SolveRecord]] = (frozenset(id(s) for s in _solvers(module)), [])
    _COLLECTORS.append(entry)
    try:
        yield entry[1]
    finally:
        # By identity: two scopes over the same module hold equal entries.
        _COLLECTORS[:] = [e for e in _COLLECTORS if e is not entry]


@contextlib.contextmanager
def use_policies(module: nn.Module, policy_for: Callable[[GatedSolver], TolerancePolicy]) -> Iterator[None]:
    """Inside the block, every GatedSolver in ``module`` takes its tolerance from
    ``policy_for(solver)``, in training and eval mode alike; the previous overrides come back after."""
    solvers = _solvers(module)
    previous = {id(s): _OVERRIDES.get(id(s)) for s in solvers}
    try:
        for solver in solvers:
            _OVERRIDES[id(solver)] = policy_for(solver)
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                _OVERRIDES.pop(key, None)
            else:
                _OVERRIDES[key] = old
