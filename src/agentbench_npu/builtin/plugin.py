"""Built-in scenarios, registered through the same hook a third party uses."""

from ..hookspecs import hookimpl


@hookimpl
def register_scenarios(register):
    from .base import BaseScenario

    register(BaseScenario())
    register(BaseScenario(
        "base-disaggregated", "Qwen3-4B non-colocate",
        "base with trainer and engine as separate Ray actors, weights broadcast over a process group"))
    register(BaseScenario(
        "multi-node", "Multi-node 2x8",
        "base with data-parallel trainer ranks spread over Ray nodes; ranks must agree every step"))
