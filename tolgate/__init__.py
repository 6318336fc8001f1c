"""tolgate: adaptive ODE solves with exact NFE accounting and learned error tolerances.

Where things live: tolerances are chosen in :mod:`tolgate.policies`, NFEs are counted in
:mod:`tolgate.solver` (``_CountingField``) and stored in :mod:`tolgate.records`, the REINFORCE
loss is formed in :mod:`tolgate.reinforce`; gate networks are in :mod:`tolgate.gates`.
"""

from .errors import (
    NonFiniteStateError,
    NonFiniteToleranceError,
    SolveError,
    StepBudgetExceeded,
    StepSizeUnderflow,
)
from .gates import ConvGate, MLPGate
from .persample import PerSampleData, from_torchdiffeq, solve_per_sample
from .policies import (
    FixedTolerance,
    GaussianGate,
    Progress,
    ScheduledTolerance,
    ToleranceChoice,
    TolerancePolicy,
)
from .records import SolveRecord, SolveStatus
from .reinforce import RunningMeanBaseline, cumulative_returns, reinforce_loss, solve_rewards
from .sample_stats import PerSampleStats, SampleStatus
from .solver import GatedSolver, gated_solvers, set_progress

__all__ = [
    "ConvGate",
    "FixedTolerance",
    "GatedSolver",
    "GaussianGate",
    "MLPGate",
    "NonFiniteStateError",
    "NonFiniteToleranceError",
    "PerSampleData",
    "PerSampleStats",
    "Progress",
    "RunningMeanBaseline",
    "SampleStatus",
    "ScheduledTolerance",
    "SolveError",
    "SolveRecord",
    "SolveStatus",
    "StepBudgetExceeded",
    "StepSizeUnderflow",
    "ToleranceChoice",
    "TolerancePolicy",
    "cumulative_returns",
    "from_torchdiffeq",
    "gated_solvers",
    "reinforce_loss",
    "set_progress",
    "solve_per_sample",
    "solve_rewards",
]
