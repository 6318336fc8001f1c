"""The automatic solver policy's rule: check the blocks' rungs on a probe of the batch, then move.

Every block's solver holds a :class:`~tolgate.ladder.LadderPolicy`. Every few training steps
:func:`climb` runs, on the first rows of the training batch, under ``no_grad`` and on common random
numbers (the same rows, the same Hutchinson noise, no dropout: :func:`tolgate.probes.run_probe`):

1. **Reference.** Every block at the tight ``reference`` setting (dopri5 at 1e-5, the evaluation
   protocol): per-sample objective ``L_ref``, and the budget
   ``fraction * std(L_ref) / sqrt(batch_size)``, a fraction of the training minibatch's own noise.
2. **Check.** Every block at its current rung: the solver error ``mean_i |L_i - L_ref,i|``. While
   it exceeds the budget, one block retreats one rung (towards the reference, where the error is
   0): of the blocks that can, the one whose retreat leaves the smallest error, each tried on a
   probe. Training never continues on a setting that failed, and a block that was fine keeps its
   cheap rung (a retreat of every block doubles the cost of all of them).
3. **Descend** (only when the check passed at once). First every block together at its cheapest
   eligible rung (:meth:`~tolgate.ladder.LadderPolicy.cheaper`); if that fails, block by block,
   each at its cheapest together with the moves already taken; then one block that did not move,
   in turn, finds the cheapest passing rung of each method below it (tolerances, grids) by
   bisection and takes the one of fewer evaluations. A move is taken when the error of every
   block's setting together stays within the budget and the probe costs no more evaluations
   than the current settings. Bisection within a method assumes that a rung passes when a
   cheaper one does (a looser tolerance or fewer steps is less accurate), which is why it runs
   per method: across methods accuracy and cost are not ordered (RK4 with 8 steps can pass
   where dopri5 at 1e-2 fails, and cost more than dopri5 at 1e-3, which passes too).

The rule checks and moves the automatic rungs; a :class:`~tolgate.ladder.LadderGate` on top
learns departures from them (its own probes, :class:`~tolgate.probes.ProbedGateEstimator`).

Why this budget. SGD already follows a gradient estimate whose loss carries the sampling error
``std(L) / sqrt(B)`` of the minibatch. A deterministic solver error well below that noise changes
nothing a training run can measure, and accuracy beyond it is work bought for nothing: the "norm
test" of dynamic sample-size methods (Byrd et al. 2012), applied to the solver. The error is the
mean of per-sample absolute errors, which bounds the error of the batch mean and cannot cancel.
It is measured against a tight reference, never by the training objective at the cheap setting:
a coarse grid can flatter the objective (a model trained at one RK4 step learns the
discretisation, and its training NLL reads 1.06 nats where the ODE it defines scores 10.96), and
that is exactly the case the check catches, the first time it is run after it happens.

Cost. A climb costs 2 probes when the check passes and no block can move, 3 when the joint
cheapest rungs pass, at most ``4 + blocks + 2 log2(rungs)`` otherwise, and ``blocks`` per retreat;
:attr:`ClimbReport.nfe_forward` counts every evaluation, on ``rows`` samples each, so runs can
report it next to the training NFE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .ladder import REFERENCE_SETTING, FixedSetting, LadderGate, LadderPolicy, SolverSetting
from .probes import Objective, Probe, minibatch_noise, run_probe
from .solver import GatedSolver, gated_solvers


@dataclass
class ClimbReport:
    """What one :func:`climb` measured and did. Errors, ``budget`` and ``noise`` in the objective's
    units; rungs and settings per :class:`~tolgate.ladder.LadderPolicy`, in solver order."""

    rungs_before: list[int]
    rungs_after: list[int]
    settings_after: list[str]
    error: float  # at the settings training goes on with before any descent (after retreats)
    candidate_error: float | None  # of the joint descent, when one was tried
    budget: float
    noise: float
    retreats: int
    descended: bool
    probes: int
    nfe_forward: int  # every evaluation of every probe
    rows: int  # samples per probe


def ladder_policies(module: nn.Module) -> list[LadderPolicy]:
    """The distinct :class:`LadderPolicy` objects of ``module``'s solvers (a
    :class:`~tolgate.ladder.LadderGate`'s base), in solver order; ``TypeError`` naming the solver
    whose policy is something else."""
    policies: list[LadderPolicy] = []
    for k, solver in enumerate(gated_solvers(module)):
        policy = _ladder_policy(solver)
        if policy is None:
            raise TypeError(
                f"solver {k} has policy {type(solver.policy).__name__}; climb needs a LadderPolicy "
                "(or a LadderGate on one)"
            )
        if all(policy is not p for p in policies):
            policies.append(policy)
    if not policies:
        raise ValueError(f"{type(module).__name__} contains no GatedSolver: nothing to climb")
    return policies


def climb(
    module: nn.Module,
    objective: Objective,
    noise_seed: int,
    batch_size: int,
    reference: SolverSetting = REFERENCE_SETTING,
    fraction: float = 0.1,
    turn: int = 0,
) -> ClimbReport:
    """One check-and-move of every :class:`~tolgate.ladder.LadderPolicy` in ``module`` (see the
    module docstring). ``objective``: ``() -> (rows,)`` per-sample losses of the probe rows;
    ``noise_seed``: the probes' common random numbers; ``batch_size``: the *training* minibatch
    size; ``turn``: which block tries alone when a joint descent fails (``turn % blocks``)."""
    if not fraction > 0:
        raise ValueError(f"fraction must be > 0, got {fraction!r}")
    policies = ladder_policies(module)
    before = [p.index for p in policies]
    fixed = FixedSetting(reference)
    ref = run_probe(module, objective, lambda solver: fixed, noise_seed)
    noise = minibatch_noise(ref, batch_size)
    budget = fraction * noise
    probes = [ref]

    def probe(settings: dict[int, SolverSetting]) -> Probe:
        policy_of = {id(p): FixedSetting(settings.get(id(p), p.setting)) for p in policies}
        probes.append(run_probe(module, objective, lambda solver: policy_of[id(_ladder_policy(solver))], noise_seed))
        return probes[-1]

    current = probe({})
    retreats = 0
    while current.error_against(ref) > budget and any(p.index > 0 for p in policies):
        current = _retreat(policies, ref, probe)
        retreats += 1
    error, candidate_error, descended = current.error_against(ref), None, False
    if retreats == 0 and error <= budget:
        candidate_error, descended = _descend(policies, current, ref, budget, probe, turn, module)
    return ClimbReport(
        rungs_before=before,
        rungs_after=[p.index for p in policies],
        settings_after=[str(p.setting) for p in policies],
        error=error,
        candidate_error=candidate_error,
        budget=budget,
        noise=noise,
        retreats=retreats,
        descended=descended,
        probes=len(probes),
        nfe_forward=sum(p.nfe_forward for p in probes),
        rows=int(ref.objective.numel()),
    )


def _retreat(policies: list[LadderPolicy], ref: Probe, probe: Callable[[dict[int, SolverSetting]], Probe]) -> Probe:
    """Step 2's move: of the blocks that can go one rung up, the one whose retreat leaves the
    smallest error goes (one probe per candidate block); returns the probe it stands on now."""
    trials = [(p, probe({id(p): p.ladder[p.index - 1]})) for p in policies if p.index > 0]
    policy, trial = min(trials, key=lambda pair: pair[1].error_against(ref))
    policy.move_to(policy.index - 1)
    return trial


def _descend(
    policies: list[LadderPolicy],
    current: Probe,
    ref: Probe,
    budget: float,
    probe: Callable[[dict[int, SolverSetting]], Probe],
    turn: int,
    module: nn.Module,
) -> tuple[float | None, bool]:
    """Step 3 of the rule; returns the error of the first candidate tried (every block at its
    cheapest eligible rung; ``None`` if no block could move) and whether any block moved."""
    nfe_now = _nfe_per_solve(module, current)
    movable = [p for p in policies if p.cheaper(nfe_now[id(p)])]
    if not movable:
        return None, False
    accepted: dict[int, SolverSetting] = {}

    def passes(moves: dict[int, SolverSetting]) -> tuple[bool, float, int]:
        candidate = probe({**accepted, **moves})
        error = candidate.error_against(ref)
        return error <= budget and candidate.nfe_forward <= current.nfe_forward, error, candidate.nfe_forward

    cheapest = {id(p): p.cheaper(nfe_now[id(p)])[-1] for p in movable}
    # 1. the cheapest first, every block together: where a smooth field often ends
    ok, first_error, _ = passes({id(p): p.ladder[cheapest[id(p)]] for p in movable})
    if ok:
        for p in movable:
            p.move_to(cheapest[id(p)])
        return first_error, True
    # 2. block by block, each at its cheapest with the moves already taken
    if len(movable) > 1:
        for p in movable:
            if passes({id(p): p.ladder[cheapest[id(p)]]})[0]:
                accepted[id(p)] = p.ladder[cheapest[id(p)]]
                p.move_to(cheapest[id(p)])
    # 3. one block that did not move, in turn: the cheapest passing rung of each method by
    #    bisection (within a method the ladder is monotone in accuracy), the fewer evaluations of the two
    stuck = [p for p in movable if id(p) not in accepted]
    if stuck:
        policy = stuck[turn % len(stuck)]
        found = []
        for rungs in _by_method(policy, policy.cheaper(nfe_now[id(policy)])):
            tried = rungs[-1] == cheapest[id(policy)]  # the block's cheapest failed above
            result = _cheapest_passing(rungs, lambda r: passes({id(policy): policy.ladder[r]}), tried)
            if result is not None:
                found.append(result)
        if found:
            rung = min(found, key=lambda pair: pair[1])[0]
            accepted[id(policy)] = policy.ladder[rung]
            policy.move_to(rung)
    return first_error, bool(accepted)


def _by_method(policy: LadderPolicy, rungs: list[int]) -> list[list[int]]:
    """``rungs`` (expensive to cheap) split by method, each in ladder order."""
    groups: dict[str, list[int]] = {}
    for rung in rungs:
        groups.setdefault(policy.ladder[rung].method, []).append(rung)
    return list(groups.values())


def _cheapest_passing(
    rungs: list[int], test: Callable[[int], tuple[bool, float, int]], cheapest_failed: bool
) -> tuple[int, int] | None:
    """``(rung, probe NFE)`` of the cheapest of ``rungs`` (one method, expensive to cheap) that
    passes ``test``, by bisection (a rung passes when a cheaper one of its method does), the
    cheapest tried first unless ``cheapest_failed``; ``None`` if none passes."""
    if not cheapest_failed:
        ok, _, nfe = test(rungs[-1])
        if ok:
            return rungs[-1], nfe
    best, passing, failing = None, -1, len(rungs) - 1
    while failing - passing > 1:
        middle = (passing + failing) // 2
        ok, _, nfe = test(rungs[middle])
        if ok:
            best, passing = (rungs[middle], nfe), middle
        else:
            failing = middle
    return best


def _nfe_per_solve(module: nn.Module, probe: Probe) -> dict[int, float]:
    """Mean forward evaluations per solve of each policy's solvers in ``probe`` (by policy id)."""
    totals: dict[int, list[int]] = {}
    solvers: list[GatedSolver] = list(gated_solvers(module))
    for solver, records in zip(solvers, probe.records_by_solver, strict=True):
        entry = totals.setdefault(id(_ladder_policy(solver)), [0, 0])
        entry[0] += sum(r.nfe_forward for r in records)
        entry[1] += len(records)
    return {key: total / max(count, 1) for key, (total, count) in totals.items()}


def _ladder_policy(solver: GatedSolver) -> LadderPolicy | None:
    """The solver's :class:`LadderPolicy`: its policy, or a :class:`LadderGate`'s base."""
    policy = solver.policy.base if isinstance(solver.policy, LadderGate) else solver.policy
    return policy if isinstance(policy, LadderPolicy) else None
