"""An EngineClient over HTTP: our engine server (engines/server.py) or a real SGLang server.

Generation relies only on SGLang's documented /generate fields (`input_ids`, `sampling_params`,
`return_logprob` → `meta_info.output_token_logprobs`, `finish_reason`, `prompt_tokens`), so the same
scenarios run against either server. Each request is its own POST; the server batches them.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any, Sequence

import httpx
import torch

from ..errors import UserError, one_line
from ..types import FinishReason, GenerateRequest, GenerateResult, SamplingParams
from .base import EngineClient

FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "abort")


class EngineRequestError(UserError):
    """The engine server could not be reached, refused a request, or lacks an endpoint."""


def sglang_sampling_params(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as SGLang's `sampling_params` object (the seed goes as `sampling_seed`)."""
    out: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k, "ignore_eos": params.ignore_eos,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    return out


def result_from_sglang(data: dict[str, Any], prompt_tokens: int, weight_version: int,
                       routes_shape: tuple[int, int] | None = None) -> GenerateResult:
    """A /generate response (requested with return_logprob) as a GenerateResult.

    `weight_version` is used when the server reports none or a non-integer one (SGLang's is a label).
    `routes_shape`: (num_layers, top_k) of the served MoE model, to read `meta_info.routed_experts`.
    """
    meta = data.get("meta_info") or {}
    pairs = meta.get("output_token_logprobs")
    completion = meta.get("completion_tokens", len(pairs or ()))
    if pairs is None or len(pairs) != completion:
        raise EngineRequestError(
            f"the engine server returned {completion} tokens but {len(pairs or ())} output_token_logprobs; "
            "it must honour return_logprob=true"
        )
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type") if isinstance(finish, dict) else finish
    try:
        version = int(meta.get("weight_version"))
    except (TypeError, ValueError):
        version = weight_version
    routes = None
    if routes_shape is not None and meta.get("routed_experts") is None:
        raise EngineRequestError("routed experts were asked for (return_routed_experts) but the engine server sent "
                                 "none; start SGLang with --enable-return-routed-experts")
    if routes_shape is not None:
        tokens = int(meta.get("prompt_tokens", prompt_tokens)) + len(pairs) - 1
        routes = decode_routed_experts(meta["routed_experts"], tokens, *routes_shape)
    return GenerateResult(
        output_ids=tuple(int(p[1]) for p in pairs),
        output_logprobs=tuple(float(p[0]) for p in pairs),
        text=data.get("text", ""),
        finish_reason=reason if reason in FINISH_REASONS else "abort",
        prompt_tokens=int(meta.get("prompt_tokens", prompt_tokens)),
        weight_version=version,
        matched_stop=finish.get("matched") if isinstance(finish, dict) else None,
        routed_experts=routes,
    )


def decode_routed_experts(encoded: Any, tokens: int, num_layers: int, top_k: int) -> torch.Tensor:
    """SGLang's `meta_info.routed_experts` (base64 of int32) as a [tokens, num_layers, top_k] tensor."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (TypeError, ValueError) as exc:
        raise EngineRequestError(f"the engine server's meta_info.routed_experts is not base64: {one_line(exc)}") from exc
    expected = tokens * num_layers * top_k
    if len(raw) != 4 * expected:
        raise EngineRequestError(f"the engine server returned {len(raw) // 4} routed-expert ids; {tokens} tokens "
                                 f"(prompt + output - 1) x {num_layers} layers x top-{top_k} make {expected}")
    if expected == 0:  # a one-token prompt that generated nothing: no forwarded token was routed
        return torch.zeros((0, num_layers, top_k), dtype=torch.int32)
    return torch.frombuffer(bytearray(raw), dtype=torch.int32).view(tokens, num_layers, top_k)


class HttpEngine(EngineClient):
    """Talks SGLang's native HTTP API to the server at `url`."""

    name = "http"

    def __init__(self, url: str, *, timeout: float = 600.0, max_connections: int = 256,
                 transport: httpx.AsyncBaseTransport | None = None, return_routed_experts: bool = False,
                 routes_shape: tuple[int, int] | None = None):
        """`timeout` bounds each HTTP call in seconds; `transport` replaces the network (tests, proxies);
        `return_routed_experts` asks for every request's routes (MoE; `routes_shape` = (layers, top_k), else
        read from our server's /get_model_info)."""
        self.return_routed_experts = return_routed_experts
        self.routes_shape = routes_shape
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_connections = max_connections
        self.transport = transport
        self.weight_version = 0  # ours when the server reports no integer version
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        # A pooled connection belongs to the event loop that opened it: one client per loop.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            limits = httpx.Limits(max_connections=self.max_connections,
                                  max_keepalive_connections=self.max_connections)
            self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits,
                                             transport=self.transport)
            self._client_loop = loop
        return self._client

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    missing_hint: str = "") -> dict[str, Any]:
        try:
            response = await self._http().request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EngineRequestError(f"cannot reach the engine server at {self.url}: {one_line(exc)}") from exc
        if response.status_code == 404:
            raise EngineRequestError(f"the engine server at {self.url} has no {path} endpoint (HTTP 404){missing_hint}")
        try:
            data = response.json() if response.content else {}
        except ValueError:
            data = {"message": " ".join(response.text.split())[:300]}
        if response.status_code >= 400 or (isinstance(data, dict) and data.get("success") is False):
            error = data.get("error") if isinstance(data, dict) else None
            message = (error or {}).get("message") if isinstance(error, dict) else None
            message = message or (data.get("message") if isinstance(data, dict) else None) or str(data)[:300]
            raise EngineRequestError(f"{method} {self.url}{path} failed (HTTP {response.status_code}): {message}")
        return data

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return list(await asyncio.gather(*(self._generate(r) for r in requests)))

    async def _generate(self, request: GenerateRequest) -> GenerateResult:
        body = {"input_ids": list(request.input_ids), "sampling_params": sglang_sampling_params(request.sampling),
                "return_logprob": True}
        routes_shape = None
        if request.return_routed_experts or self.return_routed_experts:
            body["return_routed_experts"] = True
            routes_shape = self.routes_shape or await self._routes_shape()
        data = await self._call("POST", "/generate", body)
        return result_from_sglang(data, len(request.input_ids), self.weight_version, routes_shape)

    async def _routes_shape(self) -> tuple[int, int]:
        """(num_layers, top_k) of the served MoE model, from our server's /get_model_info."""
        moe = (await self.model_info()).get("moe")
        if not isinstance(moe, dict):
            raise EngineRequestError(f"the engine server at {self.url} does not describe its experts in "
                                     "/get_model_info; pass routes_shape=(num_hidden_layers, num_experts_per_tok)")
        self.routes_shape = (int(moe["num_layers"]), int(moe["top_k"]))
        return self.routes_shape

    async def update_weights_from_disk(self, path: str | Path) -> int:
        data = await self._call("POST", "/update_weights_from_disk", {"model_path": str(path)})
        try:
            self.weight_version = int(data.get("weight_version"))
        except (TypeError, ValueError):
            self.weight_version += 1
        return self.weight_version

    async def weights_checksum(self) -> str:
        hint = ("; real SGLang servers do not offer one, so compare weights through agentbench-npu's engine "
                "server (engines/server.py) or skip the checksum gate")
        data = await self._call("GET", "/weights_checksum", missing_hint=hint)
        return str(data["checksum"])

    async def model_info(self) -> dict[str, Any]:
        info = await self._call("GET", "/get_model_info")
        info.setdefault("model_path", "")
        info.setdefault("weight_version", self.weight_version)
        return info

    async def flush_cache(self) -> None:
        await self._call("POST", "/flush_cache")

    # -- colocated training: the engine gives its device memory back while the trainer steps ---------
    async def release_memory_occupation(self) -> None:
        await self._call("POST", "/release_memory_occupation", {})

    async def resume_memory_occupation(self) -> None:
        await self._call("POST", "/resume_memory_occupation", {})

    # -- weights over a process group (the trainer is rank 0 and broadcasts each tensor in order) -----
    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, backend: str, group_name: str = "weight_update_group") -> None:
        await self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    async def update_weights_from_distributed(self, specs: Sequence[tuple[str, tuple, str]],
                                              group_name: str = "weight_update_group") -> int:
        """Receive one update: `specs` = (name, shape, dtype) in the order the trainer broadcasts them."""
        data = await self._call("POST", "/update_weights_from_distributed", {
            "names": [n for n, _, _ in specs], "dtypes": [d for _, _, d in specs],
            "shapes": [list(s) for _, s, _ in specs], "group_name": group_name, "flush_cache": True})
        try:
            self.weight_version = int(data.get("weight_version"))
        except (TypeError, ValueError):
            self.weight_version += 1
        return self.weight_version

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        await self._call("POST", "/destroy_weights_update_group", {"group_name": group_name})

    async def health(self) -> bool:
        try:
            response = await self._http().get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._client_loop = None
