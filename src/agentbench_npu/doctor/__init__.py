"""`agentbench-npu doctor`: what this machine or container has, what it lacks, and a 1-step smoke run."""

from .checks import Check
from .command import doctor

__all__ = ["Check", "doctor"]
