"""agentbench-npu: every item of the Ascend RL bring-up checklist as a runnable, gated scenario."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agentbench-npu")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
