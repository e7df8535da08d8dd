"""Built-in gates and faults, registered through the same hooks a third party uses."""

from ..hookspecs import hookimpl
from .baseline import BaselineGate
from .continuity import CheckpointContinuityGate
from .faults import FAULTS
from .logprob import LogprobAlignmentGate
from .moe_health import MoeHealthGate
from .ranks import RanksGate
from .reproducibility import ReproducibilityGate
from .weight_sync import WeightSyncGate


@hookimpl
def register_gates(register):
    register(LogprobAlignmentGate())
    register(WeightSyncGate())
    register(ReproducibilityGate())
    register(CheckpointContinuityGate())
    register(RanksGate())
    register(MoeHealthGate())
    register(BaselineGate())


@hookimpl
def register_faults(register):
    for fault in FAULTS:
        register(fault)
