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
    register(BaseScenario(
        "moe", "Qwen3-30B-A3B end-to-end",
        "base on a mixture-of-experts model (tiny-moe): MoE health gated, engine and trainer routing compared"))
    register(BaseScenario(
        "r3", "R3 (Rollout Routing Replay)",
        "moe with a bf16 engine and the engine's routed experts replayed in training; the no-replay case alongside"))
