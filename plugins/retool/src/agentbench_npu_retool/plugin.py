"""The entry point agentbench-npu loads (group `agentbench_npu`, name `retool`)."""

from agentbench_npu.hookspecs import hookimpl


@hookimpl
def register_scenarios(register):
    from .scenario import RetoolScenario

    register(RetoolScenario())
