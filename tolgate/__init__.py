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
    NoiseMatchedTolerance,
    Progress,
    ScheduledTolerance,
    ToleranceChoice,
    TolerancePolicy,
)
from .probes import Calibration, GateProbeReport, Probe, ProbedGateEstimator, calibrate, run_probe
from .records import SolveRecord, SolveStatus
from .reinforce import RunningMeanBaseline, cumulative_returns, leave_one_out_loss, reinforce_loss, solve_rewards
from .sample_stats import PerSampleStats, SampleStatus
from .scopes import collect_records, use_policies
from .solver import GatedSolver, gated_solvers, set_progress

__all__ = [
    "Calibration",
    "ConvGate",
    "FixedTolerance",
    "GatedSolver",
    "GateProbeReport",
    "GaussianGate",
    "MLPGate",
    "NonFiniteStateError",
    "NonFiniteToleranceError",
    "NoiseMatchedTolerance",
    "PerSampleData",
    "PerSampleStats",
    "Probe",
    "ProbedGateEstimator",
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
    "calibrate",
    "collect_records",
    "cumulative_returns",
    "from_torchdiffeq",
    "gated_solvers",
    "leave_one_out_loss",
    "reinforce_loss",
    "run_probe",
    "set_progress",
    "solve_per_sample",
    "solve_rewards",
    "use_policies",
]
