"""`ScriptedPolicy`: a test double of our `EngineClient` for the POLICY only, shared by the agent-loop tests.

It answers each `generate` with the next scripted turn, tokenised by the real tokenizer, log-prob
`POLICY_LOGPROB` per token, honouring the request's `max_new_tokens` and `stop_token_ids` as an engine does.
Everything else an agent loop touches (tokenizer, sandbox, retrieval server, trajectory) stays real.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentbench_npu.engines.base import EngineClient
from agentbench_npu.types import GenerateRequest, GenerateResult

POLICY_LOGPROB = -0.5


class ScriptedPolicy(EngineClient):
    """Test double of EngineClient for the policy: returns the scripted turns in order, as a real engine
    would return sampled ones (real token ids, a log-prob per token, cut at a stop token or the budget)."""

    def __init__(self, tokenizer: Any, turns: Sequence[str], logprob: float = POLICY_LOGPROB):
        self.tokenizer = tokenizer
        self.turns = list(turns)
        self.logprob = logprob
        self.requests: list[GenerateRequest] = []
        self.outputs: list[tuple[int, ...]] = []

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        results = []
        for request in requests:
            self.requests.append(request)
            if not self.turns:
                raise RuntimeError(f"the policy was asked for turn {len(self.requests)}, beyond its script")
            ids = self.tokenizer.encode(self.turns.pop(0), add_special_tokens=False)
            reason = "stop"  # the scripted turn is all the policy says: as if it ended with EOS
            stops = [k for k, i in enumerate(ids) if i in request.sampling.stop_token_ids]
            if stops:
                ids = ids[:stops[0] + 1]
            if len(ids) > request.sampling.max_new_tokens:
                ids, reason = ids[:request.sampling.max_new_tokens], "length"
            self.outputs.append(tuple(ids))
            results.append(GenerateResult(
                output_ids=tuple(ids), output_logprobs=tuple([self.logprob] * len(ids)),
                text=self.tokenizer.decode(ids, skip_special_tokens=True), finish_reason=reason,  # type: ignore[arg-type]
                prompt_tokens=len(request.input_ids), weight_version=3))
        return results

    async def update_weights_from_disk(self, path: Any) -> int:
        raise NotImplementedError("a scripted policy has no weights")

    async def weights_checksum(self) -> str:
        raise NotImplementedError("a scripted policy has no weights")

    async def model_info(self) -> dict[str, Any]:
        return {"model_path": "scripted", "weight_version": 3}
