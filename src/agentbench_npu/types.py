"""Data that crosses boundaries: between scenarios, engines, the trainer, gates and reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]
TrajectoryStatus = Literal["completed", "truncated", "aborted", "failed"]


@dataclass(frozen=True)
class Task:
    """One problem a scenario poses. `label` is what the reward compares against."""

    id: str
    prompt: str | list[dict[str, Any]]
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingParams:
    """Field names follow SGLang's `sampling_params`. `top_k=-1` and `top_p=1.0` disable truncation."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")

    def replace(self, **changes: Any) -> SamplingParams:
        return SamplingParams(**{**asdict(self), **changes})


@dataclass(frozen=True)
class GenerateRequest:
    input_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    return_routed_experts: bool = False  # MoE models: the experts each token was routed to (SGLang's field)


@dataclass(frozen=True)
class GenerateResult:
    """What an engine returns for one request.

    `output_logprobs[i]` is the log-probability of `output_ids[i]` under the distribution the engine
    actually sampled from (see engines/sampling.py for exactly what is applied).
    """

    output_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    weight_version: int = 0
    matched_stop: str | int | None = None
    # MoE models, when asked for: int32 [prompt_tokens + len(output_ids) - 1, num_layers, top_k], the experts
    # every forwarded token was routed to (-1 in layers without experts); None otherwise
    routed_experts: Any = field(default=None, compare=False, repr=False)


class TrajectoryError(ValueError):
    """A trajectory was built in a way that would corrupt training data."""


@dataclass
class Trajectory:
    """A prompt and the response tokens grown by appends.

    Model tokens are trainable and carry their rollout log-probs; environment tokens (tool output,
    user turns) are not trainable and carry log-prob 0.0. `response_ids`, `loss_mask` and
    `rollout_logprobs` always have equal length: the append methods are the only way in.

    `routed_experts` (MoE models): the engine's expert choice for tokens[:-1] as of the last model turn,
    int32 [tokens, num_layers, top_k]; the trainer replays it (R3) or compares its own routing with it.
    """

    prompt_ids: list[int]
    task_id: str = ""
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    reward: float | None = None
    status: TrajectoryStatus = "completed"
    response_text: str = ""
    group: int = 0
    weight_version: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    routed_experts: Any = field(default=None, compare=False, repr=False)

    def append_model_tokens(self, ids: list[int] | tuple[int, ...], logprobs: list[float] | tuple[float, ...],
                            routed_experts: Any = None) -> None:
        """Append sampled tokens. `routed_experts`: the engine's routes for the call that sampled them, whose
        input was exactly this trajectory's tokens so far (they then cover every token but the new last one)."""
        if len(ids) != len(logprobs):
            raise TrajectoryError(f"{len(ids)} model tokens came with {len(logprobs)} log-probs")
        for lp in logprobs:
            if not math.isfinite(lp) or lp > 1e-6:
                raise TrajectoryError(f"model token log-prob {lp} is not a finite value <= 0")
        expected = len(self.prompt_ids) + len(self.response_ids) + len(ids) - 1
        if routed_experts is not None and routed_experts.shape[0] != expected:
            raise TrajectoryError(f"routed experts cover {routed_experts.shape[0]} tokens; the call that sampled "
                                  f"these {len(ids)} tokens after {expected + 1 - len(ids)} must cover {expected}")
        self.response_ids.extend(int(i) for i in ids)
        self.loss_mask.extend([1] * len(ids))
        self.rollout_logprobs.extend(float(lp) for lp in logprobs)
        if routed_experts is not None:  # the newest call covers every earlier position too
            self.routed_experts = routed_experts
        elif self.routed_experts is not None:  # stale now: replaying them would cover only part of the tokens
            self.routed_experts = None
            self.metadata["routed_experts_dropped"] = "a later model turn came without routed experts"

    def append_env_tokens(self, ids: list[int] | tuple[int, ...]) -> None:
        self.response_ids.extend(int(i) for i in ids)
        self.loss_mask.extend([0] * len(ids))
        self.rollout_logprobs.extend([0.0] * len(ids))

    def exclude_from_training(self, reason: str) -> None:
        """Keep the trajectory for rewards and reports, but train on none of it (every loss-mask entry 0)."""
        self.loss_mask = [0] * len(self.response_ids)
        self.rollout_logprobs = [0.0] * len(self.response_ids)
        self.metadata["excluded_from_training"] = reason

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    @property
    def num_trainable(self) -> int:
        return sum(self.loss_mask)


@dataclass
class StepMetrics:
    """One row of report.json's `steps`. Field names are part of the public report schema."""

    step: int
    reward_mean: float
    reward_std: float
    loss: float
    kl: float
    entropy: float
    logprob_abs_diff_mean: float
    logprob_abs_diff_max: float
    rollout_seconds: float
    train_seconds: float
    weight_sync_seconds: float
    weights_checksum_match: bool
    tokens_per_second: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        extra = row.pop("extra")
        return {**row, **extra}


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    value: Any
    threshold: Any
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
