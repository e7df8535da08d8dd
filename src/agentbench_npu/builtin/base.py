"""The `base` scenario: arithmetic questions, an answer in \\boxed{}, reward 1 when it is right."""

from __future__ import annotations

import random
import re
from typing import Any, Mapping

from ..recipes import Layer, packaged_recipe
from ..scenario import RolloutContext
from ..types import Task, Trajectory

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text`, stripped; None when there is none."""
    found = BOXED.findall(text)
    return found[-1].strip() if found else None


def answers_match(answer: str | None, label: Any) -> bool:
    if answer is None:
        return False
    a, b = answer.replace(" ", ""), str(label).replace(" ", "")
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


class BaseScenario:
    """Single-turn arithmetic with a boxed answer: the core loop with nothing else in the way."""

    def __init__(self, name: str = "base", checklist_item: str = "Qwen3-4B colocate",
                 description: str = "single-turn arithmetic, boxed-answer reward, GRPO with colocated weight sync"):
        self.name = name
        self.checklist_item = checklist_item
        self.description = description

    def recipe(self) -> Layer:
        layer = packaged_recipe(f"{self.name}.toml")
        assert layer is not None, f"scenarios/{self.name}.toml is missing from the package"
        return layer

    def _problem(self, rng: random.Random, options: Mapping[str, Any]) -> tuple[str, int]:
        hi = int(options["max_operand"])
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        op = rng.choice(str(options["ops"]))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"{a} {op} {b}", value

    def tasks(self, options: Mapping[str, Any], seed: int, cursor: int, count: int) -> list[Task]:
        out = []
        for index in range(cursor, cursor + count):
            expr, value = self._problem(random.Random(f"base:{seed}:{index}"), options)
            out.append(Task(id=f"base-{index}", prompt=f"What is {expr}?", label=value, metadata={"expr": expr}))
        return out

    async def rollout(self, ctx: RolloutContext, task: Task) -> Trajectory:
        prompt_ids = ctx.prompt_ids(task.prompt)
        result = await ctx.engine.generate_one(prompt_ids, ctx.sampling)
        traj = Trajectory(prompt_ids=prompt_ids, task_id=task.id)
        traj.append_model_tokens(result.output_ids, result.output_logprobs, result.routed_experts)
        traj.response_text = result.text
        traj.weight_version = result.weight_version
        traj.status = {"length": "truncated", "abort": "aborted"}.get(result.finish_reason, "completed")
        return traj

    def reward(self, task: Task, traj: Trajectory) -> float:
        return 1.0 if answers_match(boxed_answer(traj.response_text), task.label) else 0.0

    def demonstrations(self, options: Mapping[str, Any], count: int, seed: int) -> list[tuple[list[dict], str]]:
        rng = random.Random(f"base-demos:{seed}")
        wrong = float(options["wrong_demo_fraction"])
        demos = []
        for _ in range(count):
            expr, value = self._problem(rng, options)
            shown = value + rng.choice([-1, 1]) * rng.randint(1, 5) if rng.random() < wrong else value
            demos.append(([{"role": "user", "content": f"What is {expr}?"}], f"{expr} = {value}. \\boxed{{{shown}}}"))
        return demos
