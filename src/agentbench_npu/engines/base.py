"""The one engine interface every scenario uses: the embedded engine, our HTTP server and SGLang alike."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from ..types import GenerateRequest, GenerateResult, SamplingParams


class EngineClient(ABC):
    """Generation with per-token log-probs, plus the weight-update calls RL needs.

    `return_routed_experts`: on MoE models, every result carries the experts each token was routed to
    (`GenerateResult.routed_experts`), as if every request had asked for them.
    """

    return_routed_experts: bool = False

    @abstractmethod
    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Generate for every request (batched however the engine likes); results in request order."""

    async def generate_one(self, input_ids: Sequence[int], sampling: SamplingParams) -> GenerateResult:
        (result,) = await self.generate([GenerateRequest(tuple(input_ids), sampling)])
        return result

    @abstractmethod
    async def update_weights_from_disk(self, path: str | Path) -> int:
        """Load weights from a checkpoint dir; returns the new weight version."""

    @abstractmethod
    async def weights_checksum(self) -> str:
        """Checksum (sync/checksum.py) of the weights the engine holds right now."""

    @abstractmethod
    async def model_info(self) -> dict[str, Any]:
        """At least `model_path` and `weight_version`."""

    async def flush_cache(self) -> None:
        """Drop cached prefixes (ours keep none between requests)."""

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        """Release what the client holds."""
