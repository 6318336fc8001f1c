"""Shared test setup: deterministic seeds and a hypothesis profile for a shared 2-core CI machine."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# No deadline: timings on a shared CPU are noise, not a property. Derandomized so a CI failure
# reproduces exactly; HYPOTHESIS_PROFILE=explore draws fresh examples on every run.
settings.register_profile("ci", deadline=None, derandomize=True, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The tests' tensors are tiny: a second intra-op thread saves nothing and, on a CPU shared with
# other jobs, its synchronisation made adjoint solves 10-30x slower (measured: 8 s vs 0.3 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
