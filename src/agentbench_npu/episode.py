"""The token bookkeeping every multi-turn agent loop repeats: a policy turn, an observation, a response budget.

An `Episode` keeps the trajectory, the exact ids the policy conditions on, and the text so far. Policy turns
are appended as trainable tokens with their log-probs; observations as environment tokens, encoded on their
own, exactly the tokens the next turn reads. The response budget covers both: an observation that does not
fit is cut to what fits, and the loop should stop there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .scenario import RolloutContext
from .types import GenerateResult, SamplingParams, Trajectory


@dataclass
class Episode:
    ctx: RolloutContext
    traj: Trajectory
    max_response_tokens: int
    context: list[int] = field(default_factory=list)
    text: str = ""  # policy turns and observations, as the report's samples show them
    policy_text: str = ""  # the policy's own words only: what answers are graded on

    @classmethod
    def start(cls, ctx: RolloutContext, prompt_ids: list[int], max_response_tokens: int) -> Episode:
        return cls(ctx, Trajectory(prompt_ids=prompt_ids), int(max_response_tokens), list(prompt_ids))

    @property
    def room(self) -> int:
        return self.max_response_tokens - self.traj.response_length

    async def policy_turn(self, sampling: SamplingParams) -> tuple[GenerateResult, str] | None:
        """Sample one turn (at most the per-turn and the remaining budget); None when no budget is left."""
        result = await sample_into(self.ctx, self.traj, self.context, sampling,
                                   min(self.ctx.sampling.max_new_tokens, self.room))
        if result is None:
            return None
        turn_text = self.ctx.tokenizer.decode(result.output_ids, skip_special_tokens=True)
        self.text += turn_text
        self.policy_text += turn_text
        return result, turn_text

    def observe(self, shown: str) -> bool:
        """Append an observation as environment tokens; False when the budget cut it (the loop should stop)."""
        ids = self.ctx.tokenizer.encode(shown, add_special_tokens=False)
        kept = ids[:max(0, self.room)]
        self.traj.append_env_tokens(kept)
        self.context += kept
        self.text += shown if len(kept) == len(ids) else self.ctx.tokenizer.decode(kept)
        return len(kept) == len(ids)

    def finish(self, **metadata: Any) -> Trajectory:
        self.traj.response_text = self.text
        self.traj.metadata.update(policy_text=self.policy_text, **metadata)
        return self.traj


async def sample_into(ctx: RolloutContext, traj: Trajectory, context: list[int], sampling: SamplingParams,
                      budget: int) -> GenerateResult | None:
    """Sample up to `budget` tokens after `context`; they join `traj` as trainable tokens with their log-probs
    and extend `context` in place. None (nothing sampled) when the budget is spent."""
    if budget <= 0:
        return None
    result = await ctx.engine.generate_one(context, sampling.replace(max_new_tokens=budget))
    routes = result.routed_experts
    if routes is not None and context != traj.tokens:
        # the engine read another text than the trajectory holds (a chat template that re-rendered history):
        # its routes are not this trajectory's; a trajectory like that is not trained on anyway
        routes, traj.routed_experts = None, None
        traj.metadata["routed_experts_dropped"] = "the engine's input differed from the trajectory's tokens"
    traj.append_model_tokens(result.output_ids, result.output_logprobs, routes)
    traj.weight_version = result.weight_version
    context.extend(result.output_ids)
    return result
