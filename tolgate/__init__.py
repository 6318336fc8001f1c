"""tolgate: adaptive ODE solves with exact NFE accounting and learned error tolerances.

Where things live: tolerances (or step sizes) are chosen in :mod:`tolgate.policies`; the cost
ladder of settings (tolerances and fixed grids) is :mod:`tolgate.ladder`, and the automatic rule
that moves each block on it after a check against a reference solve is :mod:`tolgate.climb`; a solve is
run by :mod:`tolgate.solver` through a backend (:mod:`tolgate.backends`; torchdiffeq's internals
only in :mod:`tolgate.torchdiffeq_backend`), NFEs are counted in :mod:`tolgate.counting` and
stored in :mod:`tolgate.records`, the REINFORCE loss is formed in :mod:`tolgate.reinforce`; gate
networks are in :mod:`tolgate.gates`. :func:`odeint`/:func:`odeint_adjoint` are drop-ins for
torchdiffeq's (:mod:`tolgate.dropin`).
"""

from .backends import BACKENDS, PerSampleBackend
from .climb import ClimbReport, climb, ladder_policies
from .dropin import odeint, odeint_adjoint
from .errors import (
    AdjointParamsError,
    NonFiniteStateError,
    NonFiniteToleranceError,
    SolveError,
    StepBudgetExceeded,
    StepSizeUnderflow,
)
from .gates import ConvGate, MLPGate
from .ladder import REFERENCE_SETTING, FixedSetting, LadderGate, LadderPolicy, SolverLadder, SolverSetting
from .persample import PerSampleData, from_torchdiffeq, index_aware, solve_per_sample
from .policies import (
    FixedStepSize,
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
from .torchdiffeq_backend import TorchdiffeqBackend

__all__ = [
    "AdjointParamsError",
    "BACKENDS",
    "FixedStepSize",
    "PerSampleBackend",
    "TorchdiffeqBackend",
    "index_aware",
    "odeint",
    "odeint_adjoint",
    "Calibration",
    "ClimbReport",
    "FixedSetting",
    "LadderGate",
    "LadderPolicy",
    "REFERENCE_SETTING",
    "SolverLadder",
    "SolverSetting",
    "climb",
    "ladder_policies",
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
