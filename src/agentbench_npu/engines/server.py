"""Our engine behind HTTP: a subset of SGLang's native API plus OpenAI-style chat completions.

Speaking SGLang's wire format lets one client (engines/http.py) drive this server and a real SGLang
server alike, and lets agent code written against the OpenAI client run on the reference engine.
Requests are validated here so that a bad field is a one-line HTTP 400 naming it, never a 500 from
deep inside decoding.
"""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from typing import Any, Callable

import fastapi
import torch
import uvicorn
from fastapi.responses import JSONResponse, Response

from ..errors import close_names, one_line
from ..http_thread import AppThread
from ..types import GenerateRequest, GenerateResult, SamplingParams
from .chat import openai_choice
from .reference import ReferenceEngine
from .server_rl import add_rl_routes


class BadRequest(ValueError):
    """Client input the server refuses with HTTP 400; the message is one line naming the field."""


def _need(value: Any, ok: bool, path: str, what: str) -> Any:
    if not ok:
        raise BadRequest(f"{path} must be {what}, got {json.dumps(value)}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v: Any, path: str) -> int:
    return _need(v, _is_int(v), path, "an integer")


def _float(v: Any, path: str) -> float:
    return float(_need(v, (_is_int(v) or isinstance(v, float)) and math.isfinite(v), path, "a finite number"))


def _bool(v: Any, path: str) -> bool:
    return _need(v, isinstance(v, bool), path, "true or false")


def _strs(v: Any, path: str) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    ok = isinstance(items, list) and all(isinstance(s, str) and s for s in items)
    return tuple(_need(items, ok, path, "a non-empty string or a list of them"))


def _ints(v: Any, path: str) -> tuple[int, ...]:
    return tuple(_need(v, isinstance(v, list) and all(map(_is_int, v)), path, "a list of integers"))


# SGLang sampling field -> (our SamplingParams field, converter). `seed` is accepted as an alias.
SAMPLING_FIELDS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "max_new_tokens": ("max_new_tokens", _int), "temperature": ("temperature", _float),
    "top_p": ("top_p", _float), "top_k": ("top_k", _int), "stop": ("stop", _strs),
    "stop_token_ids": ("stop_token_ids", _ints), "ignore_eos": ("ignore_eos", _bool),
    "sampling_seed": ("seed", _int), "seed": ("seed", _int),
}
# SGLang fields the reference engine does not implement: accepted only at SGLang's default value.
SGLANG_DEFAULTS: dict[str, Any] = {
    "n": 1, "min_new_tokens": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "no_stop_trim": False,
}
GENERATE_FIELDS = ("input_ids", "text", "sampling_params", "return_logprob", "return_text_in_logprobs", "rid",
                   "stream", "logprob_start_len", "top_logprobs_num", "return_routed_experts")
GENERATE_DEFAULTS = {"stream": False, "top_logprobs_num": 0}  # logprob_start_len only concerns input log-probs
CHAT_FIELDS = ("model", "messages", "tools", "tool_choice", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "stop", "seed", "n", "logprobs", "top_logprobs", "stream", "user", "parallel_tool_calls",
               "frequency_penalty", "presence_penalty")


def _reject_unknown(body: dict[str, Any], known: tuple[str, ...] | dict, where: str) -> None:
    for key in body:
        if key not in known:
            raise BadRequest(f"unknown field {where}{key}{close_names(key, list(known))}; known: {', '.join(known)}")


def _only_defaults(body: dict[str, Any], defaults: dict[str, Any], prefix: str) -> None:
    for key, default in defaults.items():
        if body.get(key) not in (None, default):
            raise BadRequest(f"{prefix}{key}={json.dumps(body[key])} is not supported by this server; "
                             f"omit it or send {json.dumps(default)}")


def sampling_from_json(raw: Any, where: str = "sampling_params") -> SamplingParams:
    """SGLang-style `sampling_params` → SamplingParams, or BadRequest naming the offending field."""
    if raw is None:
        raw = {}
    _need(raw, isinstance(raw, dict), where, "an object")
    fields: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    _reject_unknown(raw, {**SAMPLING_FIELDS, **SGLANG_DEFAULTS}, prefix)
    _only_defaults(raw, SGLANG_DEFAULTS, prefix)
    for key, value in raw.items():
        if key in SGLANG_DEFAULTS or value is None:
            continue
        name, convert = SAMPLING_FIELDS[key]
        converted = convert(value, prefix + key)
        if name in fields and fields[name] != converted:
            raise BadRequest(f"{prefix}seed and {prefix}sampling_seed disagree; send one of them")
        fields[name] = converted
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise BadRequest(f"{where}: {exc}" if where else str(exc)) from None


def generate_response(result: GenerateResult, rid: str, return_logprob: bool,
                      token_text: Callable[[int], str] | None = None) -> dict[str, Any]:
    """One result in SGLang's /generate response shape."""
    finish: dict[str, Any] = {"type": result.finish_reason, "matched": result.matched_stop}
    if result.finish_reason == "length":
        finish["length"] = len(result.output_ids)
    meta: dict[str, Any] = {
        "id": rid, "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.output_ids),
        "finish_reason": finish, "weight_version": result.weight_version,
    }
    if result.routed_experts is not None:  # SGLang's wire format: base64 of int32 [tokens - 1, layers, top_k]
        meta["routed_experts"] = encode_routed_experts(result.routed_experts)
    if return_logprob:
        meta["output_token_logprobs"] = [
            [lp, tid, token_text(tid) if token_text else None]
            for lp, tid in zip(result.output_logprobs, result.output_ids)
        ]
    return {"text": result.text, "output_ids": list(result.output_ids), "meta_info": meta}


def encode_routed_experts(routes: Any) -> str:
    return base64.b64encode(routes.to(torch.int32).contiguous().numpy().tobytes()).decode("ascii")


async def _json_body(request: fastapi.Request, empty_ok: bool = False) -> dict[str, Any]:
    if empty_ok and not await request.body():
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    return _need(body, isinstance(body, dict), "request body", "a JSON object")


def create_app(engine: ReferenceEngine) -> fastapi.FastAPI:
    """A FastAPI app serving `engine` over SGLang's native routes and /v1/chat/completions."""
    app = fastapi.FastAPI(title="agentbench-npu engine server")
    tokenizer = engine.tokenizer
    vocab = int(engine.model.config.vocab_size)
    context = getattr(engine.model.config, "max_position_embeddings", None)
    served_name = engine.model_path or engine.name

    async def error(_: fastapi.Request, exc: Exception) -> JSONResponse:  # OpenAI's error shape, one line
        status, kind = (400, "invalid_request_error") if isinstance(exc, BadRequest) else (500, "internal_error")
        message = str(exc) if status == 400 else one_line(exc)
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    # separate registrations: Starlette logs a traceback for what reaches its catch-all handler
    app.add_exception_handler(BadRequest, error)
    app.add_exception_handler(Exception, error)

    def check_prompt(ids: Any, path: str, max_new_tokens: int) -> tuple[int, ...]:
        ok = isinstance(ids, list) and all(_is_int(i) and 0 <= i < vocab for i in ids)
        _need(ids, ok, path, f"a list of token ids in [0, {vocab})")
        if not ids:
            raise BadRequest(f"{path} is empty; every request needs at least one input token")
        if context is not None and len(ids) + max_new_tokens > context:
            raise BadRequest(f"{path}: {len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the "
                             f"model's context of {context}; shorten the prompt or lower the token limit")
        return tuple(ids)

    def encode(text: Any, path: str, add_special_tokens: bool = True) -> list[int]:
        _need(text, isinstance(text, str), path, "a string")
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    @app.post("/generate")
    async def generate(request: fastapi.Request) -> Any:
        if engine.memory_released:
            raise BadRequest("the engine's memory is released (/release_memory_occupation); "
                             "POST /resume_memory_occupation and update the weights first")
        body = await _json_body(request)
        _reject_unknown(body, GENERATE_FIELDS, "")
        _only_defaults(body, GENERATE_DEFAULTS, "")
        if (body.get("input_ids") is None) == (body.get("text") is None):
            raise BadRequest("send exactly one of input_ids or text")
        if body.get("input_ids") is not None:
            raw, field = body["input_ids"], "input_ids"
            batch = isinstance(raw, list) and bool(raw) and all(isinstance(x, list) for x in raw)
        else:
            raw, field = body["text"], "text"
            batch = isinstance(raw, list)
        items = raw if batch else [raw]
        if not items:
            raise BadRequest(f"{field} is an empty batch")
        raw_params = body.get("sampling_params")
        if isinstance(raw_params, list):
            if not batch or len(raw_params) != len(items):
                raise BadRequest(f"sampling_params is a list of {len(raw_params)} but the input has {len(items)} "
                                 "prompts; send one object or one per prompt")
            params = [sampling_from_json(p, f"sampling_params[{i}]") for i, p in enumerate(raw_params)]
        else:
            params = [sampling_from_json(raw_params)] * len(items)
        routed = _bool(body.get("return_routed_experts") or False, "return_routed_experts")
        if routed and engine.moe is None:
            raise BadRequest("return_routed_experts: the served model's routes cannot be captured (it is dense, or its "
                             "routers are of a kind this server cannot hook)")
        requests = []
        for i, (item, sp) in enumerate(zip(items, params)):
            path = f"{field}[{i}]" if batch else field
            ids = item if field == "input_ids" else encode(item, path)
            requests.append(GenerateRequest(check_prompt(ids, path, sp.max_new_tokens), sp, return_routed_experts=routed))
        rids = body.get("rid")
        rids = rids if isinstance(rids, list) and len(rids) == len(items) else [rids] * len(items)
        return_logprob = _bool(body.get("return_logprob") or False, "return_logprob")
        with_text = _bool(body.get("return_text_in_logprobs") or False, "return_text_in_logprobs")
        results = await engine.generate(requests)
        token_text = (lambda tid: tokenizer.decode([tid])) if with_text else None
        out = [generate_response(r, str(rid or uuid.uuid4().hex), return_logprob, token_text)
               for r, rid in zip(results, rids)]
        return out if batch else out[0]

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if await engine.health() else 503)

    @app.get("/get_model_info")
    async def get_model_info() -> dict[str, Any]:
        info = await engine.model_info()
        return {**info, "model_path": engine.model_path, "tokenizer_path": engine.model_path,
                "weight_version": engine.weight_version, "is_generation": True}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: fastapi.Request) -> JSONResponse:
        body = await _json_body(request)
        path = body.get("model_path")
        _need(path, isinstance(path, str) and bool(path), "model_path", "a non-empty string")
        try:
            version = await engine.update_weights_from_disk(path)
        except Exception as exc:  # the caller gets why; the engine keeps serving the old weights
            return JSONResponse({"success": False, "message": f"cannot load weights from {path}: {one_line(exc)}",
                                 "weight_version": engine.weight_version}, status_code=400)
        return JSONResponse({"success": True, "message": f"loaded weights from {path}", "weight_version": version})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> dict[str, Any]:
        await engine.flush_cache()
        return {"success": True, "message": "cache flushed"}

    @app.get("/weights_checksum")
    async def weights_checksum() -> dict[str, Any]:
        return {"checksum": await engine.weights_checksum(), "weight_version": engine.weight_version}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "agentbench-npu"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request) -> dict[str, Any]:
        body = await _json_body(request)
        _reject_unknown(body, CHAT_FIELDS, "")
        if body.get("stream"):
            raise BadRequest("streaming is not supported by this server; send stream=false")
        messages = body.get("messages")
        ok = isinstance(messages, list) and bool(messages) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        _need(messages, ok, "messages", "a non-empty list of objects with a 'role'")
        tool_choice = body.get("tool_choice") or "auto"
        if tool_choice not in ("auto", "none"):
            raise BadRequest(f"tool_choice={json.dumps(tool_choice)} is not supported; send 'auto' or 'none'")
        tools = body.get("tools") if tool_choice == "auto" else None
        _need(tools, tools is None or isinstance(tools, list), "tools", "a list")
        try:
            prompt = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                                   tokenize=False)
        except Exception as exc:
            raise BadRequest(f"messages cannot be rendered with the chat template: {one_line(exc)}") from None
        ids = encode(prompt, "messages", add_special_tokens=False)
        token_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(token_field)
        if max_tokens is not None:
            _int(max_tokens, token_field)
        else:  # as SGLang does: whatever the context leaves
            max_tokens = (context - len(ids)) if context else SamplingParams().max_new_tokens
        n = 1 if body.get("n") is None else _int(body["n"], "n")
        if not 1 <= n <= 128:
            raise BadRequest(f"n must be in [1, 128], got {n}")
        seed = body.get("seed")
        base = sampling_from_json(
            {"max_new_tokens": max_tokens, "temperature": body.get("temperature"), "top_p": body.get("top_p"),
             "stop": body.get("stop"), "seed": seed, "frequency_penalty": body.get("frequency_penalty"),
             "presence_penalty": body.get("presence_penalty")}, "")
        check_prompt(ids, "messages", base.max_new_tokens)
        # one seed per choice, base + index, so choice i is reproducible on its own
        requests = [GenerateRequest(tuple(ids), base.replace(seed=None if seed is None else base.seed + i))
                    for i in range(n)]
        results = await engine.generate(requests)
        want_logprobs = _bool(body.get("logprobs") or False, "logprobs")
        choices = [openai_choice(i, r, tokenizer, parse_tools=tools is not None, logprobs=want_logprobs)
                   for i, r in enumerate(results)]
        completion = sum(len(r.output_ids) for r in results)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model") or served_name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                          "total_tokens": len(ids) + completion}}

    add_rl_routes(app, engine, _json_body)
    return app


def serve(engine: ReferenceEngine, host: str = "127.0.0.1", port: int = 30000, log_level: str = "warning") -> None:
    """Serve `engine` in the foreground until interrupted."""
    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)


class ServerThread(AppThread):
    """The engine server on a background thread, for tests and benchmarks.

    `port=0` picks a free port; entering returns once `/health` answers, and `.url` is the base URL.
    """

    def __init__(self, engine: ReferenceEngine, host: str = "127.0.0.1", port: int = 0, **options: Any):
        super().__init__(lambda: create_app(engine), "engine server", host, port, **options)
        self.engine = engine
