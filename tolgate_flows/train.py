"""Training and evaluation of CNF / CCNF / InfoCNF with any tolgate tolerance policy.

One entry point (:func:`run`) configured by a :class:`TrainConfig`; experiments differ in
configuration only. A training step, in order:

1. every block's GatedSolver takes its tolerance from its policy; the step's solves are collected
   with :func:`tolgate.collect_records`;
2. ``J = bits/dim(x|y) + beta * cross-entropy`` (Eq. 4) is formed from the model's output, and
   the weighted penalties of the levers are added to it (:func:`~tolgate_flows.levers.with_penalties`:
   RNODE's kinetic energy and Jacobian norm, the solver's local error and stiffness);
3. :class:`~tolgate_flows.tolerance.ToleranceLearner` runs the backward: ``J`` (with penalties)
   alone, or with the paper's REINFORCE surrogate (Eq. 7) for ``--estimator paper``, whose return
   sees ``J`` alone;
4. every ``probe_every`` steps it probes the batch's first ``probe_size`` rows: the probe
   estimator adds the gates' gradient, the adaptive policy recalibrates its tolerance;
5. gradients averaged over ranks, one optimiser step.

Evaluation always uses the fixed tolerance ``eval_tol`` (never the sampled training tolerance) with
the adaptive ``method`` (also under ``--train-method``, the fixed grid of training), the end time 1
(also under ``--steer``) and the divergence estimator ``eval_divergence``, the same for every model.

Data parallelism (``torchrun --nproc_per_node=N``): each rank takes its shard of every global
batch; gradients are averaged with an explicit all-reduce after the (one or two) backward passes,
not by DistributedDataParallel's autograd hooks. Tried and refused by DDP's reducer ("Expected to
mark a variable ready only once"): the divergence calls ``torch.autograd.grad`` inside the ODE
function during the forward pass, which fires DDP's hooks before the real backward. The explicit
all-reduce also covers the REINFORCE backward that follows the task loss's when the reward
includes backward NFE, and gates that have no gradient. NFE and tolerances are all-reduced, so the
logs report every rank, never rank 0 alone.
"""

from __future__ import annotations

import _thread
import contextlib
import copy
import functools
import json
import math
import os
import signal
import threading
import time
import typing
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from tolgate import (
    ConvGate,
    FixedTolerance,
    SolveError,
    collect_records,
    gated_solvers,
    set_progress,
)
from tolgate.solver import ADAPTIVE_METHODS, BACKEND_NAMES, PER_SAMPLE_METHODS

from . import plots
from .checkpoints import (
    CONFIG_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    RunFolderError,
    check_output_folder,
    check_resume,
    load_checkpoint,
    read_history,
    save_atomic,
    write_history,
)
from .cnf import DIVERGENCES, NOISES
from .conditioning import ZY_LOCATIONS
from .data import DATASET_NAMES, ImageDataset, bits_per_dim, derived_seed, load_dataset, make_batches
from .levers import (
    PENALTIES,
    TRAIN_METHODS,
    LeverConfig,
    PenaltyValues,
    check_compatible,
    seminorm_options,
    with_penalties,
)
from .models import MODEL_KINDS, FlowModel, ModelConfig, build_model, set_divergence
from .odefuncs import TIME_EMBEDDINGS
from .tolerance import (
    ESTIMATORS,
    TOLERANCE_MODES,
    ToleranceConfig,
    ToleranceLearner,
    make_optimizer,
    policy_factory,
)

# Step budget of every solve (attempted steps, accepted or rejected, per output interval). A dopri5
# solve of these models takes a handful of steps (digits: 3-6 at 1e-5 and at 1e-8, ~5 per block
# after 30 epochs at 1e-5; the paper's CIFAR-10 NFE put it near 10). 1000 leaves two orders of
# magnitude of headroom, while a stiff field or hopeless tolerance stops with StepBudgetExceeded
# instead of running for ever. Raise it with --max-num-steps.
DEFAULT_MAX_NUM_STEPS = 1000


def _run_model() -> ModelConfig:
    """The model a run trains by default: ModelConfig's defaults with the run's step budget."""
    return ModelConfig(max_num_steps=DEFAULT_MAX_NUM_STEPS)


def _run_tolerance() -> ToleranceConfig:
    """The tolerance side of a run by default: ToleranceConfig's defaults with probes of 16 rows, the
    entry point's since the digits study (issue 9; the testbeds keep ToleranceConfig's 32)."""
    return ToleranceConfig(probe_size=16)


@dataclass
class TrainConfig:
    """Every knob of a run: the training loop's own here, the model's in ``model`` (a
    :class:`ModelConfig`; the levers are ``model.levers``), the tolerance side's in ``tolerance`` (a
    :class:`ToleranceConfig`). Tolerances are rtol = atol; ``tolerance.alpha`` prices one NFE (Eq. 6).

    Some nested fields belong to the run, not to the part that declares them: ``tolerance.epochs``,
    ``tolerance.per_sample`` and ``tolerance.reference_tol`` are set here from ``epochs``,
    ``model.backend`` and ``eval_tol`` (probes compare with the evaluation tolerance), whatever they
    were given as; ``model.image_shape`` and ``model.n_classes`` are the data's, set by the trainer
    once it has loaded it (:meth:`for_data`).

    The command line names every setting by a flat name (:data:`SETTINGS`: ``--hidden`` is
    ``model.hidden``, ``--model`` is ``model.kind``, ``--tolerance`` is ``tolerance.mode``);
    :meth:`from_settings` builds a configuration from those names and :meth:`from_dict` reads a
    stored one in the nested layout or in the flat one of runs written before it.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: ModelConfig = field(default_factory=_run_model)
    tolerance: ToleranceConfig = field(default_factory=_run_tolerance)
    eval_tol: float = 1e-5
    batch_size: int = 256
    epochs: int = 10
    lr: float = 1e-3
    gate_lr: float | None = None
    lr_decay_epoch: int | None = None
    lr_decay: float = 0.1
    warmup_iters: int = 0
    grad_clip: float | None = None
    beta: float = 0.5
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"
    seminorm: bool = False
    eval_divergence: str = "hutchinson"
    eval_draws: int = 1
    eval_noise_seed: int | None = None
    eval_batch_size: int = 500
    max_train_batches: int | None = None
    max_eval_batches: int | None = None
    val_fraction: float = 0.1
    recheck_tols: list[float] = field(default_factory=list)
    sample_every: int = 0
    progress_bar: bool = True

    def __post_init__(self) -> None:
        """Refuse every bad value here, before any data is read or anything trained; each message
        names the setting, its value and the range it broke."""
        _check_parts(self)
        _check_tolerances(self)
        _check_choices(self)
        _check_counts(self)
        _check_rates(self)
        self.tolerance = replace(
            self.tolerance, epochs=self.epochs, per_sample=self.per_sample, reference_tol=self.eval_tol
        )
        _check_combinations(self)

    @property
    def per_sample(self) -> bool:
        """Does the run use the per-sample backend (``"per_sample"``, or its old name ``"tolgate"``)?"""
        return self.model.backend in ("per_sample", "tolgate")

    @property
    def levers(self) -> LeverConfig:
        """The run's levers (RNODE, solver penalties, STEER, fixed-grid training): the model's."""
        return self.model.levers

    def settings(self) -> dict[str, Any]:
        """Every setting by its flat name (:data:`SETTINGS`): the run as the command line sees it."""
        return {name: setting.get(self) for name, setting in SETTINGS.items()}

    def for_data(self, image_shape: tuple[int, int, int], n_classes: int) -> TrainConfig:
        """This configuration with the model sized for the data: its image shape and class count."""
        return replace(self, model=replace(self.model, image_shape=tuple(image_shape), n_classes=n_classes))

    @classmethod
    def from_settings(cls, **settings: Any) -> TrainConfig:
        """The run's defaults with ``settings`` (flat names, as flags and presets give them:
        ``hidden=8, tolerance="learned"``); a name that is no setting is refused."""
        return cls.from_dict(with_settings({}, settings))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Inverse of ``dataclasses.asdict``, also for the flat layout of earlier runs
        (:func:`upgrade_config`). Settings ``values`` lacks take the run's defaults; keys that are
        no setting (of a version that had them) are ignored."""
        return _build(cls, _merged(asdict(cls()), upgrade_config(values)))


# ----------------------------------------------------------------------------- flat names

# Nested fields whose flat name is not their own: the flags --model and --tolerance name the kind and the mode.
_RENAMED: dict[tuple[str, ...], str] = {("model", "kind"): "model", ("tolerance", "mode"): "tolerance"}
# Nested fields without a flag: those the run sets (see TrainConfig) ...
_SET_BY_RUN = frozenset(
    {
        ("model", "image_shape"),
        ("model", "n_classes"),
        ("tolerance", "epochs"),
        ("tolerance", "per_sample"),
        ("tolerance", "reference_tol"),
    }
)
# ... and those the command line leaves at their class's defaults (the Python API may set them).
_NOT_OFFERED = frozenset(
    {
        ("model", "odefunc_layers"),
        ("model", "divergence"),
        ("model", "logit_alpha"),
        ("model", "dropout"),
        ("tolerance", "exploration_std"),
        ("tolerance", "tolerance_low"),
        ("tolerance", "tolerance_high"),
    }
)
UNFLAGGED: frozenset[tuple[str, ...]] = _SET_BY_RUN | _NOT_OFFERED


@dataclass(frozen=True)
class Setting:
    """One setting of the command line: its flat name (the flag's, and the key under which runs
    written before the configuration was nested stored it), its place in a :class:`TrainConfig`
    (``("model", "levers", "kinetic")``) and its type as the declaring dataclass states it."""

    name: str
    path: tuple[str, ...]
    hint: Any

    def get(self, config: object) -> Any:
        for key in self.path:
            config = getattr(config, key)
        return config


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _settings(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Setting]:
    """Every leaf field below ``cls`` that has a flag, in declaration order; a field whose type is a
    dataclass is a nested configuration, walked in its place."""
    for f in fields(cls):
        path, hint = (*prefix, f.name), _hints(cls)[f.name]
        if is_dataclass(hint):
            yield from _settings(hint, path)
        elif path not in UNFLAGGED:
            yield Setting(_RENAMED.get(path, f.name), path, hint)


def _by_name(settings: Iterator[Setting]) -> dict[str, Setting]:
    index: dict[str, Setting] = {}
    for setting in settings:
        if setting.name in index:
            raise TypeError(
                f"{'.'.join(index[setting.name].path)} and {'.'.join(setting.path)} would share the flag name "
                f"{setting.name!r}: give one another name in _RENAMED, or list it in _SET_BY_RUN or _NOT_OFFERED"
            )
        index[setting.name] = setting
    return index


#: flat name -> setting, for every field of a TrainConfig and of its nested parts that has a flag
SETTINGS: dict[str, Setting] = _by_name(_settings(TrainConfig))


def upgrade_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """A stored configuration in the nested layout (a copy). Runs written before the configuration
    was nested stored every setting at the top level by its flat name (``"model": "infocnf"``,
    ``"hidden": 16``, ``"kinetic": 0.0``); each such key moves to its place (``{"model": {"kind":
    "infocnf", "hidden": 16, "levers": {"kinetic": 0.0}}}``). A nested configuration comes back as
    it was; keys that are no setting stay, for the reader to ignore."""
    nested = {key: asdict(value) if is_dataclass(value) else copy.deepcopy(value) for key, value in values.items()}
    flat = {
        name: nested.pop(name)
        for name, setting in SETTINGS.items()
        if len(setting.path) > 1 and name in nested and not isinstance(nested[name], Mapping)
    }
    for name, value in flat.items():
        _put(nested, SETTINGS[name].path, value)
    return nested


def with_settings(values: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (either layout) in the nested layout with ``settings`` (flat names) put in place;
    a name that is no setting is refused."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    nested = upgrade_config(values)
    for name, value in settings.items():
        _put(nested, SETTINGS[name].path, value)
    return nested


_ABSENT = object()


def stored_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """A stored configuration (either layout) by flat name: the settings it holds, comparable with
    :meth:`TrainConfig.settings` (a setting it lacks, written by an older version, is absent)."""
    nested, found = upgrade_config(values), {}
    for name, setting in SETTINGS.items():
        place = nested
        for key in setting.path:
            place = place.get(key, _ABSENT) if isinstance(place, Mapping) else _ABSENT
        if place is not _ABSENT:
            found[name] = place
    return found


def _put(values: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        values = values.setdefault(key, {})
    values[path[-1]] = value


def _merged(defaults: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` with ``values`` in place, nested dictionaries merged key by key; keys that
    ``defaults`` lacks are dropped."""
    return {
        key: _merged(default, values[key])
        if isinstance(default, dict) and isinstance(values.get(key), Mapping)
        else values.get(key, default)
        for key, default in defaults.items()
    }


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` with every nested dictionary built into its field's dataclass first."""
    hints = _hints(cls)
    return cls(
        **{
            name: _build(hints[name], value) if is_dataclass(hints[name]) and isinstance(value, Mapping) else value
            for name, value in values.items()
        }
    )


# ----------------------------------------------------------------------------- checks

# Every setting with a fixed set of values, read from the module that declares the set; the command
# line offers exactly these. ``method`` is every method of some backend; each backend's own list is
# checked in :func:`_check_choices`.
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASET_NAMES,
    "model": MODEL_KINDS,
    "tolerance": TOLERANCE_MODES,
    "estimator": ESTIMATORS,
    "backend": BACKEND_NAMES,
    "method": tuple(dict.fromkeys(ADAPTIVE_METHODS + PER_SAMPLE_METHODS)),
    "noise": NOISES,
    "time_embedding": TIME_EMBEDDINGS,
    "zy_location": ZY_LOCATIONS,
    "eval_divergence": DIVERGENCES,
    "train_method": TRAIN_METHODS,
}
# Settings of CHOICES that may also be None (off).
_OPTIONAL_CHOICES = ("train_method",)


def _check_parts(config: TrainConfig) -> None:
    """The nested parts are their dataclasses (flat settings go through :meth:`TrainConfig.from_settings`)."""
    for name, cls in (("model", ModelConfig), ("tolerance", ToleranceConfig)):
        value = getattr(config, name)
        if not isinstance(value, cls):
            raise TypeError(
                f"TrainConfig.{name} must be a {cls.__name__}, got {value!r}; to give the --{name} flag's value "
                f"({SETTINGS[name].path[-1]}) or other settings by their flat names use TrainConfig.from_settings"
            )


def _check_choices(config: TrainConfig) -> None:
    settings = config.settings()
    methods = PER_SAMPLE_METHODS if config.per_sample else ADAPTIVE_METHODS
    for name, choices in (*CHOICES.items(), ("method", methods)):
        if settings[name] is None and name in _OPTIONAL_CHOICES:
            continue
        if settings[name] not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {settings[name]!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_counts(config: TrainConfig) -> None:
    """Integers: at least 1 (sizes, budgets), at least 0 (offsets, seeds), or ``None`` where allowed."""
    settings = config.settings()
    for name, least, optional in (
        ("batch_size", 1, False),
        ("epochs", 1, False),
        ("eval_batch_size", 1, False),
        ("eval_draws", 1, False),
        ("hidden", 1, False),
        ("n_flows", 1, False),
        ("n_scales", 1, True),
        ("max_train_batches", 1, True),
        ("max_eval_batches", 1, True),
        ("max_num_steps", 1, True),
        ("warmup_iters", 0, False),
        ("lr_decay_epoch", 0, True),
        ("sample_every", 0, False),
        ("seed", 0, False),
        ("eval_noise_seed", 0, True),
    ):
        value = settings[name]
        if optional and value is None:
            continue
        if not _is_int(value) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}{' or None' if optional else ''}; got {value!r}")


def _check_rates(config: TrainConfig) -> None:
    """Learning rates, clipping and loss weights: finite, and positive or non-negative."""
    settings = config.settings()
    for name, positive, optional in (
        ("lr", True, False),
        ("gate_lr", True, True),
        ("lr_decay", True, False),
        ("grad_clip", True, True),
        ("beta", False, False),
        ("reward_loss_weight", False, False),
    ):
        value = settings[name]
        if optional and value is None:
            continue
        if not _is_real(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"{name} must be finite and {bound}{' or None' if optional else ''}; got {value!r}")
    for name, inside, interval in (
        ("baseline_momentum", lambda v: 0 <= v < 1, "[0, 1)"),
        ("val_fraction", lambda v: 0 < v < 1, "(0, 1)"),
        ("zy_fraction", lambda v: 0 < v <= 1, "(0, 1]"),
    ):
        value = settings[name]
        if not (_is_real(value) and inside(value)):
            raise ValueError(f"{name} must be in {interval}; got {value!r}")


def _check_tolerances(config: TrainConfig) -> None:
    for name, value in [("eval_tol", config.eval_tol)] + [("recheck_tols", tol) for tol in config.recheck_tols]:
        if not (_is_real(value) and 0 < value <= 1):
            raise ValueError(f"{name} must be in (0, 1]; got {value!r}")
    for value in config.tolerance.gate_mean_log10 or []:
        if not (_is_real(value) and value <= 0):
            raise ValueError(f"gate_mean_log10 must hold finite log10 tolerances <= 0; got {value!r}")


def _check_combinations(config: TrainConfig) -> None:
    if config.seminorm and not config.model.adjoint:
        raise ValueError("seminorm applies to the adjoint solve: set adjoint as well")
    if config.per_sample and config.model.adjoint:
        raise ValueError("the per-sample backend has no adjoint: drop adjoint (it backpropagates through the solver)")
    try:
        torch.device(config.device)
    except RuntimeError as exc:
        raise ValueError(f"device {config.device!r} is not a torch device ({exc})") from None
    if not isinstance(config.out, str) or not config.out:
        raise ValueError(f"out must be a folder name; got {config.out!r}")
    check_compatible(
        config.levers, adjoint=config.model.adjoint, per_sample=config.per_sample, tolerance_mode=config.tolerance.mode
    )


# 2 CPU cores, 8x8 digits: a small network, a few minutes per run.
_CPU = dict(
    dataset="digits",
    batch_size=128,
    epochs=4,
    lr=3e-3,
    # The probe estimator updates the gates every probe_every steps only: a larger step than the
    # paper estimator's 3e-2 (which the grid preset keeps) lets them settle within a few epochs.
    gate_lr=1e-1,
    hidden=16,
    n_flows=1,
    eval_batch_size=512,
    sample_every=4,
)
PRESETS: dict[str, dict] = {
    # Section 4.1: batch 900, 400 epochs, Adam lr 1e-3 decayed to 1e-4 after epoch 250.
    "paper-small": dict(batch_size=900, epochs=400, lr=1e-3, lr_decay_epoch=250, warmup_iters=1000),
    # Section 4.1 / REFERENCE-FACTS: batch 8000, lr 1e-2 decayed to 1e-3 at epoch 120, clip 20.
    "paper-large": dict(batch_size=8000, epochs=400, lr=1e-2, lr_decay_epoch=120, warmup_iters=1000, grad_clip=20.0),
    "cpu": _CPU,
    # Issue 4's grid: the cpu preset trained longer (reproduce_table1.py's --epochs, default 8, sets it); every row
    # shares it.
    "grid": {**_CPU, "epochs": 8, "sample_every": 8, "gate_lr": 3e-2},
}
# The preset a fresh command-line run starts from when --preset is left out, per dataset. The field
# defaults are the paper's GPU settings (batch 256, 64 filters, 2 flows per scale): on the 8x8 digits
# and 2 CPU cores that is about 2.5 minutes and 5 GB per iteration, so --dataset digits alone takes the
# cpu preset (an epoch in about a minute). --preset none restores the field defaults.
DATASET_PRESETS: dict[str, str] = {"digits": "cpu"}
NO_PRESET = "none"


# ----------------------------------------------------------------------------- policies


def gate_mean_from_run(run_dir: str | Path) -> list[float]:
    """Per-block mean log10 tolerance drawn in the final training epoch of a learned run."""
    path = Path(run_dir) / METRICS_FILE
    history = read_history(path)
    if not history:
        raise FileNotFoundError(f"{path} not found or empty: --gate-mean-from needs a finished learned-tolerance run")
    means = history[-1]["train"].get("tol_log10_mean")
    if not means or any(m is None for m in means):
        raise ValueError(f"{path}: the last epoch has no per-block tolerances (was it a learned run?)")
    return [float(m) for m in means]


def build(config: TrainConfig, image_shape: tuple[int, int, int], n_classes: int) -> FlowModel:
    """The run's model for images of ``image_shape`` in ``n_classes`` classes, on the CPU
    (``seminorm`` without ``adjoint`` is refused by TrainConfig itself)."""
    policies = policy_factory(config.tolerance, gate_net=ConvGate)
    model_config = config.for_data(image_shape, n_classes).model
    model = build_model(model_config, policies, eval_policy=FixedTolerance(config.eval_tol))
    if config.seminorm:
        for solver in gated_solvers(model):
            solver.adjoint_options = seminorm_options(model_config.max_num_steps)
    return model


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a list of floats over ranks (identity on one process)."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: float, device: torch.device) -> list[float]:
        if self.world == 1:
            return [value]
        out = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor(value, dtype=torch.float64, device=device))
        return [float(v) for v in out]


def init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


def average_gradients(model: torch.nn.Module, ranks: Dist) -> None:
    if ranks.world == 1:
        return
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= ranks.world


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: FlowModel,
    batches,
    levels: int,
    ranks: Dist,
    max_batches: int | None = None,
    draws: int = 1,
    noise_seed: int | None = None,
) -> dict:
    """Conditional and marginal bits/dim, classification error and forward NFE on one split.

    Runs in eval mode: every solver uses its eval policy (a fixed tolerance), never a draw.
    ``draws`` Hutchinson estimates of ``log p`` per image are averaged (each is unbiased, so their
    mean is; the latent, hence the classifier, does not depend on the noise). With ``noise_seed``
    the noise of batch ``k`` is drawn from ``derived_seed(noise_seed, k)`` in a forked RNG: every
    model and every tolerance is then evaluated on the same noise (common random numbers), and the
    training noise stream is left as it was. ``nfe_forward`` is that of one evaluation pass.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    model.eval()
    totals = [0.0] * 6  # n, bpd_cond, bpd_marginal, errors, cross-entropy (sums), nfe_forward (per batch, all blocks)
    n_batches = 0
    for k, batch in enumerate(batches.epoch(0)):
        if max_batches is not None and k >= max_batches:
            break
        if batch.x.shape[0] == 0:
            continue
        with _evaluation_noise(noise_seed, k, batch.x.device), collect_records(model) as records:
            outs = [model(batch.x, batch.y if model.conditional else None) for _ in range(draws)]
        out = outs[0]
        log_px = torch.stack([o.log_px for o in outs]).mean(dim=0)
        marginal = torch.stack([model.marginal_log_px(o) for o in outs]).mean(dim=0)
        totals[0] += batch.x.shape[0]
        totals[1] += float(bits_per_dim(log_px, model.dims, levels).sum())
        totals[2] += float(bits_per_dim(marginal, model.dims, levels).sum())
        if out.logits is not None:
            totals[3] += float((out.logits.argmax(dim=1) != batch.y).sum())
            totals[4] += float(torch.nn.functional.cross_entropy(out.logits, batch.y, reduction="sum"))
        totals[5] += sum(r.nfe_forward for r in records) / draws
        n_batches += 1
    n, cond, marg, errors, ce, nfe = ranks.sum(totals, next(model.parameters()).device)
    batches_all = ranks.sum([float(n_batches)], next(model.parameters()).device)[0]
    return {
        "n": int(n),
        "bpd_cond": cond / n,
        "bpd_marginal": marg / n,
        "error": errors / n if model.conditional else None,
        "cross_entropy": ce / n if model.conditional else None,
        "nfe_forward": nfe / max(batches_all, 1.0),
    }


def evaluate_as_configured(model: FlowModel, batches, levels: int, ranks: Dist, config: TrainConfig) -> dict:
    """:func:`evaluate` with the run's evaluation settings (divergence, draws, noise seed, batch
    limit); the blocks return to Hutchinson's estimator for training afterwards."""
    set_divergence(model, config.eval_divergence)
    try:
        return evaluate(
            model, batches, levels, ranks, config.max_eval_batches, config.eval_draws, config.eval_noise_seed
        )
    finally:
        set_divergence(model, "hutchinson")


@contextlib.contextmanager
def _evaluation_noise(noise_seed: int | None, batch: int, device: torch.device):
    """Seed batch ``batch``'s evaluation noise in a forked RNG; nothing when ``noise_seed`` is None."""
    if noise_seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derived_seed(noise_seed, batch))
        yield


# ----------------------------------------------------------------------------- epoch metrics


def _epoch_accumulator(n_blocks: int) -> dict:
    return {
        "iters": 0,
        "images": 0,
        "loss": 0.0,
        "bpd": 0.0,
        "ce": 0.0,
        "errors": 0.0,
        "seconds": 0.0,
        "nfe_forward": 0.0,
        "nfe_sample_mean": 0.0,
        "nfe_backward": 0.0,
        "probe_nfe_equivalent": 0.0,
        "nfe_forward_block": [0.0] * n_blocks,
        "nfe_backward_block": [0.0] * n_blocks,
        "log10_tol": [[] for _ in range(n_blocks)],
        "settings": [None] * n_blocks,  # each block's solver setting at the epoch's last iteration
        # per penalty of PENALTIES: the sum of its values and the iterations that had one
        "penalty_sums": [0.0] * len(PENALTIES),
        "penalty_iters": [0] * len(PENALTIES),
    }


def _finish_epoch(acc: dict, ranks: Dist, device: torch.device) -> dict:
    n_blocks = len(acc["nfe_forward_block"])
    scalars = [
        acc["iters"],
        acc["images"],
        acc["loss"],
        acc["bpd"],
        acc["ce"],
        acc["errors"],
        acc["nfe_forward"],
        acc["nfe_backward"],
        acc["nfe_sample_mean"],
        acc["probe_nfe_equivalent"],
        *acc["nfe_forward_block"],
        *acc["nfe_backward_block"],
    ]
    summed = ranks.sum([float(v) for v in scalars], device)
    penalty_sums = ranks.sum([float(v) for v in acc["penalty_sums"]], device)
    penalty_iters = ranks.sum([float(v) for v in acc["penalty_iters"]], device)
    iters_all, images = summed[0], summed[1]
    per_iter = 1.0 / max(iters_all, 1.0)
    tol_mean, tol_std = [], []
    for draws in acc["log10_tol"]:
        stats = ranks.sum([float(len(draws)), sum(draws), sum(d * d for d in draws)], device)
        if stats[0] == 0:
            tol_mean.append(None)
            tol_std.append(None)
            continue
        mean = stats[1] / stats[0]
        tol_mean.append(mean)
        tol_std.append(math.sqrt(max(stats[2] / stats[0] - mean * mean, 0.0)))
    seconds = acc["seconds"]
    return {
        "loss": summed[2] * per_iter,
        "bpd_cond": summed[3] * per_iter,
        "cross_entropy": summed[4] * per_iter,
        "error": summed[5] / max(images, 1.0),
        # NFE per iteration, summed over blocks, averaged over every rank's iterations.
        "nfe_forward": summed[6] * per_iter,
        "nfe_backward": summed[7] * per_iter,
        "nfe_forward_sample_mean": summed[8] * per_iter,
        # Probes (adaptive policy, probe estimator): their forward evaluations, in evaluations of a
        # full training batch (each probe evaluation runs on probe_size rows), per iteration.
        "probe_nfe_equivalent": summed[9] * per_iter,
        "nfe_forward_per_block": [v * per_iter for v in summed[10 : 10 + n_blocks]],
        "nfe_backward_per_block": [v * per_iter for v in summed[10 + n_blocks :]],
        "nfe_forward_per_rank": ranks.gather(acc["nfe_forward"] / max(acc["iters"], 1), device),
        "tol_log10_mean": tol_mean,
        "tol_log10_std": tol_std,
        # The solver setting of each block's last training solve (this rank's): "dopri5:1e-05", "rk4:2".
        "settings_per_block": list(acc["settings"]),
        # The levers' penalties before weighting, mean per iteration; None where off.
        **{
            name: total / count if count else None
            for name, total, count in zip(PENALTIES, penalty_sums, penalty_iters, strict=True)
        },
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else None,
        "seconds_per_iteration": seconds / max(acc["iters"], 1),
    }


# ----------------------------------------------------------------------------- stopping

# How long the first Ctrl-C waits for the current iteration (or evaluation) to end before the run
# stops at once, discarding that iteration's unfinished work.
STOP_GRACE_SECONDS = 5.0


class StopSignal:
    """Ctrl-C during a run, in two stages.

    The first Ctrl-C asks the run to stop at the next iteration boundary: it finishes the current
    iteration, saves ``last.pt`` and returns. A second Ctrl-C, or the first one still unanswered
    after ``grace`` seconds (one solve at a hopeless tolerance can take minutes), raises
    :class:`KeyboardInterrupt` at once inside the sections marked :meth:`abortable`: the work there
    (forward, backward, probes, evaluation) changes only state the trainer can restore, so it then
    saves the last completed iteration. Elsewhere (the optimiser step, a checkpoint write, both
    short) the stop waits for the section to end. Without ``can_abort`` (several ranks, which could
    not agree on where to stop) a second Ctrl-C raises at once and nothing is saved.

    The handler is installed only in the main thread (Python delivers signals there alone).
    """

    def __init__(self, grace: float = STOP_GRACE_SECONDS, can_abort: bool = True) -> None:
        self.grace = grace
        self.can_abort = can_abort
        self.requested = False
        self._now = False
        self._in_abortable = False
        self._timer: threading.Timer | None = None
        self._previous: object = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        """A section that a stop may cut short with :class:`KeyboardInterrupt`."""
        if self._now:
            raise KeyboardInterrupt
        self._in_abortable = True
        try:
            yield
        finally:
            self._in_abortable = False

    def _handle(self, signum: int, frame: object) -> None:
        if not self.requested:
            self.requested = True
            _say("\nCtrl-C: stopping after this iteration and saving last.pt (Ctrl-C again to stop at once)\n")
            if self.can_abort:
                self._timer = threading.Timer(self.grace, _thread.interrupt_main)
                self._timer.daemon = True
                self._timer.start()
            return
        self._now = True
        if self._in_abortable or not self.can_abort:
            raise KeyboardInterrupt


def _say(text: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a write to stderr
    # (the progress bar's), and a buffered stream refuses that reentrant call.
    os.write(2, text.encode())


# ----------------------------------------------------------------------------- training


@dataclass
class _Snapshot:
    """The state an abortable section may change besides work it throws away (gradients, records):
    restored before saving, so ``last.pt`` is exactly the last completed iteration's."""

    rng: torch.Tensor
    learner: dict
    buffers: dict[str, torch.Tensor]
    best: dict | None


class Trainer:
    """One run: set-up (checks, data, model, resume), a training step, an end of epoch, save and
    restore. ``epoch`` and ``batch`` are the position of the next iteration, ``step`` the number of
    iterations completed; all three are what ``last.pt`` records."""

    def __init__(self, config: TrainConfig, resume: bool = False, dataset: ImageDataset | None = None) -> None:
        """``dataset``: use these images instead of loading ``config.dataset`` (synthetic data for
        checks such as benchmarks/gpu_check.py); everything else is read from ``config``."""
        self.config = config
        self.device = _device(config)
        self.ranks = init_distributed(self.device)
        self.out = Path(config.out)
        state = self._checked_state(resume)
        self.dataset = dataset or load_dataset(
            config.dataset, config.data_dir, split_seed=0, val_fraction=config.val_fraction
        )
        self.train_batches = self._batches("train", config.batch_size)
        self.val_batches = self._batches("val", config.eval_batch_size)
        self.test_batches = self._batches("test", config.eval_batch_size)
        limit = config.max_train_batches
        self.iters_per_epoch = len(self.train_batches) if limit is None else min(len(self.train_batches), limit)
        torch.manual_seed(config.seed)  # identical initialisation on every rank
        # From here on the configuration holds the data's image shape and classes (config.json, summary).
        self.config = config = config.for_data(self.dataset.image_shape, self.dataset.n_classes)
        self.model = build(config, self.dataset.image_shape, self.dataset.n_classes).to(self.device)
        self.solvers = list(gated_solvers(self.model))
        self.policies = [solver.policy for solver in self.solvers]
        self.optimizer = make_optimizer(self.model, config.lr, config.gate_lr or config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.learner = ToleranceLearner(config.tolerance, seed=config.seed)
        self.levers = config.levers
        self.epoch, self.batch, self.step, self.best = 0, 0, 0, None
        self.acc = _epoch_accumulator(len(self.solvers))
        self.stop = StopSignal(can_abort=self.ranks.world == 1)
        torch.manual_seed(config.seed * 1000 + self.ranks.rank)  # per-rank noise streams from here on
        if state is not None:
            self._restore(state)
        self._saved_at = (self.epoch, self.batch, self.step)
        self._prepare_folder(resumed=state is not None, resume=resume)

    def _checked_state(self, resume: bool) -> dict | None:
        """``last.pt`` when resuming from it, after checking that this configuration may continue it."""
        if not check_output_folder(self.out, resume):
            return None
        state = load_checkpoint(self.out / LAST_CHECKPOINT, self.device)
        if isinstance(state.get("config"), dict):
            started = state["epoch"] + (1 if state["batch"] else 0)
            check_resume(stored_settings(state["config"]), self.config.settings(), started, self.out)
        return state

    def _batches(self, split: str, batch_size: int):
        return make_batches(
            self.dataset,
            split,
            batch_size,
            seed=self.config.seed,
            rank=self.ranks.rank,
            world_size=self.ranks.world,
            device=self.device,
        )

    def _lr_factor(self, step: int) -> float:
        config = self.config
        warm = min(1.0, (step + 1) / config.warmup_iters) if config.warmup_iters else 1.0
        decayed = config.lr_decay_epoch is not None and step // self.iters_per_epoch >= config.lr_decay_epoch
        return warm * (config.lr_decay if decayed else 1.0)

    # ------------------------------------------------------------------------- save and restore

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RunFolderError(f"{self.out / LAST_CHECKPOINT} does not fit this configuration: {exc}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.learner.load_state_dict(state["learner"])
        restore_rng(state["rng"][self.ranks.rank].cpu(), self.device)
        self.epoch, self.batch, self.step, self.best = state["epoch"], state["batch"], state["step"], state["best"]
        # An accumulator saved before a metric existed lacks its sums: they start at zero.
        self.acc = {**_epoch_accumulator(len(self.solvers)), **state["accumulator"]}

    def _prepare_folder(self, resumed: bool, resume: bool) -> None:
        """Written only now that every check has passed: the metrics of the epochs ``last.pt``
        completed (a torn or later line is dropped: the run writes it again) and ``config.json``."""
        metrics = self.out / METRICS_FILE
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.ranks.main:
            return
        if resumed:
            history = [h for h in read_history(metrics) if h["epoch"] < self.epoch]
            if [h["epoch"] for h in history] != list(range(self.epoch)):
                raise RunFolderError(
                    f"{metrics} lacks epochs before {self.epoch}, which {LAST_CHECKPOINT} has completed; cannot resume"
                )
            write_history(history, metrics)
            print(f"resumed from {self.out / LAST_CHECKPOINT} at epoch {self.epoch}, batch {self.batch}")
        elif resume:
            print(f"nothing to resume in {self.out} (no {LAST_CHECKPOINT}): starting a fresh run")
        (self.out / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    def save(self) -> None:
        """Write ``last.pt`` at the current position (every rank takes part: the RNG gather)."""
        rng = ranks_gather_rng(self.ranks, self.device)
        if self.ranks.main:
            state = {
                "epoch": self.epoch,
                "batch": self.batch,
                "step": self.step,
                "best": self.best,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "learner": self.learner.state_dict(),
                "rng": rng,
                "accumulator": self.acc,
                "config": asdict(self.config),
            }
            save_atomic(state, self.out / LAST_CHECKPOINT)
        self._saved_at = (self.epoch, self.batch, self.step)

    def _save_if_new(self) -> None:
        if (self.epoch, self.batch, self.step) != self._saved_at:
            self.save()

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(
            rng=local_rng_state(self.device),
            learner=copy.deepcopy(self.learner.state_dict()),
            buffers={name: b.detach().clone() for name, b in self.model.named_buffers()},
            best=copy.deepcopy(self.best),
        )

    def _restore_snapshot(self, snapshot: _Snapshot) -> None:
        restore_rng(snapshot.rng, self.device)
        self.learner.load_state_dict(snapshot.learner)
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(snapshot.buffers[name])
        self.best = snapshot.best

    @contextlib.contextmanager
    def _abortable(self) -> Iterator[None]:
        """Work that Ctrl-C or a failed solve may cut short. Parameters, optimiser and counters are
        changed only outside it, so on either the snapshot taken here is restored, ``last.pt`` is
        written at the last completed position (if it moved since the last save) and the
        exception goes on (to :meth:`fit` for Ctrl-C, to the caller for a failed solve)."""
        snapshot = self._snapshot() if self.stop.can_abort else None
        try:
            with self.stop.abortable():
                yield
        except (KeyboardInterrupt, SolveError) as exc:
            if snapshot is None:
                raise
            self._restore_snapshot(snapshot)
            self._save_if_new()
            if isinstance(exc, SolveError) and self.ranks.main:
                print(f"failed: {self._saved_message()}", flush=True)
            raise

    def _saved_message(self) -> str:
        if self._saved_at == (0, 0, 0):
            return "no iteration had completed, nothing saved"
        epoch, batch, _ = self._saved_at
        return f"state saved to {self.out / LAST_CHECKPOINT} (epoch {epoch}, batch {batch}); continue with --resume"

    # ------------------------------------------------------------------------- the loop

    def fit(self, stop_after_batches: int | None = None) -> dict:
        """Train the remaining epochs, then summarize. Returns the summary, or ``{"interrupted": True,
        "epoch", "batch"}`` after Ctrl-C or ``stop_after_batches`` iterations (tests of resume)."""
        with self.stop:
            try:
                for epoch in range(self.epoch, self.config.epochs):
                    if not self._train_epoch(epoch, stop_after_batches):
                        self._save_if_new()
                        return self._interrupted()
                    self._end_epoch(epoch)
                with self.stop.abortable():  # last.pt is final: nothing to save if cut short
                    summary = summarize(
                        self.config, self.model, self.out, self.best, self.dataset, self.test_batches, self.ranks
                    )
            except KeyboardInterrupt:
                if not self.stop.can_abort:
                    raise
                return self._interrupted()
        if self.ranks.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _interrupted(self) -> dict:
        if self.ranks.main:
            print(f"interrupted: {self._saved_message()}", flush=True)
        return {"interrupted": True, "epoch": self.epoch, "batch": self.batch}

    def _train_epoch(self, epoch: int, stop_after_batches: int | None) -> bool:
        """The epoch's remaining iterations; False when asked to stop (Ctrl-C, ``stop_after_batches``)."""
        self.model.train()
        bar = tqdm(
            total=self.iters_per_epoch,
            initial=self.batch,
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            disable=not (self.ranks.main and self.config.progress_bar),
            leave=False,
        )
        try:
            for b, batch in enumerate(self.train_batches.epoch(epoch, self.batch), start=self.batch):
                if b >= self.iters_per_epoch or self.stop.requested:
                    break
                self._train_step(epoch, b, batch, bar)
                if stop_after_batches is not None and self.step >= stop_after_batches:
                    return False
        finally:
            bar.close()
        return not self.stop.requested

    def _train_step(self, epoch: int, b: int, batch, bar: tqdm) -> None:
        config, model = self.config, self.model
        t0 = time.perf_counter()
        with self._abortable():
            set_progress(model, self.step, epoch + b / self.iters_per_epoch)
            y = batch.y if model.conditional else None
            with collect_records(model) as records:
                output = model(batch.x, y)
            loss, parts = model.loss(output, y, config.beta, self.dataset.levels)
            objective, penalties = with_penalties(loss, self.levers, output.regularisers, records)
            self.optimizer.zero_grad(set_to_none=True)
            # Per-sample tolerances are credited with each sample's own objective and NFE.
            reward_loss = (
                per_sample_objective(model, output, y, config.beta, self.dataset.levels)
                if config.per_sample
                else loss.detach()
            )
            self.learner.backward(objective, records, reward_loss)
            probe = _probe_objective(model, batch, config, self.dataset.levels)
            probe_cost = self.learner.probe(model, self.step, probe, batch.x.shape[0], self.policies)
            average_gradients(model, self.ranks)
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.batch = b + 1
        self.acc["seconds"] += time.perf_counter() - t0
        _accumulate(self.acc, batch, loss, parts, output, records, probe_cost, penalties)
        bar.update(1)
        bar.set_postfix(
            loss=f"{float(loss.detach()):.3f}",
            bpd=f"{float(parts.bits_per_dim):.3f}",
            nfe=sum(r.nfe_forward + r.nfe_backward for r in records),
            tol=f"{_mean_tol(records):.1e}",
        )

    def _end_epoch(self, epoch: int) -> None:
        with self._abortable():
            self._evaluate_epoch(epoch)
        self.acc = _epoch_accumulator(len(self.solvers))
        self.epoch, self.batch = epoch + 1, 0
        self.save()

    def _evaluate_epoch(self, epoch: int) -> None:
        """Validation and test metrics, model selection, the metrics line, plots and samples."""
        config, ranks, out = self.config, self.ranks, self.out
        train_metrics = _finish_epoch(self.acc, ranks, self.device)
        val = evaluate_as_configured(self.model, self.val_batches, self.dataset.levels, ranks, config)
        test = evaluate_as_configured(self.model, self.test_batches, self.dataset.levels, ranks, config)
        # Model selection on the validation split, by the training objective J (Eq. 4).
        val_loss = val["bpd_cond"] + config.beta * (val["cross_entropy"] or 0.0)
        record = {
            "epoch": epoch,
            "lr": self.scheduler.get_last_lr()[0],
            "train": train_metrics,
            "val": val,
            "test": test,
            "val_selection_loss": val_loss,
        }
        if self.best is None or val_loss < self.best["val_selection_loss"]:
            self.best = {"epoch": epoch, "val_selection_loss": val_loss}
            if ranks.main:
                save_atomic({"model": self.model.state_dict(), "epoch": epoch}, out / "best.pt")
        if ranks.main:
            with (out / METRICS_FILE).open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            plots.plot_curves(read_history(out / METRICS_FILE), out / "curves.png")
            if config.tolerance.mode in ("learned", "adaptive", "frozen"):
                plots.plot_tolerance_histograms(
                    self.acc["log10_tol"],
                    out / "tolerances.png",
                    f"{config.model.kind}, {config.tolerance.mode}: log10 tolerance per block",
                )
            _print_epoch(record)
        if config.sample_every and (epoch + 1) % config.sample_every == 0 and ranks.main:
            write_samples(self.model, self.dataset.n_classes, out / "samples.png")


def _device(config: TrainConfig) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} was asked for but torch.cuda.is_available() is False")
    return device


def _accumulate(acc: dict, batch, loss, parts, output, records, probe_cost, penalties: PenaltyValues) -> None:
    """Fold one completed iteration into the epoch's sums."""
    acc["iters"] += 1
    for k, value in enumerate(penalties.as_dict().values()):
        if value is not None:
            acc["penalty_sums"][k] += value
            acc["penalty_iters"][k] += 1
    acc["images"] += batch.x.shape[0]
    acc["probe_nfe_equivalent"] += probe_cost.nfe_equivalent
    acc["loss"] += float(loss.detach())
    acc["bpd"] += float(parts.bits_per_dim)
    if parts.cross_entropy is not None:
        acc["ce"] += float(parts.cross_entropy)
        acc["errors"] += float((output.logits.argmax(1) != batch.y).sum())
    for k, rec in enumerate(records):
        acc["nfe_forward_block"][k] += rec.nfe_forward
        acc["nfe_backward_block"][k] += rec.nfe_backward
        acc["nfe_forward"] += rec.nfe_forward
        acc["nfe_backward"] += rec.nfe_backward
        acc["nfe_sample_mean"] += mean_sample_nfe(rec)
        acc["settings"][k] = rec.setting
        if rec.log10_tolerance is not None:
            acc["log10_tol"][k].extend(rec.log10_tolerance.float().flatten().tolist())


def run(config: TrainConfig, resume: bool = False, stop_after_batches: int | None = None) -> dict:
    """Train, evaluate every epoch, select on validation loss, write everything under ``config.out``.

    Every check (configuration, output folder, resume compatibility, data files) runs before
    anything is written; see :mod:`tolgate_flows.checkpoints` for what a run may write where.
    Returns the summary (also written to ``summary.json``), or ``{"interrupted": True, ...}`` after
    Ctrl-C (see :class:`StopSignal`). A failed solve (:class:`tolgate.SolveError`, e.g. the step
    budget ``max_num_steps``) propagates after the last completed iteration is saved.
    ``stop_after_batches`` simulates an interruption after that many training iterations.
    """
    return Trainer(config, resume).fit(stop_after_batches)


def _probe_objective(model: FlowModel, batch, config: TrainConfig, levels: int):
    """The per-sample objective (Eq. 4) of the batch's first ``probe_size`` rows, as a closure for probes."""
    x = batch.x[: config.tolerance.probe_size]
    y = batch.y[: config.tolerance.probe_size] if model.conditional else None

    def objective() -> torch.Tensor:
        return per_sample_objective(model, model(x, y), y, config.beta, levels)

    return objective


def per_sample_objective(model: FlowModel, output, y, beta: float, levels: int) -> torch.Tensor:
    """Eq. 4 per sample, ``(batch,)``: bits/dim of x given y plus beta times its cross-entropy (nats)."""
    objective = bits_per_dim(output.log_px, model.dims, levels)
    if output.logits is not None:
        objective = objective + beta * torch.nn.functional.cross_entropy(output.logits, y, reduction="none")
    return objective.detach()


def mean_sample_nfe(record) -> float:
    """Evaluations per sample: the forward NFE under torchdiffeq (every row is evaluated at every
    call); under the per-sample backend the mean of the samples' own NFE, i.e. rows evaluated
    divided by the batch, the quantity comparable across backends."""
    if record.nfe_per_sample is None:
        return float(record.nfe_forward)
    return float(record.nfe_per_sample.double().mean())


def _mean_tol(records) -> float:
    """Geometric mean of the step's tolerances (for the progress bar); nan where none applied."""
    logs = [r.mean_log10_tolerance for r in records if r.mean_log10_tolerance is not None]
    return 10.0 ** (sum(logs) / len(logs)) if logs else math.nan


def local_rng_state(device: torch.device) -> torch.Tensor:
    """This process's RNG state: the CPU generator's, and on CUDA also the device generator's."""
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    return state


def ranks_gather_rng(ranks: Dist, device: torch.device) -> list[torch.Tensor]:
    """Every rank's RNG state (:func:`local_rng_state`; the Hutchinson noise and gate draws are
    made on the device), so a resumed run continues every rank's noise stream."""
    state = local_rng_state(device)
    if ranks.world == 1:
        return [state]
    out = [torch.empty_like(state) for _ in range(ranks.world)]
    dist.all_gather_object(out, state)
    return out


def restore_rng(state: torch.Tensor, device: torch.device) -> None:
    """Inverse of :func:`ranks_gather_rng` for this rank."""
    cpu_size = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_size])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu_size:], device)


def write_samples(model: FlowModel, n_classes: int, path: Path, per_class: int = 8) -> None:
    """Class-conditional samples at the evaluation tolerance: one row per class (Figure 7)."""
    model.eval()
    device = next(model.parameters()).device
    y = torch.arange(n_classes, device=device).repeat_interleave(per_class)
    images = model.sample(y)
    plots.save_image_grid(images, path, nrow=per_class)


def summarize(config, model, out, best, dataset, test_batches, ranks) -> dict:
    """Metrics of the epoch selected on validation, NFE averaged over the run, and re-checks of
    the selected checkpoint at tighter evaluation tolerances (Section 4.2)."""
    history = read_history(out / METRICS_FILE)
    selected = next((h for h in history if best is not None and h["epoch"] == best["epoch"]), None)
    if selected is None:
        raise RunFolderError(f"{out / METRICS_FILE} has no line for the selected epoch (best: {best!r})")
    summary = {
        "config": asdict(config),
        "selected_epoch": best["epoch"],
        "selected": selected,
        "train_nfe_forward_mean": sum(h["train"]["nfe_forward"] for h in history) / len(history),
        "train_nfe_backward_mean": sum(h["train"]["nfe_backward"] for h in history) / len(history),
        "train_probe_nfe_equivalent_mean": sum(h["train"].get("probe_nfe_equivalent", 0.0) for h in history)
        / len(history),
        "seconds_per_epoch_mean": sum(h["train"]["seconds"] for h in history) / len(history),
        "seconds_per_iteration_mean": sum(h["train"]["seconds_per_iteration"] for h in history) / len(history),
        "final_gate_log10_mean": history[-1]["train"]["tol_log10_mean"],
        "train_penalties_mean": {name: _mean_present([h["train"].get(name) for h in history]) for name in PENALTIES},
        "recheck": {},
    }
    if config.recheck_tols:
        state = load_checkpoint(out / "best.pt", next(model.parameters()).device)
        model.load_state_dict(state["model"])
        for tol in config.recheck_tols:
            for solver in gated_solvers(model):
                solver.eval_policy = FixedTolerance(tol)
            summary["recheck"][f"{tol:g}"] = evaluate_as_configured(model, test_batches, dataset.levels, ranks, config)
        for solver in gated_solvers(model):
            solver.eval_policy = FixedTolerance(config.eval_tol)
    if config.sample_every and ranks.main:
        write_samples(model, dataset.n_classes, out / "samples.png")
    return summary


def _mean_present(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _print_epoch(record: dict) -> None:
    tr, te = record["train"], record["test"]
    err = "" if te["error"] is None else f" test err {100 * te['error']:.2f}%"
    print(
        f"epoch {record['epoch'] + 1}: train loss {tr['loss']:.4f} nfe f/b {tr['nfe_forward']:.0f}/"
        f"{tr['nfe_backward']:.0f} | test bpd(x|y) {te['bpd_cond']:.4f} bpd(x) {te['bpd_marginal']:.4f}{err}"
        f" nfe {te['nfe_forward']:.0f} | {tr['seconds']:.1f}s, {tr['images_per_second']:.0f} img/s",
        flush=True,
    )
