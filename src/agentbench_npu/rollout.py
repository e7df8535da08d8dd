"""One step's rollout: every task × samples_per_prompt agent loops run concurrently, then rewards."""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .engines.base import EngineClient
from .engines.lockstep import Lockstep
from .errors import UserError, one_line
from .scenario import RolloutContext
from .types import SamplingParams, Task, Trajectory


def sample_seed(seed: int, step: int, task_index: int, sample: int) -> int:
    """The per-request sampling seed: a stable function of (run seed, step, task, sample)."""
    digest = hashlib.sha256(f"{seed}:{step}:{task_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


@dataclass
class RolloutBatch:
    trajectories: list[Trajectory]
    tasks: list[Task]


async def collect(scenario: Any, engine: EngineClient, tokenizer: Any, tasks: Sequence[Task], *, step: int,
                  seed: int, samples_per_prompt: int, sampling: SamplingParams, options: Mapping[str, Any],
                  services: Mapping[str, Any] | None = None, sandboxes: Any = None,
                  batching: str = "lockstep", policy: str = "model") -> RolloutBatch:
    """Run every agent loop of the step; with `batching="lockstep"` they decode in timing-free waves."""
    lockstep = Lockstep(engine) if batching == "lockstep" else None

    async def one(task_index: int, task: Task, sample: int) -> list[Trajectory]:
        s = sample_seed(seed, step, task_index, sample)
        ctx = RolloutContext(engine=lockstep or engine, tokenizer=tokenizer, sampling=sampling.replace(seed=s),
                             options=options, rng=random.Random(s), services=services or {}, sandboxes=sandboxes,
                             policy=policy)
        try:
            if lockstep is None:
                produced = await scenario.rollout(ctx, task)
            else:
                async with lockstep.participant((task_index, sample)):
                    produced = await scenario.rollout(ctx, task)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"scenario '{scenario.name}' failed in rollout of task {task.id}: {one_line(exc)}"
            ) from exc
        trajs = produced if isinstance(produced, list) else [produced]
        for traj in trajs:
            traj.group = step * 100_000 + task_index
            traj.task_id = traj.task_id or task.id
            traj.metadata.setdefault("sample", sample)
            traj.metadata.setdefault("seed", s)
            traj.reward = float(scenario.reward(task, traj))
        return trajs

    jobs = [one(i, task, j) for i, task in enumerate(tasks) for j in range(samples_per_prompt)]
    results = await asyncio.gather(*jobs)
    return RolloutBatch([t for group in results for t in group], list(tasks))
