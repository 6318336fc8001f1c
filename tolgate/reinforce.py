"""Where the REINFORCE loss is formed (InfoCNF paper, Eq. 6-7).

Objective (Eq. 6): ``J = E_g[ L + (alpha / N) * sum_i NFE_i ]`` over ``N`` gated solves, with
reward ``R_i = -NFE_i``. Its score-function gradient (Eq. 7) uses the cumulative future return

    r_i = -( L - (alpha / N) * sum_{j >= i} R_j )

and the surrogate whose gradient is the REINFORCE term:

    surrogate = - sum_i  log p(g_i | x) * (r_i - b_i)

Three choices, each for a reason:

* ``L`` is detached. The return is a number that weights the score ``grad log p``; if it carried
  a graph, the surrogate would also scale the flow's own gradient (the original code's bug).
* The ``alpha / N`` factor makes ``alpha`` a price per evaluation of the *average* solve:
  ``(alpha / N) * sum_j NFE_j = alpha * mean_j NFE_j``, the same meaning for 2 solves or 16.
  ``nfe_scale`` further divides NFE by a reference count if you want ``alpha`` unit-free.
* ``b_i`` is a running mean of ``r_i`` per solve index (:class:`RunningMeanBaseline`): it
  removes the large common offset ``-L`` and the typical cost of each block, so only whether a
  draw did better or worse than usual moves the gate. It does not bias the gradient, since it
  does not depend on the draw.

Rewards use forward NFE by default: they are known when the forward pass ends, so one backward
of ``task_loss + reinforce_loss(...)`` suffices. ``include_backward=True`` adds the backward
NFE, which exists only after autograd's backward has run through the solves; then the order is::

    loss = model(x)                        # forward solves fill records (forward NFE)
    loss.backward()                        # backward NFE filled in
    reinforce_loss(records, loss, alpha, baseline, include_backward=True).backward()
    optimizer.step()

Per-sample records (``nfe_per_sample`` and a ``(batch,)`` ``log_prob``) give each sample its own
return; batch-level records broadcast. The surrogate averages over the batch, so its scale does
not depend on the batch size.

Nothing non-finite is folded in. A NaN or infinite task loss, ``alpha`` or ``nfe_scale`` raises
``ValueError`` before the baseline is touched: one bad batch would otherwise make the running
mean NaN for good (every later advantage NaN, the gate's gradient NaN). Raising, not skipping,
because the caller's own ``loss.backward()`` on that batch is just as poisoned and should stop
the same way; the baseline stays usable if the caller catches the error and skips the batch.

Two call orders lose the signal without an error, so they are detected:

* ``include_backward=True`` before autograd's backward: every record still has
  ``nfe_backward == 0``, which no solve that feeds the loss leaves behind, so
  :func:`solve_rewards` raises instead of rewarding forward NFE only.
* a training-mode solve under ``torch.no_grad``: :meth:`tolgate.GaussianGate.draw` computes its
  distribution with grad enabled whenever the gate has trainable parameters, so ``log_prob``
  stays differentiable whatever the grad mode of the solve around it (the probes rely on the
  same). Records whose ``log_prob`` has no grad come only from frozen gates (or
  ``torch.inference_mode``, where nothing is differentiable) and add no term.

That is the paper's estimator, one draw per solve per batch. Its return is dominated by the
batch-to-batch noise of ``L`` and it rewards solver error that lowers ``L``; the estimator that
learns, :class:`tolgate.probes.ProbedGateEstimator`, draws several tolerances on the *same* batch
and forms :func:`leave_one_out_loss` from a reference-calibrated return instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .records import SolveRecord


class RunningMeanBaseline:
    """Exponential running mean of the return ``r_i``, one entry per solve index ``i``.

    ``momentum`` close to 1 averages over many steps. The first call initialises to the
    returns seen, so the first advantage is zero rather than ``-L``.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.values: torch.Tensor | None = None

    def update(self, returns: torch.Tensor) -> torch.Tensor:
        """Return the baseline for ``returns`` (shape ``(N,)`` or ``(N, batch)``), then fold them in.

        Non-finite returns raise ``ValueError`` and leave the running mean as it was.
        """
        if returns.dim() == 0 or returns.shape[0] == 0:
            raise ValueError(f"returns must have shape (N,) or (N, batch) with N >= 1, got {tuple(returns.shape)}")
        _check_all_finite(returns, "returns")
        per_index = returns.detach().reshape(returns.shape[0], -1).mean(dim=1).to(torch.float64)
        if self.values is None or self.values.shape != per_index.shape:
            self.values = per_index.clone()
        baseline = self.values.clone()
        self.values = self.momentum * self.values + (1.0 - self.momentum) * per_index
        return baseline.to(returns.dtype).view(-1, *([1] * (returns.dim() - 1)))

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "values": self.values}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; a momentum outside ``[0, 1)`` or non-finite values raise ``ValueError``."""
        momentum = float(state["momentum"])
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        values = state["values"]
        if values is not None:
            if not isinstance(values, torch.Tensor) or values.dim() != 1:
                raise ValueError(f"baseline values must be None or a tensor of shape (N,), got {values!r}")
            _check_all_finite(values, "baseline values")
        self.momentum, self.values = momentum, values


def _check_all_finite(values: torch.Tensor, name: str) -> None:
    """``ValueError`` naming ``name`` and its first bad entries unless every element is finite."""
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        shown = values.detach()[bad].flatten()[:4].tolist()
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) (e.g. {shown}): refusing to form a "
            "REINFORCE return from them; the baseline is left unchanged"
        )


def _check_finite_number(value: float, name: str, low: float, inclusive: bool) -> None:
    """``ValueError`` unless ``value`` is finite and ``>= low`` (``> low`` when not ``inclusive``)."""
    number = float(value)
    if not math.isfinite(number) or number < low or (not inclusive and number == low):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be finite and {relation} {low:g}, got {value!r}")


def _check_backward_has_run(records: Sequence[SolveRecord]) -> None:
    """``include_backward=True`` asks for backward NFE, which autograd's backward fills in. Every
    record still at zero while some forward work was done means that backward has not run yet
    (a solve that feeds the loss always costs at least one VJP); rewarding forward NFE alone
    would silently drop the backward cost the caller asked for."""
    forward_work = any(record.nfe_forward > 0 for record in records)
    backward_seen = any(
        record.nfe_backward > 0
        or (
            "nfe_backward_per_sample" in record.extra
            and bool((torch.as_tensor(record.extra["nfe_backward_per_sample"]) > 0).any())
        )
        for record in records
    )
    if forward_work and not backward_seen:
        raise ValueError(
            f"include_backward=True but all {len(records)} record(s) have nfe_backward == 0 while their forward "
            "solves evaluated the field: autograd's backward has not run through the solves yet. Call "
            "loss.backward() first, then reinforce_loss(..., include_backward=True).backward(), or pass "
            "include_backward=False to reward forward NFE only"
        )


def solve_rewards(
    records: Sequence[SolveRecord], include_backward: bool = False, nfe_scale: float = 1.0
) -> list[torch.Tensor]:
    """``R_i = -NFE_i / nfe_scale`` per record: shape ``()``, or ``(batch,)`` for per-sample records.

    ``nfe_scale`` must be finite and > 0. With ``include_backward=True``, records whose backward
    has not run yet (all ``nfe_backward == 0`` after forward work) raise ``ValueError``.
    """
    _check_finite_number(nfe_scale, "nfe_scale", 0.0, inclusive=False)
    if include_backward:
        _check_backward_has_run(records)
    rewards = []
    for record in records:
        if record.nfe_per_sample is not None:
            nfe = record.nfe_per_sample.to(torch.float64)
            if include_backward and "nfe_backward_per_sample" in record.extra:
                nfe = nfe + record.extra["nfe_backward_per_sample"].to(torch.float64)
            elif include_backward:
                nfe = nfe + record.nfe_backward / nfe.numel()
        else:
            nfe = torch.tensor(float(record.nfe_total if include_backward else record.nfe_forward), dtype=torch.float64)
        rewards.append(-nfe / nfe_scale)
    return rewards


def cumulative_returns(task_loss: torch.Tensor, rewards: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``r_i = -(L - alpha/N * sum_{j>=i} R_j)`` stacked to ``(N,)`` or ``(N, batch)``; ``L`` detached.

    ``alpha`` must be finite and >= 0; a NaN or infinite ``task_loss`` raises ``ValueError``.
    """
    _check_finite_number(alpha, "alpha", 0.0, inclusive=True)
    n = len(rewards)
    if n == 0:
        raise ValueError("no solve records: nothing to form returns from")
    _check_all_finite(task_loss, "task_loss")
    loss = task_loss.detach().to(torch.float64)
    shapes = {tuple(r.shape) for r in rewards} | ({tuple(loss.shape)} if loss.dim() else set())
    batch_shape = max(shapes, key=len)
    future = torch.zeros(batch_shape, dtype=torch.float64)
    out = []
    for reward in reversed(rewards):
        future = future + reward.cpu()
        out.append(-(loss.cpu() - alpha / n * future))
    return torch.stack([o.expand(batch_shape) for o in reversed(out)])


def reinforce_loss(
    records: Sequence[SolveRecord],
    task_loss: torch.Tensor,
    alpha: float,
    baseline: RunningMeanBaseline | None = None,
    include_backward: bool = False,
    nfe_scale: float = 1.0,
) -> torch.Tensor:
    """The REINFORCE surrogate ``-sum_i mean_batch[log p(g_i) * (r_i - b_i)]`` (Eq. 7), shape ``()``.

    ``records``: the step's solves in network order (the order of Eq. 6's sum). Records without
    a differentiable ``log_prob`` (fixed, scheduled or frozen policies) still count in the
    returns but contribute no score term. Its gradient reaches only the gates' parameters.

    Raises ``ValueError``, before ``baseline`` is updated, for a NaN or infinite ``task_loss``,
    ``alpha`` or ``nfe_scale``, and for ``include_backward=True`` before autograd's backward.
    """
    _check_finite_number(alpha, "alpha", 0.0, inclusive=True)
    returns = cumulative_returns(task_loss, solve_rewards(records, include_backward, nfe_scale), alpha)
    advantages = returns - baseline.update(returns) if baseline is not None else returns
    terms = []
    for record, advantage in zip(records, advantages, strict=True):
        log_prob = record.log_prob
        if log_prob is None or not log_prob.requires_grad:
            continue
        advantage = advantage.to(device=log_prob.device, dtype=log_prob.dtype)
        terms.append(-(log_prob * advantage).mean())
    if not terms:
        return torch.zeros((), dtype=task_loss.dtype, device=task_loss.device)
    return torch.stack(terms).sum()


def leave_one_out_loss(log_probs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Score-function surrogate of ``K`` draws with the leave-one-out baseline, shape ``()``.

    ``log_probs`` ``(K, N)``: log-probability of draw ``k`` of solve ``i``, differentiable;
    ``rewards`` ``(K, N)`` (detached). Draw ``k`` is compared with the mean of the *other* draws
    of the same batch (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free"):

        A_ki = R_ki - mean_{j != k} R_ji = K / (K - 1) * (R_ki - mean_j R_ji)

    The baseline does not depend on draw ``k``, so the estimate stays unbiased; everything common
    to the draws of one batch (the batch's difficulty, the model's current state) cancels. The
    surrogate ``-mean_k sum_i log p_ki * A_ki`` has the gradient of ``-E[sum_i R_i]``.
    """
    if log_probs.shape != rewards.shape or log_probs.dim() != 2:
        raise ValueError(
            f"log_probs and rewards must both have shape (draws, solves); got {tuple(log_probs.shape)} "
            f"and {tuple(rewards.shape)}"
        )
    draws = log_probs.shape[0]
    if draws < 2:
        raise ValueError(f"the leave-one-out baseline needs at least 2 draws, got {draws}")
    rewards = rewards.detach()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf: refusing to form a REINFORCE gradient from them")
    advantages = draws / (draws - 1) * (rewards - rewards.mean(dim=0, keepdim=True))
    return -(log_probs * advantages).sum(dim=1).mean()
