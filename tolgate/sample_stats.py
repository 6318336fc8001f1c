"""What a per-sample solve cost and how each sample ended: :class:`PerSampleStats`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .records import SAMPLE_STATUSES, SolveStatus

#: Deprecated alias: per-sample statuses are :class:`~tolgate.records.SolveStatus` members, stored
#: in status tensors as their integer codes (``int(status)``, ``SolveStatus.from_code(code)``).
SampleStatus = SolveStatus


@dataclass(frozen=True)
class PerSampleStats:
    """Per-sample statistics of one :func:`~tolgate.persample.solve_per_sample` call.

    All tensors have shape ``(batch,)`` and live on the state's device.

    Attributes:
        method: the Runge-Kutta method.
        nfe: rows of this sample passed to the vector field (int64). For an FSAL method with ``s``
            stages: ``2 + (s - 1) * (n_accepted + n_rejected)`` (two evaluations choose the
            initial step), or 0 for a sample whose ``y0`` was not finite.
        n_accepted, n_rejected: steps accepted and rejected by the error test (int64). A step
            whose error estimate is NaN or inf counts as rejected.
        status: :class:`~tolgate.records.SolveStatus` codes (int64, ``int(status)``).
        t_reached: the time the sample's solve ended at: ``t[-1]`` on success, else the last
            accepted time (where it is frozen). Same dtype as the solver's time.
    """

    method: str
    nfe: torch.Tensor
    n_accepted: torch.Tensor
    n_rejected: torch.Tensor
    status: torch.Tensor
    t_reached: torch.Tensor

    @property
    def n_steps(self) -> torch.Tensor:
        """Accepted plus rejected steps per sample, ``(batch,)``."""
        return self.n_accepted + self.n_rejected

    @property
    def rows_evaluated(self) -> int:
        """Total rows passed to the vector field (the batch's cost in single-sample evaluations)."""
        return int(self.nfe.sum())

    @property
    def succeeded(self) -> torch.Tensor:
        """Boolean mask ``(batch,)`` of samples that reached ``t[-1]``."""
        return self.status == SolveStatus.SUCCESS.code

    def status_of(self, sample: int) -> SolveStatus:
        """The status of sample ``sample`` as an enum member."""
        return SolveStatus.from_code(int(self.status[sample]))

    def status_counts(self) -> dict[SolveStatus, int]:
        """How many samples ended with each status a sample can end with (zeros included)."""
        counts = torch.bincount(self.status.cpu(), minlength=len(SAMPLE_STATUSES)).tolist()
        return {status: counts[status.code] for status in SAMPLE_STATUSES}
