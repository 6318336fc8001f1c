"""Per-sample solver (tolgate) vs torchdiffeq and torchode on batches of independent problems.

For each problem and tolerance (rtol = atol) every backend solves the whole batch with dopri5, and
we record:

* wall time of the batch solve (best of ``--repeats``, taken round-robin over the backends; one
  CPU thread);
* rows evaluated: the rows the vector field was given, summed over calls (a batch-level solver
  pays ``batch`` rows per evaluation), and that number divided by the *ideal*: the sum over
  samples of the NFE dopri5 needs for that sample alone (tolgate's per-sample NFE, which equals its
  solved-alone NFE; tests/test_persample.py checks the equality);
* per-sample error: max over output times of the RMS over the state of
  ``|y - y_ref| / (atol + rtol |y_ref|)`` ("x tol"), worst and median over the batch;
* the same error divided by the error that backend gets on that sample solved alone ("x alone"),
  worst and median over an evenly spread subset of ``--alone`` samples plus the backend's worst
  sample in the batch (solving every sample alone with every backend would take far longer than
  the rest of the benchmark); "alone cost" is the rows that backend needs for the subset solved
  sample by sample, relative to tolgate's.

Problems (float64): (a) 256 damped 2-D linear oscillators whose time scales span three decades,
exact solution by the matrix exponential; (b) a time-dependent MLP field (8 -> 64 -> 8, tanh,
shared weights, independent rows) on 512 initial states of spread-out magnitude, reference by
torchdiffeq's dopri8 at 1e-12.

Run: ``python benchmarks/per_sample.py`` (about 10 minutes on 2 loaded cores); writes
``docs/results/per_sample.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torchdiffeq

from tolgate.persample import PerSampleData, solve_per_sample

try:  # benchmark-only extra: pip install "tolgate[bench]"
    import torchode
except ImportError:  # pragma: no cover - depends on the environment
    torchode = None

F64 = torch.float64


@dataclass
class Problem:
    """A batch of independent IVPs with three views of the same vector field.

    ``fields(indices)`` returns ``(per_sample, batch_scalar_t, batch_vector_t)`` restricted to the
    samples ``indices``: tolgate's ``f(t (rows,), y, idx)``, torchdiffeq's ``f(t (), y)`` and
    torchode's ``f(t (rows,), y)``.
    """

    name: str
    y0: torch.Tensor  # (batch, dim)
    t: torch.Tensor  # (n_times,)
    reference: torch.Tensor  # (n_times, batch, dim)
    fields: Callable[[torch.Tensor], tuple[Callable, Callable, Callable]]


def linear_oscillators(batch: int = 256, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-1.0, 2.0, batch)  # time scales 0.01 .. 10
    matrices = torch.tensor(scales[:, None, None] * np.array([[-0.1, 1.0], [-1.0, -0.1]]), dtype=F64)
    y0 = torch.tensor(rng.normal(size=(batch, 2)), dtype=F64)
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    reference = torch.stack(
        [
            torch.stack(
                [torch.tensor(scipy.linalg.expm(m.numpy() * float(s))) @ y for m, y in zip(matrices, y0, strict=True)]
            )
            for s in t
        ]
    )

    def fields(indices: torch.Tensor):
        a = matrices[indices]
        a_rows = PerSampleData(a)  # gathered once per active set, not once per evaluation

        def per_sample(t, y, idx):
            return (a_rows[idx] @ y.unsqueeze(-1)).squeeze(-1)

        def batch_field(t, y):
            return (a @ y.unsqueeze(-1)).squeeze(-1)

        return per_sample, batch_field, batch_field

    return Problem("a: 256 linear oscillators", y0, t, reference, fields)


def mlp_field_problem(batch: int = 512, dim: int = 8, hidden: int = 64, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, dim + 1, generator=gen, dtype=F64) * 2.0 / (dim + 1) ** 0.5
    b1 = torch.randn(hidden, generator=gen, dtype=F64) * 0.5
    w2 = torch.randn(dim, hidden, generator=gen, dtype=F64) * 2.0 / hidden**0.5

    def net(t_col: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden_act = torch.tanh(torch.addmm(b1, torch.cat((y, t_col), 1), w1.T))
        return hidden_act @ w2.T - 0.5 * y

    magnitudes = 10.0 ** (torch.rand(batch, 1, generator=gen, dtype=F64) * 2.0 - 1.0)
    y0 = torch.randn(batch, dim, generator=gen, dtype=F64) * magnitudes
    t = torch.linspace(0.0, 5.0, 5, dtype=F64)
    with torch.no_grad():
        reference = torchdiffeq.odeint(
            lambda s, y: net(s.expand(y.shape[0], 1), y), y0, t, rtol=1e-12, atol=1e-12, method="dopri8"
        )

    def fields(indices: torch.Tensor):
        def per_sample(t, y, idx):
            return net(t.unsqueeze(1), y)

        def batch_field(t, y):
            return net(t.expand(y.shape[0], 1), y)

        def vector_t_field(t, y):
            return net(t.unsqueeze(1), y)

        return per_sample, batch_field, vector_t_field

    return Problem(f"b: MLP field, batch {batch}", y0, t, reference, fields)


class _RowCounter:
    """Wraps a field and counts the rows it is given."""

    def __init__(self, field: Callable) -> None:
        self.field, self.rows = field, 0

    def __call__(self, *args):
        self.rows += args[1].shape[0]
        return self.field(*args)


def solve_tolgate(problem: Problem, indices: torch.Tensor, tol: float):
    counter = _RowCounter(problem.fields(indices)[0])
    ys, stats = solve_per_sample(counter, problem.y0[indices], problem.t, rtol=tol, atol=tol)
    if not bool(stats.succeeded.all()):
        raise RuntimeError(f"tolgate failed on {problem.name} at {tol}: {stats.status_counts()}")
    return ys, counter.rows, stats.nfe


def solve_torchdiffeq(problem: Problem, indices: torch.Tensor, tol: float):
    counter = _RowCounter(problem.fields(indices)[1])
    ys = torchdiffeq.odeint(counter, problem.y0[indices], problem.t, rtol=tol, atol=tol, method="dopri5")
    return ys, counter.rows, None


def solve_torchode(problem: Problem, indices: torch.Tensor, tol: float):
    counter = _RowCounter(problem.fields(indices)[2])
    term = torchode.ODETerm(counter)
    controller = torchode.IntegralController(atol=tol, rtol=tol, term=term)
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), controller)
    y0 = problem.y0[indices]
    problem_ivp = torchode.InitialValueProblem(y0=y0, t_eval=problem.t.repeat(y0.shape[0], 1))
    solution = solver.solve(problem_ivp)
    if not bool((solution.status == 0).all()):
        raise RuntimeError(f"torchode failed on {problem.name} at {tol}")
    return solution.ys.transpose(0, 1), counter.rows, None


def per_sample_error(ys: torch.Tensor, reference: torch.Tensor, tol: float) -> torch.Tensor:
    """``(batch,)``: max over times of RMS over the state of ``|y - ref| / (tol + tol |ref|)``."""
    scaled = (ys - reference) / (tol + tol * reference.abs())
    return scaled.square().mean(-1).sqrt().amax(0)


@dataclass
class Row:
    problem: str
    backend: str
    tol: float
    wall_s: float
    rows_evaluated: int
    ideal_rows: int
    evaluations_vs_ideal: float
    worst_error_x_tol: float
    median_error_x_tol: float
    worst_error_x_alone: float
    median_error_x_alone: float
    alone_rows_vs_tolgate_alone: float


def wall_times(problem: Problem, backends: dict[str, Callable], tol: float, repeats: int) -> dict[str, float]:
    """Best batch-solve time per backend; the repeats go round-robin over the backends, so a change
    in the load of the (shared) machine hits every backend alike."""
    everyone = torch.arange(problem.y0.shape[0])
    best = dict.fromkeys(backends, float("inf"))
    for _ in range(repeats):
        for name, solve in backends.items():
            start = time.perf_counter()
            with torch.no_grad():
                solve(problem, everyone, tol)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(
    problem: Problem,
    backend: str,
    solve: Callable,
    tol: float,
    wall_s: float,
    subset: torch.Tensor,
    ideal: int,
):
    with torch.no_grad():
        ys, rows, _ = solve(problem, torch.arange(problem.y0.shape[0]), tol)
    errors = per_sample_error(ys, problem.reference, tol)
    # The spread subset, plus this backend's worst sample in the batch (likely its worst ratio).
    spread = subset
    subset = torch.cat((spread, errors.argmax().view(1))).unique()
    alone_errors, alone_rows = [], 0
    for i in subset.tolist():
        one = torch.tensor([i])
        with torch.no_grad():
            ys_alone, rows_alone, _ = solve(problem, one, tol)
        alone_errors.append(float(per_sample_error(ys_alone, problem.reference[:, one], tol)[0]))
        alone_rows += rows_alone if i in spread else 0
    ratio = errors[subset] / torch.tensor(alone_errors, dtype=F64).clamp(min=1e-300)
    return Row(
        problem=problem.name,
        backend=backend,
        tol=tol,
        wall_s=wall_s,
        rows_evaluated=rows,
        ideal_rows=ideal,
        evaluations_vs_ideal=rows / ideal,
        worst_error_x_tol=float(errors.max()),
        median_error_x_tol=float(errors.median()),
        worst_error_x_alone=float(ratio.max()),
        median_error_x_alone=float(ratio.median()),
        alone_rows_vs_tolgate_alone=float("nan"),  # filled in by the caller
    ), alone_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-5, 1e-7])
    parser.add_argument("--alone", type=int, default=32, help="samples solved alone per problem")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/results/per_sample.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    backends = {"tolgate": solve_tolgate, "torchdiffeq": solve_torchdiffeq}
    notes = []
    if torchode is not None:
        backends["torchode"] = solve_torchode
        notes.append(f"torchode {metadata.version('torchode')}: eager, Dopri5 + IntegralController")
    else:
        notes.append("torchode not installed: skipped")

    results: list[Row] = []
    print(HEADER)
    for problem in (linear_oscillators(), mlp_field_problem()):
        batch = problem.y0.shape[0]
        subset = torch.linspace(0, batch - 1, args.alone).round().long().unique()
        for tol in args.tolerances:
            with torch.no_grad():
                _, _, nfe = solve_tolgate(problem, torch.arange(batch), tol)
            ideal = int(nfe.sum())
            walls = wall_times(problem, backends, tol, args.repeats)
            alone_rows = {}
            rows_here = []
            for name, solve in backends.items():
                row, alone_rows[name] = measure(problem, name, solve, tol, walls[name], subset, ideal)
                rows_here.append(row)
            for row in rows_here:
                row.alone_rows_vs_tolgate_alone = alone_rows[row.backend] / alone_rows["tolgate"]
                results.append(row)
                print_row(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/per_sample.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "tolerances"),
        "environment": {
            "torch": torch.__version__,
            "torchdiffeq": torchdiffeq.__version__,
            "python": platform.python_version(),
            "threads": 1,
        },
        "notes": notes,
        "rows": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


HEADER = (
    f"{'problem':28s} {'backend':11s} {'tol':>7s} {'wall s':>7s} {'rows':>9s} {'x ideal':>7s} "
    f"{'worst x tol':>11s} {'med x tol':>9s} {'worst x alone':>13s} {'med x alone':>11s} {'alone cost':>10s}"
)


def print_row(row: Row) -> None:
    print(
        f"{row.problem:28s} {row.backend:11s} {row.tol:7.0e} {row.wall_s:7.3f} {row.rows_evaluated:9d} "
        f"{row.evaluations_vs_ideal:7.2f} {row.worst_error_x_tol:11.3g} {row.median_error_x_tol:9.3g} "
        f"{row.worst_error_x_alone:13.3g} {row.median_error_x_alone:11.3g} "
        f"{row.alone_rows_vs_tolgate_alone:10.2f}"
    )


if __name__ == "__main__":
    main()
