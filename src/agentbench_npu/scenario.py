"""What a scenario is, and the context its agent loop gets. Workload code lives in plugins, not here."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Mapping, Protocol, Sequence, runtime_checkable

from .errors import UserError
from .recipes import Layer
from .engines.base import EngineClient
from .types import SamplingParams, Task, Trajectory


@runtime_checkable
class Scenario(Protocol):
    """The scenario contract (register it with `register_scenarios`).

    name            unique name used by `agentbench-npu run NAME`
    checklist_item  the item of the Ascend bring-up checklist it validates
    recipe()        its default recipe (config.Layer); `[task]` keys are its own options
    tasks(...)      deterministic tasks from (seed, cursor): the same arguments give the same tasks
    rollout(ctx, task)   async agent loop → Trajectory or list of Trajectory
    reward(task, traj)   float reward for one trajectory
    Optional:
      demonstrations(options, count, seed) → [(messages, response[, tools])] for the tiny warm start; a response
                            is text, or (text, trained) segments (tool output untrained); tools render into the prompt
      uses_sandbox = True   the runner then starts the configured sandbox backend ([sandbox]) for the
                            run and agent loops open sandboxes with `ctx.sandbox()`
      step_metrics(trajectories) → {name: float} merged into each step's report row
      tasks(..., mode=...)  a `mode` keyword gets the run's mode ("train" | "eval"), to pick a split
      has_gold_policy = True  `--policy gold` is allowed: agent loops read `ctx.policy` and replay the task's
                            gold actions instead of sampling (eval only; nothing sampled, nothing to train)
      task_result(traj) → {column: value} for the per-task table of an eval run (report `evaluation.tasks`)
      services(options) → {name: context manager}: built at set-up (so bad input fails before the run starts),
                            entered before the first rollout, exited after the last step; what each yields
                            is `ctx.services[name]` (a search server's client, say). `describe()` on a service,
                            if present, goes into the report's environment.
    """

    name: str
    checklist_item: str

    def recipe(self) -> Layer: ...

    def tasks(self, options: Mapping[str, Any], seed: int, cursor: int, count: int) -> list[Task]: ...

    def rollout(self, ctx: RolloutContext, task: Task) -> Awaitable[Trajectory | list[Trajectory]]: ...

    def reward(self, task: Task, traj: Trajectory) -> float: ...


@dataclass
class RolloutContext:
    """What an agent loop may use, and nothing else."""

    engine: EngineClient
    tokenizer: Any
    sampling: SamplingParams
    options: Mapping[str, Any]
    rng: random.Random
    services: Mapping[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("agentbench_npu.rollout"))
    sandboxes: Any = None  # the run's SandboxProvider, when the scenario declares uses_sandbox
    policy: str = "model"  # run.policy: "model" samples from the engine, "gold" replays the task's gold actions

    def sandbox(self) -> Any:
        """A new sandbox for this agent loop: `async with ctx.sandbox() as box: await box.exec(...)`."""
        if self.sandboxes is None:
            raise UserError("this scenario opened a sandbox but does not declare `uses_sandbox = True`, "
                            "so the runner started none")
        return self.sandboxes.sandbox()

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat rendered with the model's own chat template."""
        return render_chat(self.tokenizer, messages, tools, add_generation_prompt)

    def prompt_ids(self, prompt: str | Sequence[Mapping[str, Any]]) -> list[int]:
        return prompt_ids(self.tokenizer, prompt)


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer: Any, prompt: str | Sequence[Mapping[str, Any]]) -> list[int]:
    """A task prompt (a user message, or a list of chat messages) as generation-ready token ids."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(tokenizer, messages)
