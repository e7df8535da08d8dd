"""The `tau-bench` scenario: tasks, the episode, τ-bench's reward, step metrics, per-task results, warm start."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from agentbench_npu.datasets import take
from agentbench_npu.errors import UserError
from agentbench_npu.recipes import Layer, load_toml
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import Task, Trajectory

from .agent import GoldScript, run_episode
from .domain import ERROR_KINDS, OK
from .retail import CANCEL_REASONS
from .tasks import load_tasks, retail_domain, shipped_tasks
from .users import require_openai

USERS = ("scripted", "llm")
SPLITS = ("", "test", "train")


class TauBenchScenario:
    name = "tau-bench"
    checklist_item = "τ-bench"
    description = "tool-calling agent vs a simulated user on a stateful retail database; reward = database state"
    uses_sandbox = False
    has_gold_policy = True

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], list[Task]] = {}
        self._gold: dict[str, Any] = {}

    def recipe(self) -> Layer:
        with resources.as_file(resources.files(__package__).joinpath("tau_bench.toml")) as path:
            return load_toml(Path(path))

    # -- tasks ---------------------------------------------------------------------------------
    def tasks(self, options: Mapping[str, Any], seed: int, cursor: int, count: int, mode: str = "train") -> list[Task]:
        return take(self.all_tasks(options, mode), seed, cursor, count)

    def all_tasks(self, options: Mapping[str, Any], mode: str = "train") -> list[Task]:
        self._check(options)
        split = str(options["split"]) or ("test" if mode == "eval" else "train")
        path = str(options["tasks"]) or str(shipped_tasks(split))
        key = (path, split)
        if key not in self._tasks:
            self._tasks[key] = load_tasks(path, retail_domain())
        return self._tasks[key]

    @staticmethod
    def _check(options: Mapping[str, Any]) -> None:
        if options["user"] not in USERS:
            raise UserError(f"task.user is '{options['user']}'; choose {' or '.join(USERS)}")
        if options["split"] not in SPLITS:
            raise UserError(f"task.split is '{options['split']}'; choose test, train, or \"\" (test when evaluating)")
        if options["user"] == "llm" and options["user_url"]:
            require_openai()  # a missing extra is bad input: say so at set-up, not at the first rollout
        for key in ("max_turns", "max_response_tokens"):
            if int(options[key]) < 1:
                raise UserError(f"task.{key} must be at least 1, got {options[key]}")

    # -- the episode and its score -------------------------------------------------------------
    async def rollout(self, ctx: RolloutContext, task: Task) -> Trajectory:
        return await run_episode(ctx, task, retail_domain(), ctx.options, ctx.policy, self._gold)

    def reward(self, task: Task, traj: Trajectory) -> float:
        return float(traj.metadata["reward"])

    def task_result(self, traj: Trajectory) -> dict[str, Any]:
        """The columns of a trial in the report's per-task table."""
        m = traj.metadata
        return {"db_match": m["db_match"], "outputs_missing": m["outputs_missing"], "db_diff": m["db_diff"],
                "ended": m["ended"], "tool_calls": len(m["tool_statuses"]),
                "tool_errors": sum(s != OK for s in m["tool_statuses"]), "prefix_breaks": m["prefix_breaks"],
                **({"prefix_break": m["prefix_break_examples"][0]} if m["prefix_breaks"] else {})}

    def step_metrics(self, trajectories: list[Trajectory]) -> dict[str, float]:
        n = max(1, len(trajectories))
        statuses = [s for t in trajectories for s in t.metadata["tool_statuses"]]
        calls = max(1, len(statuses))
        metrics = {
            "success_rate": sum(t.metadata["reward"] >= 1.0 for t in trajectories) / n,
            "db_match_rate": sum(bool(t.metadata["db_match"]) for t in trajectories) / n,
            "tool_calls_mean": len(statuses) / n,
            "tool_error_rate": sum(s != OK for s in statuses) / calls,
            "transfer_rate": sum(t.metadata["ended"] == "transfer" for t in trajectories) / n,
            "user_stop_rate": sum(t.metadata["ended"] == "user_stop" for t in trajectories) / n,
            "prefix_break_rate": sum(t.metadata["prefix_breaks"] > 0 for t in trajectories) / n,
        }
        for kind in ERROR_KINDS:
            metrics[f"tool_errors_{kind}"] = float(statuses.count(kind))
        return metrics

    # -- warm start ----------------------------------------------------------------------------
    def demonstrations(self, options: Mapping[str, Any], count: int, seed: int) -> list[dict[str, Any]]:
        """Gold conversations of the train split as chats (the scripted user's opening, each gold call with its
        tool result, the closing message); `demo_noise` of them change one argument of the write action, so the
        policy starts imperfect and RL has work to do."""
        rng = random.Random(f"{self.name}-demos:{seed}")
        domain = retail_domain()
        tasks = self.all_tasks({**options, "tasks": "", "split": "train"})
        system = [{"role": "system", "content": domain.policy}] if options["policy_in_prompt"] else []
        tools = domain.schemas if options["tools_in_prompt"] else None
        limit = int(options["observation_chars"])
        demos = []
        for _ in range(count):
            task = rng.choice(tasks)
            db = domain.fresh_db()
            messages = system + [{"role": "user", "content": str(task.prompt)}]
            for turn in GoldScript(task).turns:
                turn = _perturbed(turn, rng, float(options["demo_noise"]))
                messages.append(turn)
                for call in turn.get("tool_calls", []):
                    result = domain.call(db, call["function"]["name"], call["function"]["arguments"])
                    messages.append({"role": "tool", "name": call["function"]["name"],
                                     "content": result.output if limit <= 0 else result.output[:limit]})
            demos.append({"messages": messages, "tools": tools})
        return demos


def _perturbed(turn: dict[str, Any], rng: random.Random, noise: float) -> dict[str, Any]:
    """The turn, or with probability `noise` (write calls only) a copy with one argument changed."""
    calls = turn.get("tool_calls")
    if not calls or rng.random() >= noise:
        return turn
    fn = calls[0]["function"]
    args = dict(fn["arguments"])
    if "reason" in args:
        args["reason"] = next(r for r in CANCEL_REASONS if r != args["reason"])
    elif "zip" in args and "city" in args:
        args["zip"] = str(int(args["zip"]) + 1)
    elif "item_ids" in args and "payment_method_id" in args and "new_item_ids" not in args:
        args["payment_method_id"] = args["payment_method_id"].split("_")[0] + "_card_0000"
    else:
        return turn
    return {**turn, "tool_calls": [{"type": "function", "function": {"name": fn["name"], "arguments": args}}]}
