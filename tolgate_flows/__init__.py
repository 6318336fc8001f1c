"""tolgate_flows: conditional continuous normalizing flows (CNF, CCNF, InfoCNF) built on tolgate.

Where things live: vector fields in :mod:`.odefuncs`, the CNF block in :mod:`.cnf`, the
multiscale architecture in :mod:`.multiscale`, priors and classifier in :mod:`.conditioning`,
the three model kinds and the loss in :mod:`.models`; data loaders in :mod:`.data`. The same
kinds on vectors (1-D and 2-D testbeds) are in :mod:`.vector_flows`, the testbed runs in
:mod:`.testbed` and their report in :mod:`.testbed_report`.
"""

from .cnf import CNFBlock
from .models import FlowModel, FlowOutput, LossParts, ModelConfig, bits_per_dim, build_model, set_divergence
from .multiscale import MultiscaleFlow
from .odefuncs import ConvODENet, MLPODENet

__all__ = [
    "CNFBlock",
    "ConvODENet",
    "FlowModel",
    "FlowOutput",
    "LossParts",
    "MLPODENet",
    "ModelConfig",
    "MultiscaleFlow",
    "bits_per_dim",
    "build_model",
    "set_divergence",
]
