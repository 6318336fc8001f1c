"""torchdiffeq's own test suite, run raw and through tolgate's drop-in shim: what passes in one and not the other.

    python benchmarks/torchdiffeq_suite.py PATH/TO/torchdiffeq/tests            # table and differing cases
    python benchmarks/torchdiffeq_suite.py PATH/TO/torchdiffeq/tests --json runs/torchdiffeq_suite.json
    OMP_NUM_THREADS=1 python benchmarks/torchdiffeq_suite.py TESTS --timeout 3600 --pattern 'api_tests.py'

torchdiffeq's sdist carries no tests: take ``tests/`` from a checkout of the commit that matches the
installed release (0.2.5 is commit ``a88aac5`` of https://github.com/rtqichen/torchdiffeq), e.g.
``git clone https://github.com/rtqichen/torchdiffeq && git -C torchdiffeq checkout a88aac5``, then
pass ``torchdiffeq/tests``. Nothing is written into that folder.

Each run is a fresh Python process (``--worker``) that loads every ``*_tests.py`` of the folder with
:mod:`unittest` (the tests are ``unittest.TestCase`` classes that loop over methods, dtypes and
devices inside ``self.subTest``; pytest without a subtest plugin would stop at a test's first
failing combination). Every subtest is its own *case*, so one failing method does not hide the rest;
a *test* fails when any of its cases does. CUDA cases run only where ``torch.cuda.is_available()``
(torchdiffeq's ``problems.DEVICES``); nothing else is skipped.

The shimmed run replaces ``sys.modules["torchdiffeq"]`` by a copy of the module whose ``odeint`` and
``odeint_adjoint`` are :func:`tolgate.odeint` and :func:`tolgate.odeint_adjoint`, after tolgate is
imported, so the tests' ``torchdiffeq.odeint(...)`` goes through the shim while tolgate itself still
reaches the real torchdiffeq. (Setting ``torchdiffeq.odeint = tolgate.odeint`` on the module
instead would make the shim call itself: tolgate's backend looks ``torchdiffeq.odeint`` up when it
solves.)

Output: a table of pass/fail/error/skip counts per run (tests and cases), then every case whose
outcome differs, and every case that passes in neither run, with each run's exception. Exit status 0
when no case passes raw and fails shimmed, 1 otherwise, 2 when a run did not finish (``--timeout``;
its finished cases still count).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
import unittest
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("raw", "shimmed")
OUTCOMES = ("pass", "fail", "error", "skip")
ErrorInfo = tuple[type[BaseException], BaseException, Any] | None


# ----------------------------------------------------------------------------- one run (worker)


def install_shim() -> None:
    """Make ``import torchdiffeq`` give a copy of torchdiffeq whose solve functions are tolgate's."""
    import tolgate  # first: tolgate keeps its own reference to the real torchdiffeq

    real = sys.modules["torchdiffeq"]
    shim = types.ModuleType(real.__name__, real.__doc__)
    shim.__dict__.update(vars(real))
    shim.odeint = tolgate.odeint
    shim.odeint_adjoint = tolgate.odeint_adjoint
    sys.modules["torchdiffeq"] = shim


def _describe(err: ErrorInfo) -> str | None:
    if err is None:
        return None
    kind, value, _ = err
    first_line = (str(value).strip().splitlines() or [""])[0]
    return f"{kind.__name__}: {first_line[:300]}"


class CaseRecorder(unittest.TestResult):
    """Every test's and every subtest's outcome, written to ``out`` (JSON) after each test, so a
    run stopped by a timeout still reports what finished."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.tests: dict[str, dict[str, str | None]] = {}
        self.subtests: dict[str, dict[str, dict[str, str | None]]] = {}

    def _own(self, test: unittest.TestCase, outcome: str, err: ErrorInfo = None) -> None:
        parent = getattr(test, "test_case", None)  # a skip inside a subtest reports the subtest
        if parent is not None:
            self._sub(parent, test, outcome, _describe(err))
            return
        self.tests[test.id()] = {"outcome": outcome, "error": _describe(err)}

    def _sub(self, test: unittest.TestCase, subtest: unittest.TestCase, outcome: str, error: str | None) -> None:
        cases = self.subtests.setdefault(test.id(), {})
        name, n = subtest.id(), 2
        while name in cases:  # torchdiffeq names some subtests alike (test_wrong_callback)
            name, n = f"{subtest.id()} #{n}", n + 1
        cases[name] = {"outcome": outcome, "error": error}

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802 (unittest's names)
        self._own(test, "pass")

    def addFailure(self, test: unittest.TestCase, err: ErrorInfo) -> None:  # noqa: N802
        self._own(test, "fail", err)

    def addError(self, test: unittest.TestCase, err: ErrorInfo) -> None:  # noqa: N802
        self._own(test, "error", err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802
        self._own(test, "skip")

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: ErrorInfo) -> None:  # noqa: N802
        if err is None:
            outcome = "pass"
        else:
            outcome = "fail" if issubclass(err[0], test.failureException) else "error"
        self._sub(test, subtest, outcome, _describe(err))

    def stopTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().stopTest(test)
        self.out.write_text(json.dumps({"tests": self.tests, "subtests": self.subtests}))


def run_worker(mode: str, tests_dir: Path, pattern: str, out: Path) -> None:
    """Load every test file of ``tests_dir`` matching ``pattern`` and run it, recording into ``out``."""
    if mode == "shimmed":
        install_shim()
    suite = unittest.defaultTestLoader.discover(str(tests_dir), pattern=pattern, top_level_dir=str(tests_dir))
    recorder = CaseRecorder(out)
    recorder.out.write_text(json.dumps({"tests": {}, "subtests": {}}))
    suite.run(recorder)


# ----------------------------------------------------------------------------- cases and comparison


@dataclass
class RunResult:
    """One run: each test's and each case's outcome and error (``"ExceptionType: message"``)."""

    mode: str
    tests: dict[str, str]
    cases: dict[str, dict[str, str | None]]
    seconds: float
    finished: bool


def cases_of(recorded: dict[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, str | None]]]:
    """(outcome per test, outcome per case) from a worker's JSON. A test with subtests fails when
    one of them does; its own failure outside every subtest is a case of its own."""
    tests, cases = {}, {}
    for test_id in sorted(set(recorded["tests"]) | set(recorded["subtests"])):
        own = recorded["tests"].get(test_id)
        subtests = recorded["subtests"].get(test_id, {})
        cases.update(subtests)
        if own is not None and (not subtests or own["outcome"] != "pass"):
            cases[test_id if not subtests else f"{test_id} (outside subtests)"] = own
        # unittest reports nothing of its own for a test whose subtest failed
        worst = [c["outcome"] for c in subtests.values()] + ([own["outcome"]] if own else [])
        tests[test_id] = next((o for o in ("error", "fail") if o in worst), "skip" if "skip" in worst else "pass")
    return tests, cases


def run_mode(mode: str, tests_dir: Path, pattern: str, timeout: float | None) -> RunResult:
    """One worker process in ``mode``; a run past ``timeout`` seconds is stopped and keeps what finished."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{mode}.json"
        command = [sys.executable, __file__, str(tests_dir), "--worker", mode, "--worker-out", str(out)]
        command += ["--pattern", pattern]
        start, finished = time.perf_counter(), True
        try:
            subprocess.run(command, timeout=timeout, check=False, stdout=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            finished = False
        recorded = json.loads(out.read_text()) if out.exists() else {"tests": {}, "subtests": {}}
    tests, cases = cases_of(recorded)
    return RunResult(mode, tests, cases, time.perf_counter() - start, finished)


def compare(raw: RunResult, shimmed: RunResult) -> dict[str, list[str]]:
    """Case names by how the runs differ (passes raw but not shimmed, or the reverse), and the
    cases that pass in neither (a test that fails on torchdiffeq itself says nothing of the shim)."""
    names = sorted(set(raw.cases) | set(shimmed.cases))

    def passes(run: RunResult, name: str) -> bool:
        return run.cases.get(name, {"outcome": "missing"})["outcome"] == "pass"

    return {
        "passes raw, not shimmed": [n for n in names if passes(raw, n) and not passes(shimmed, n)],
        "passes shimmed, not raw": [n for n in names if passes(shimmed, n) and not passes(raw, n)],
        "passes in neither": [n for n in names if not passes(raw, n) and not passes(shimmed, n)],
    }


def report(runs: list[RunResult], diff: dict[str, list[str]]) -> str:
    """The table of counts per run, then each listed case with each run's outcome."""
    lines = [f"{'run':<9}{'level':<7}" + "".join(f"{o:>7}" for o in OUTCOMES) + f"{'seconds':>10}"]
    for run in runs:
        for level, outcomes in (
            ("tests", list(run.tests.values())),
            ("cases", [c["outcome"] for c in run.cases.values()]),
        ):
            counts = Counter(outcomes)
            row = f"{run.mode:<9}{level:<7}" + "".join(f"{counts[o]:>7}" for o in OUTCOMES)
            lines.append(row + f"{run.seconds:>10.0f}" + ("" if run.finished else "  (timed out)"))
    for title, names in diff.items():
        lines.append(f"\n{title} ({len(names)}):")
        for name in names:
            lines.append(f"  {name}")
            for run in runs:
                case = run.cases.get(name, {"outcome": "missing", "error": None})
                lines.append(f"      {run.mode}: {case['outcome']}" + (f"  {case['error']}" if case["error"] else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tests_dir", type=Path, help="torchdiffeq's tests/ folder (it holds problems.py)")
    p.add_argument("--pattern", default="*_tests.py", help="test files to load (default: *_tests.py)")
    p.add_argument("--timeout", type=float, default=None, help="seconds each run may take (default: no limit)")
    p.add_argument("--json", type=Path, help="also write both runs' outcomes and the differences here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tests_dir = args.tests_dir.resolve()
    if not (tests_dir / "problems.py").is_file():
        print(f"error: {tests_dir} is not torchdiffeq's tests folder (no problems.py)", file=sys.stderr)
        return 2
    if args.worker:
        run_worker(args.worker, tests_dir, args.pattern, args.worker_out)
        return 0
    runs = [run_mode(mode, tests_dir, args.pattern, args.timeout) for mode in MODES]
    diff = compare(*runs)
    print(report(runs, diff))
    if args.json:
        summary = {"runs": [vars(run) for run in runs], "differences": diff}
        args.json.write_text(json.dumps(summary, indent=2))
    if not all(run.finished for run in runs):
        return 2
    return 1 if diff["passes raw, not shimmed"] else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: a second thread only adds contention
    raise SystemExit(main())
