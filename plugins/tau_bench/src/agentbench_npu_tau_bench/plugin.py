"""The entry point agentbench-npu loads (group `agentbench_npu`, name `tau_bench`): the `tau-bench` scenario."""

from agentbench_npu.hookspecs import hookimpl


@hookimpl
def register_scenarios(register):
    from .scenario import TauBenchScenario

    register(TauBenchScenario())
