"""Checks run after every weight sync, and digests that let two runs be compared token for token."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Sequence

from .config import RunConfig
from .scenario import prompt_ids
from .types import GenerateRequest, SamplingParams, Task, Trajectory

PROBE_PROMPTS = 4
PROBE_TOKENS = 16


class SyncProbe:
    """A fixed probe batch: the engine generates from fixed prompts and seeds, the trainer scores the
    same tokens; after a correct sync both give the same log-probs (up to float reordering)."""

    def __init__(self, scenario: Any, config: RunConfig, dataset: Sequence[Task] | None, tokenizer: Any):
        tasks = list(dataset[:PROBE_PROMPTS]) if dataset else scenario.tasks(config.task, config.run.seed, 0,
                                                                               PROBE_PROMPTS)
        r = config.rollout
        self.requests = [
            GenerateRequest(tuple(prompt_ids(tokenizer, t.prompt)), SamplingParams(
                max_new_tokens=min(PROBE_TOKENS, r.max_new_tokens), temperature=r.temperature, top_p=r.top_p,
                top_k=r.top_k, seed=index))
            for index, t in enumerate(tasks)
        ]

    def measure(self, cluster: Any) -> dict[str, float]:
        results = asyncio.run(cluster.engine.generate(self.requests))
        trajs = []
        for request, result in zip(self.requests, results):
            traj = Trajectory(prompt_ids=list(request.input_ids))
            traj.append_model_tokens(result.output_ids, result.output_logprobs, result.routed_experts)
            trajs.append(traj)
        scored = [t for t in trajs if t.response_length]
        if not scored:  # the engine answered nothing (every request aborted): nothing agrees, nothing was compared
            nothing = 0.0 if all(r.finish_reason != "abort" for r in results) else float("nan")
            return {"mean": nothing, "max": nothing}
        train = cluster.trainer_logprobs(scored)
        gaps = [abs(a - b) for t, lp in zip(scored, train) for a, b in zip(t.rollout_logprobs, lp)]
        return {"mean": sum(gaps) / len(gaps), "max": max(gaps)}


def tokens_digest(trajs: Sequence[Trajectory]) -> str:
    """A hash of every trajectory's prompt and response tokens, in order."""
    h = hashlib.sha256()
    for t in trajs:
        h.update(repr((t.prompt_ids, t.response_ids)).encode())
    return h.hexdigest()[:16]
