"""A resumable grid of testbed runs: (testbed, arm, seed) cells, one process and one thread each.

Each cell is one :func:`~tolgate_flows.testbed.run_testbed` in ``<out>/<testbed>/<arm>/seed<k>/``;
a cell whose ``summary.json`` exists is skipped, so an interrupted grid resumes cell by cell. A
cell that fails (a solve over its step budget, say) writes a summary with a ``failed`` message
instead of metrics, and the grid goes on. The benchmarks say what the arms are through a
``make_config(job) -> TestbedConfig`` function (module level, so worker processes can call it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from tolgate import SolveError
from tolgate_flows.testbed import TestbedConfig, run_testbed

#: one grid cell: (testbed, arm, seed)
Job = tuple[str, str, int]
ConfigMaker = Callable[[Job], TestbedConfig]


def run_dir(out: Path, job: Job) -> Path:
    """The cell's run folder."""
    testbed, arm, seed = job
    return out / testbed / arm / f"seed{seed}"


def run_job(job: Job, out: Path, make_config: ConfigMaker) -> str:
    """Run one cell unless its summary exists; returns a one-line report."""
    path = run_dir(out, job)
    name = "/".join(map(str, job))
    if (path / "summary.json").exists():
        return f"{name}: done before"
    try:
        config = make_config(job)
    except (FileNotFoundError, ValueError) as exc:  # e.g. a cell that needs another cell's result
        return f"{name}: skipped, {exc}"
    torch.set_num_threads(1)  # one core per run: tiny tensors gain nothing from threads
    start = time.perf_counter()
    try:
        summary = run_testbed(config, path)
    except (SolveError, ValueError) as exc:  # a diverged run (NaN, step budget) is a result
        testbed, arm, seed = job
        failed = {"testbed": testbed, "arm": arm, "seed": seed, "failed": f"{type(exc).__name__}: {exc}"}
        path.mkdir(parents=True, exist_ok=True)
        (path / "summary.json").write_text(json.dumps(failed, indent=1))
        return f"{name}: FAILED {failed['failed']}"
    return (
        f"{name}: test NLL {summary['test_nll']:.4f}, train NFE fwd {summary['nfe_forward']:.1f} "
        f"bwd {summary['nfe_backward']:.1f}, test NFE {summary['test_nfe_forward']}, "
        f"{time.perf_counter() - start:.0f}s"
    )


def run_grid(phases: Sequence[Sequence[Job]], out: Path, make_config: ConfigMaker, workers: int) -> None:
    """Every job, ``workers`` processes at a time; a phase starts when the previous one is done."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with tqdm(total=sum(len(phase) for phase in phases), desc="runs") as bar:
        for phase in phases:
            if workers == 1:
                for job in phase:
                    bar.write(run_job(job, out, make_config))
                    bar.update(1)
                continue
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(run_job, job, out, make_config) for job in phase]
                for future in futures:
                    bar.write(future.result())
                    bar.update(1)
