"""One command for the day a GPU is lent: does tolgate on CUDA give what it gives on the CPU? (issue 10, item 5)

    python benchmarks/gpu_check.py                      # CUDA against CPU, the paper's CIFAR-10 sizes, a few minutes
    python benchmarks/gpu_check.py --device cpu --tiny  # the same checks at a tiny size (tests/test_gpu_check.py)

Checks, each reported PASS or FAIL (a check that raises fails with the exception's message):

* ``backends``: a small InfoCNF, float64, exact divergence, at a fixed tolerance, under every backend
  of ``tolgate.solver.BACKENDS`` (each once, by its own name; not the deprecated aliases): the same
  ``log p(x|y)`` and the same NFE per solve on the device as on the CPU.
* ``per_sample_solver``: :func:`tolgate.solve_per_sample` with one tolerance and one decay rate per sample:
  the same solution and per-sample NFE on both devices, and both near the exact solution.
* ``train_step``: the paper's architecture (ModelConfig defaults) on synthetic CIFAR-shaped data
  ``(3, 32, 32)`` at batch 900, through :class:`tolgate_flows.train.Trainer`: seconds per step and
  peak memory (``torch.cuda.max_memory_allocated``), a finite loss; and the first forward of the same
  weights on the CPU and the device, with the same Hutchinson noise, agrees.
* ``resume``: train 2 steps, checkpoint, resume, finish; the metrics and the final weights equal
  those of an uninterrupted run.
* ``time_budget``: everything above within ``--budget`` seconds.

Tolerances: the NFE of two solves may differ by one step (``NFE_SLACK`` evaluations: a step whose error
ratio sits at 1 can be accepted on one device and rejected on the other); values agree to
``VALUE_RTOL`` relative (float64 solves) or ``LOSS_RTOL`` (the float32 CIFAR forward).

The summary is printed as JSON on stdout (and written to ``--json``); the exit status is 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tolgate import FixedTolerance, PerSampleData, collect_records, solve_per_sample
from tolgate.solver import BACKENDS
from tolgate_flows.checkpoints import LAST_CHECKPOINT, METRICS_FILE, load_checkpoint, read_history
from tolgate_flows.data import ImageDataset, ImageSplit
from tolgate_flows.models import FlowModel, ModelConfig, build_model
from tolgate_flows.train import TrainConfig, Trainer, build

NFE_SLACK = 6  # one dopri5 step
VALUE_RTOL = 1e-6
LOSS_RTOL = 1e-3
TIMING_KEYS = ("seconds", "images_per_second", "seconds_per_iteration")


@dataclass(frozen=True)
class Sizes:
    """How large each check runs. ``model``: ModelConfig fields that differ from its defaults (the
    paper's architecture); ``steps``: timed training steps after one warm-up step."""

    image_shape: tuple[int, int, int]
    batch: int
    steps: int
    model: dict[str, Any] = field(default_factory=dict)
    solver_batch: int = 256
    compare_batch: int = 4


FULL = Sizes(image_shape=(3, 32, 32), batch=900, steps=2)
TINY = Sizes(
    image_shape=(3, 16, 16), batch=4, steps=1, model={"hidden": 4, "n_flows": 1}, solver_batch=8, compare_batch=2
)
# The resume check is about state (weights, optimiser, RNG streams on the device), not size.
RESUME = Sizes(image_shape=(3, 16, 16), batch=8, steps=3, model={"hidden": 8, "n_flows": 1})


@dataclass
class CheckResult:
    name: str
    passed: bool
    seconds: float
    details: dict[str, Any]


# ----------------------------------------------------------------------------- comparisons


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max(max |b|, tiny)``, on the CPU in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def nfe_difference(records: list, reference: list) -> int:
    """Largest difference in forward NFE between matching solves (per sample where recorded)."""
    if len(records) != len(reference):
        return math.inf
    worst = 0
    for rec, ref in zip(records, reference, strict=True):
        worst = max(worst, abs(rec.nfe_forward - ref.nfe_forward))
        if rec.nfe_per_sample is not None:
            worst = max(worst, int((rec.nfe_per_sample.cpu() - ref.nfe_per_sample.cpu()).abs().max()))
    return worst


# ----------------------------------------------------------------------------- backends


def _backend_model(backend: str, seed: int) -> FlowModel:
    config = ModelConfig(
        kind="infocnf", image_shape=(2, 4, 4), n_scales=1, n_flows=1, hidden=8, divergence="exact", backend=backend
    )
    torch.manual_seed(seed)
    tolerance = FixedTolerance(1e-7)
    return build_model(config, lambda index, channels: tolerance, eval_policy=tolerance).double().eval()


def _solve_model(model: FlowModel, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple:
    model = copy.deepcopy(model).to(device)
    with torch.no_grad(), collect_records(model) as records:
        out = model(x.to(device), y.to(device))
    return out.log_px, records


def check_backends(device: torch.device, reference: torch.device, sizes: Sizes) -> tuple[bool, dict]:
    """Every backend: the device's log-density and NFE equal the reference device's."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(sizes.compare_batch, 2, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (sizes.compare_batch,), generator=generator)
    details, passed = {}, True
    for backend in BACKENDS:
        model = _backend_model(backend, seed=0)
        log_px, records = _solve_model(model, x, y, device)
        ref_log_px, ref_records = _solve_model(model, x, y, reference)
        value = relative_difference(log_px, ref_log_px)
        nfe = nfe_difference(records, ref_records)
        ok = value <= VALUE_RTOL and nfe <= NFE_SLACK
        passed &= ok
        details[backend] = {
            "passed": ok,
            "log_px_relative_difference": value,
            "nfe_difference": nfe,
            "nfe_forward": [r.nfe_forward for r in records],
        }
    return passed, details


# ----------------------------------------------------------------------------- per-sample solver


def _per_sample_solve(device: torch.device, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dy/dt = -k_i y`` for ``t`` in ``[0, 2]``, one rate ``k_i`` and one tolerance per sample:
    (solution at ``t = 2``, exact solution, per-sample NFE)."""
    generator = torch.Generator().manual_seed(2)
    rates = torch.rand(batch, generator=generator, dtype=torch.float64).mul(4).add(0.1).to(device)
    y0 = torch.rand(batch, 3, generator=generator, dtype=torch.float64).add(0.5).to(device)
    rtol = torch.logspace(-3, -9, batch, dtype=torch.float64).to(device)
    k = PerSampleData(rates)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64, device=device)
    ys, stats = solve_per_sample(
        lambda t, y, idx: -k[idx][:, None] * y, y0, t, rtol=rtol, atol=rtol * 1e-2, max_num_steps=10_000
    )
    exact = y0 * torch.exp(-2.0 * rates)[:, None]
    return ys[-1], exact, stats.nfe


def check_per_sample_solver(device: torch.device, reference: torch.device, sizes: Sizes) -> tuple[bool, dict]:
    """Same solution and per-sample NFE on both devices; every sample near the exact solution."""
    solution, exact, nfe = _per_sample_solve(device, sizes.solver_batch)
    ref_solution, _, ref_nfe = _per_sample_solve(reference, sizes.solver_batch)
    value = relative_difference(solution, ref_solution)
    nfe_gap = int((nfe.cpu() - ref_nfe.cpu()).abs().max())
    error = relative_difference(solution, exact)
    passed = value <= VALUE_RTOL and nfe_gap <= NFE_SLACK and error <= 1e-2
    details = {
        "solution_relative_difference": value,
        "nfe_difference": nfe_gap,
        "error_against_exact": error,
        "nfe_range": [int(nfe.min()), int(nfe.max())],
    }
    return passed, details


# ----------------------------------------------------------------------------- training


def synthetic_dataset(sizes: Sizes, n_train: int) -> ImageDataset:
    """Random 8-bit images of ``sizes.image_shape`` with random labels from 10 classes (CIFAR-10's levels)."""
    generator = torch.Generator().manual_seed(3)

    def split(n: int) -> ImageSplit:
        images = torch.randint(0, 256, (n, *sizes.image_shape), generator=generator, dtype=torch.uint8)
        return ImageSplit(images, torch.randint(0, 10, (n,), generator=generator))

    return ImageDataset(
        name="synthetic",
        train=split(n_train),
        val=split(sizes.batch),
        test=split(sizes.batch),
        levels=256,
        n_classes=10,
        image_shape=sizes.image_shape,
        flip_symmetric=False,
        source="benchmarks/gpu_check.py (random pixels)",
    )


def train_config(sizes: Sizes, device: torch.device, out: Path, **settings: Any) -> TrainConfig:
    """The paper's CIFAR-10 settings (fixed tolerance 1e-5) at ``sizes``, evaluation cut to one batch."""
    values = dict(
        dataset="cifar10",
        batch_size=sizes.batch,
        eval_batch_size=sizes.batch,
        max_eval_batches=1,
        epochs=1,
        device=str(device),
        out=str(out),
        progress_bar=False,
        sample_every=0,
    )
    values.update(sizes.model)
    values.update(settings)
    return TrainConfig.from_settings(**values)  # flat names: Sizes.model holds model settings such as hidden


@contextlib.contextmanager
def common_noise(model: FlowModel, seed: int) -> Iterator[None]:
    """Every CNF block draws its Hutchinson noise from one CPU generator, then moves it to the
    block's device: the CPU and the device then solve the same estimator."""
    generator = torch.Generator().manual_seed(seed)

    def draw(z: torch.Tensor) -> torch.Tensor:
        signs = torch.randint(0, 2, z.shape, generator=generator, dtype=torch.float64).mul(2).sub(1)
        return signs.to(device=z.device, dtype=z.dtype)

    for block in model.blocks:
        block._draw_noise = draw  # instance attribute: the class's method is untouched
    try:
        yield
    finally:
        for block in model.blocks:
            del block._draw_noise


def _first_forward(config: TrainConfig, dataset: ImageDataset, device: torch.device, batch: int) -> tuple:
    torch.manual_seed(config.seed)
    model = build(config, dataset.image_shape, dataset.n_classes).to(device).eval()
    x = dataset.train.images[:batch].to(device).float().add(0.5).div(256)
    y = dataset.train.labels[:batch].to(device)
    with torch.no_grad(), common_noise(model, seed=4), collect_records(model) as records:
        loss, _ = model.loss(model(x, y), y, config.beta, dataset.levels)
    return loss, records


def _timed_steps(trainer: Trainer, steps: int, device: torch.device) -> tuple[float, int | None]:
    """Train one warm-up step, then ``steps`` timed ones: (seconds per timed step, peak bytes)."""
    with contextlib.redirect_stdout(sys.stderr):
        trainer.fit(stop_after_batches=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        warm_seconds = trainer.acc["seconds"]
        trainer.fit(stop_after_batches=1 + steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return (trainer.acc["seconds"] - warm_seconds) / steps, peak


def check_train_step(device: torch.device, reference: torch.device, sizes: Sizes) -> tuple[bool, dict]:
    """Seconds per step and peak memory at ``sizes.batch``; the first forward agrees with the reference device."""
    dataset = synthetic_dataset(sizes, n_train=sizes.batch * (1 + sizes.steps))
    with tempfile.TemporaryDirectory() as folder:
        config = train_config(sizes, device, Path(folder) / "run", max_train_batches=1 + sizes.steps)
        loss, records = _first_forward(config, dataset, device, sizes.compare_batch)
        ref_loss, ref_records = _first_forward(config, dataset, reference, sizes.compare_batch)
        trainer = Trainer(config, dataset=dataset)
        seconds, peak = _timed_steps(trainer, sizes.steps, device)
        train_loss = trainer.acc["loss"] / trainer.acc["iters"]
    value = relative_difference(loss, ref_loss)
    nfe = nfe_difference(records, ref_records)
    details = {
        "batch": sizes.batch,
        "image_shape": list(sizes.image_shape),
        "blocks": len(records),
        "seconds_per_step": seconds,
        "peak_memory_bytes": peak,
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "train_loss": train_loss,
        "first_forward_loss": float(loss),
        "first_forward_relative_difference": value,
        "first_forward_nfe_difference": nfe,
    }
    passed = math.isfinite(train_loss) and value <= LOSS_RTOL and nfe <= NFE_SLACK
    return passed, details


# ----------------------------------------------------------------------------- resume


def _without_timing(history: list[dict]) -> list[dict]:
    return [{**h, "train": {k: v for k, v in h["train"].items() if k not in TIMING_KEYS}} for h in history]


def _values(tree: Any) -> list[float]:
    """Every number in a JSON-like tree, in order (``None`` is skipped)."""
    if isinstance(tree, dict):
        return [v for key in sorted(tree) for v in _values(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [v for item in tree for v in _values(item)]
    return [float(tree)] if isinstance(tree, (int, float)) else []


def _run_to_end(
    config: TrainConfig, dataset: ImageDataset, resume: bool = False, stop_after: int | None = None
) -> None:
    with contextlib.redirect_stdout(sys.stderr):
        Trainer(config, resume=resume, dataset=dataset).fit(stop_after)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / LAST_CHECKPOINT, torch.device("cpu"))["model"]


def check_resume(device: torch.device, reference: torch.device, sizes: Sizes) -> tuple[bool, dict]:
    """Train 2 steps, checkpoint, resume, finish: the same metrics and weights as an uninterrupted run."""
    del reference, sizes  # the comparison is with the uninterrupted run on the same device
    dataset = synthetic_dataset(RESUME, n_train=RESUME.batch * RESUME.steps)
    # cuDNN's default convolution backward adds in a varying order; the two runs must not differ by that.
    with (
        tempfile.TemporaryDirectory() as folder,
        torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True),
    ):
        straight, resumed = Path(folder) / "straight", Path(folder) / "resumed"
        _run_to_end(train_config(RESUME, device, straight), dataset)
        _run_to_end(train_config(RESUME, device, resumed), dataset, stop_after=2)
        _run_to_end(train_config(RESUME, device, resumed), dataset, resume=True)
        metrics = [_values(_without_timing(read_history(out / METRICS_FILE))) for out in (straight, resumed)]
        weights = [_weights(out) for out in (straight, resumed)]
    metric_gap = _largest_gap(metrics[0], metrics[1])
    weight_gap = max(relative_difference(weights[1][name], weights[0][name]) for name in weights[0])
    passed = metric_gap <= VALUE_RTOL and weight_gap <= VALUE_RTOL
    return passed, {"metrics_relative_difference": metric_gap, "weights_relative_difference": weight_gap}


def _largest_gap(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(u - v) / max(abs(v), 1e-12) for u, v in zip(a, b, strict=True)), default=0.0)


# ----------------------------------------------------------------------------- running


Check = Callable[[torch.device, torch.device, Sizes], tuple[bool, dict]]
CHECKS: dict[str, Check] = {
    "backends": check_backends,
    "per_sample_solver": check_per_sample_solver,
    "train_step": check_train_step,
    "resume": check_resume,
}


def run_check(name: str, check: Check, device: torch.device, reference: torch.device, sizes: Sizes) -> CheckResult:
    """One check, timed; an exception fails it with its message."""
    start = time.perf_counter()
    try:
        passed, details = check(device, reference, sizes)
    except Exception as exc:  # a failed check is reported, and the others still run
        passed, details = False, {"error": f"{type(exc).__name__}: {exc}"}
    return CheckResult(name, passed, time.perf_counter() - start, details)


def run_checks(device: torch.device, sizes: Sizes, budget: float) -> dict[str, Any]:
    """Every check on ``device`` against the CPU, then the time budget; the JSON summary."""
    reference = torch.device("cpu")
    results = [run_check(name, check, device, reference, sizes) for name, check in CHECKS.items()]
    total = sum(r.seconds for r in results)
    results.append(CheckResult("time_budget", total <= budget, 0.0, {"seconds": total, "budget": budget}))
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'} {r.name} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "reference_device": str(reference),
        "sizes": {"image_shape": list(sizes.image_shape), "batch": sizes.batch, "model": sizes.model},
        "passed": all(r.passed for r in results),
        "checks": {r.name: {"passed": r.passed, "seconds": r.seconds, **r.details} for r in results},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the device checked against the CPU (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the test suite's CPU run)")
    p.add_argument("--batch", type=int, help="batch of the training step (default: 900; --tiny: 4)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds all checks may take (default: 300)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False (use --device cpu --tiny)", file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else FULL
    if args.batch is not None:
        sizes = dataclasses.replace(sizes, batch=args.batch)
    summary = run_checks(device, sizes, args.budget)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
