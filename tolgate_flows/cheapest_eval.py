"""The cheapest honest evaluation: which solver setting a trained model can be evaluated at.

Training cost is only half of what a user pays: every likelihood evaluation and every sample
solves the flow again. The protocol of the studies judges every model at dopri5 1e-5; a user wants
to know how much cheaper a setting gives the same answer. :func:`evaluate_ladder` evaluates the
model at every rung of a :class:`~tolgate.SolverLadder` (one setting for every block, with
:func:`tolgate.use_policies`), on the same data and, where the caller seeds it, the same
Hutchinson noise; :func:`cheapest_honest` picks the rung of fewest evaluations whose quality stays
within ``bound`` of the reference evaluation's, either way (the studies' equal-quality bound: 0.02 nats on the
2-D testbeds, 0.01 bits/dim on digits).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from tolgate import FixedSetting, SolveError, SolverLadder, SolverSetting, use_policies

#: the rungs worth asking about: cheaper than the evaluation protocol's dopri5 1e-5
EVALUATION_LADDER = SolverLadder.default(tolerances=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1))


@dataclass(frozen=True)
class RungEvaluation:
    """A model evaluated at one ``setting``: ``quality`` (lower is better: NLL in nats or
    bits/dim) and ``nfe_forward``, the evaluations of every block together for the whole set."""

    setting: str
    quality: float
    nfe_forward: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_ladder(
    model: nn.Module, evaluate: Callable[[], tuple[float, float]], ladder: Iterable[SolverSetting] = EVALUATION_LADDER
) -> list[RungEvaluation]:
    """``evaluate()`` (returning ``(quality, nfe_forward)``) with every solver of ``model`` at each
    rung in turn. A rung whose solve fails (a step budget, a non-finite state) is left out: it is
    no honest setting."""
    results = []
    for setting in ladder:
        policy = FixedSetting(setting)
        try:
            with use_policies(model, lambda solver, policy=policy: policy):
                quality, nfe = evaluate()
        except SolveError:
            continue
        results.append(RungEvaluation(str(setting), float(quality), float(nfe)))
    return results


def cheapest_honest(evaluations: Iterable[RungEvaluation], reference: RungEvaluation, bound: float) -> RungEvaluation:
    """The evaluation of fewest NFE whose quality is within ``bound`` of ``reference.quality``
    either way (a cheap solve that reports a better NLL than the model has is as wrong as a worse
    one; the reference itself if none is cheaper); ties go to the closer quality."""
    honest = [e for e in evaluations if abs(e.quality - reference.quality) <= bound] + [reference]
    return min(honest, key=lambda e: (e.nfe_forward, abs(e.quality - reference.quality)))


def evaluate_run_ladder(
    run_dir: str | Path,
    ladder: Iterable[SolverSetting] = EVALUATION_LADDER,
    checkpoint: str = "best.pt",
    noise_seed: int = 0,
    device: str = "cpu",
) -> list[RungEvaluation]:
    """:func:`evaluate_ladder` of a finished image run (the training entry point's folder): its
    ``checkpoint`` (loaded with ``weights_only=True``) on its test split, quality in bits/dim x|y,
    the Hutchinson noise of test batch ``k`` seeded by ``(noise_seed, k)`` at every rung (common
    random numbers), the run's divergence and draws otherwise."""
    import torch

    # The image trainer (and the plotting it imports) only for run folders: the testbeds import
    # this module for evaluate_ladder alone.
    from .checkpoints import load_checkpoint
    from .data import load_dataset, make_batches
    from .models import set_divergence
    from .train import Dist, TrainConfig, build, evaluate

    run_dir = Path(run_dir)
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    dataset = load_dataset(config.dataset, config.data_dir, split_seed=0, val_fraction=config.val_fraction)
    model = build(config, dataset.image_shape, dataset.n_classes).to(torch.device(device))
    model.load_state_dict(load_checkpoint(run_dir / checkpoint, torch.device(device))["model"])
    batches = make_batches(dataset, "test", config.eval_batch_size, seed=config.seed, device=torch.device(device))
    set_divergence(model, config.eval_divergence)

    def at_rung() -> tuple[float, float]:
        metrics = evaluate(model, batches, dataset.levels, Dist(), None, config.eval_draws, noise_seed)
        return metrics["bpd_cond"], metrics["nfe_forward"]

    return evaluate_ladder(model, at_rung, ladder)
