"""The `retool` scenario: tasks, the agent loop, the reward, the warm start and the step metrics."""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from agentbench_npu.builtin.base import answers_match, boxed_answer
from agentbench_npu.recipes import Layer, load_toml
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import Task, Trajectory

from .agent import TOOL_NAME, run_episode
from .tasks import dataset_tasks, generate, generated_tasks


NO_ANSWER = -1.1


def reward_for(answer: str | None, correct: bool, tool_calls: int) -> float:
    """+1 for a right boxed answer, -1 for a wrong one, softened for tool use as the anchors do.

    slime's ReTool example scores math answers +1 / -1 and, for a wrong answer, adds 0.1 per two tool
    calls beyond the second, capped at -0.6: a small push to try the tool rather than guess. One change:
    an episode that never gives a boxed answer gets no bonus (-1.1). Otherwise, in a group where nobody is
    right, calling the tool again instead of answering is what GRPO rewards, and a small policy learns
    exactly that (measured: it stopped answering within 10 steps).
    """
    if correct:
        return 1.0
    if answer is None:
        return NO_ANSWER
    return min(-0.6, -1.0 + 0.05 * (tool_calls - 2))


class RetoolScenario:
    """Multi-turn code-interpreter RL: the policy writes Python, a real sandbox runs it."""

    name = "retool"
    checklist_item = "ReTool"
    description = "multi-turn tool calls to a code interpreter in a real sandbox; boxed-answer reward"
    uses_sandbox = True

    def recipe(self) -> Layer:
        with resources.as_file(resources.files(__package__).joinpath("retool.toml")) as path:
            return load_toml(Path(path))

    def tasks(self, options: Mapping[str, Any], seed: int, cursor: int, count: int) -> list[Task]:
        if options.get("dataset"):
            return dataset_tasks(str(options["dataset"]), seed, cursor, count)
        return generated_tasks(options, seed, cursor, count)

    async def rollout(self, ctx: RolloutContext, task: Task) -> Trajectory:
        question = task.prompt if isinstance(task.prompt, str) else str(task.prompt[-1]["content"])
        traj = await run_episode(ctx, question, ctx.options)
        traj.task_id = task.id
        return traj

    def reward(self, task: Task, traj: Trajectory) -> float:
        # the policy's own words only: code that prints "\\boxed{42}" must not answer for it
        answer = boxed_answer(traj.metadata.get("policy_text", traj.response_text))
        correct = answers_match(answer, task.label)
        traj.metadata["correct"] = correct
        traj.metadata["answered"] = answer is not None
        return reward_for(answer, correct, int(traj.metadata.get("tool_calls", 0)))

    def step_metrics(self, trajectories: list[Trajectory]) -> dict[str, float]:
        n = max(1, len(trajectories))
        statuses = [s for t in trajectories for s in t.metadata.get("tool_statuses", [])]
        return {
            "accuracy": sum(bool(t.metadata.get("correct")) for t in trajectories) / n,
            "answer_rate": sum(bool(t.metadata.get("answered")) for t in trajectories) / n,
            "tool_call_rate": sum(t.metadata.get("tool_calls", 0) > 0 for t in trajectories) / n,
            "tool_calls_mean": len(statuses) / n,
            "tool_error_rate": sum(s != "ok" for s in statuses) / len(statuses) if statuses else 0.0,
        }

    def demonstrations(self, options: Mapping[str, Any], count: int, seed: int) -> list[tuple[list[dict], Any]]:
        """Episodes the tiny policy imitates before RL: most call the tool, some copy its result wrongly,
        the rest guess without it, so the policy starts calling tools with room to get better."""
        rng = random.Random(f"retool-demos:{seed}")
        demos = []
        for _ in range(count):
            question, expr, value = generate(options, rng)
            messages = ([{"role": "system", "content": options["system_prompt"]}] if options["system_prompt"] else [])
            messages.append({"role": "user", "content": question})
            if rng.random() < float(options["demo_tool_fraction"]):
                call = json.dumps({"name": TOOL_NAME, "arguments": {"code": f"print({expr})"}})
                wrong = rng.random() < float(options["demo_wrong_copy_fraction"])
                shown = value + rng.choice([-1, 1]) * rng.randint(1, 9) if wrong else value
                response: Any = [(f"<tool_call>\n{call}\n</tool_call>", True),
                                 (f"\n<interpreter>\n{value}\n</interpreter>\n", False),
                                 (f"\\boxed{{{shown}}}", True)]
            else:
                guess = value + rng.choice([-1, 1]) * rng.randint(1, 30)
                response = f"{expr} = {guess}. \\boxed{{{guess}}}"
            demos.append((messages, response))
        return demos
