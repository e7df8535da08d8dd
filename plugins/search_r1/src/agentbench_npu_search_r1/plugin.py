"""The entry point agentbench-npu loads (group `agentbench_npu`, name `search_r1`): two scenarios."""

from agentbench_npu.hookspecs import hookimpl


@hookimpl
def register_scenarios(register):
    from .scenario import SearchAgentScenario, SearchR1Scenario

    register(SearchR1Scenario())
    register(SearchAgentScenario())
