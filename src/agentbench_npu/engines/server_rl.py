"""The engine server's RL control routes, as SGLang names them: memory release/resume for colocated training and
weight updates over a process group (`/init_weights_update_group`, `/update_weights_from_distributed`,
`/destroy_weights_update_group`).

SGLang's distributed update: the trainer opens a group with itself at rank 0 and the engine at `rank_offset`,
then for each update sends the list of (names, dtypes, shapes) here while it broadcasts every tensor from rank 0,
one broadcast per tensor, in that order. This server speaks it over gloo (the CPU backend), so the same client and
trainer code is tested here that drives a real SGLang server over nccl or hccl.
"""

from __future__ import annotations

import asyncio
from typing import Any

import fastapi
from fastapi.responses import JSONResponse

from ..errors import one_line
from ..sync.distributed import BucketBuffers, open_group, receive_weights
from .reference import ReferenceEngine

DTYPES = ("float32", "bfloat16", "float16")


def _fail(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=status)


def add_rl_routes(app: fastapi.FastAPI, engine: ReferenceEngine, json_body: Any) -> None:
    groups: dict[str, Any] = {}

    @app.post("/release_memory_occupation")
    async def release_memory_occupation(request: fastapi.Request) -> dict[str, Any]:
        await json_body(request, empty_ok=True)  # SGLang's optional `tags`: weights and KV cache go together here
        await asyncio.to_thread(engine.release_memory_occupation)
        return {"success": True, "message": "weights' memory released"}

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation(request: fastapi.Request) -> dict[str, Any]:
        await json_body(request, empty_ok=True)
        await asyncio.to_thread(engine.resume_memory_occupation)
        return {"success": True, "message": "memory resumed; the weights are uninitialised until the next update"}

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: fastapi.Request) -> JSONResponse:
        body = await json_body(request)
        try:
            host, port = str(body["master_address"]), int(body["master_port"])
            rank, world = int(body["rank_offset"]), int(body["world_size"])
        except (KeyError, TypeError, ValueError) as exc:
            return _fail(f"init_weights_update_group needs master_address, master_port, rank_offset and "
                         f"world_size: {one_line(exc)}")
        name, backend = str(body.get("group_name", "weight_update_group")), str(body.get("backend", "nccl"))
        if backend != "gloo":
            return _fail(f"backend {backend!r}: this server's process groups are gloo (CPU tensors); a real SGLang "
                         "server on a GPU or NPU takes nccl or hccl")
        if not 0 < rank < world:
            return _fail(f"rank_offset {rank} must be in [1, world_size={world}): rank 0 is the trainer")
        if name in groups:
            return _fail(f"a weight update group named {name!r} exists; destroy it first")
        try:  # blocks until every rank has joined, as SGLang's does
            groups[name] = await asyncio.to_thread(open_group, host, port, rank=rank, world_size=world)
        except Exception as exc:
            return _fail(f"cannot join the weight update group at {host}:{port}: {one_line(exc)}", 500)
        return JSONResponse({"success": True, "message": f"joined {name!r} as rank {rank} of {world}"})

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: fastapi.Request) -> JSONResponse:
        body = await json_body(request)
        name = str(body.get("group_name", "weight_update_group"))
        if name not in groups:
            return _fail(f"no weight update group named {name!r}; call /init_weights_update_group first")
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        lists = all(isinstance(x, list) for x in (names, dtypes, shapes))
        if not lists or not names or not len(names) == len(dtypes) == len(shapes):
            return _fail("names, dtypes and shapes must be non-empty lists of equal length")
        if bad := [d for d in dtypes if d not in DTYPES]:
            return _fail(f"dtypes: {bad[0]!r} is not one of {', '.join(DTYPES)}")
        specs = [(str(n), tuple(int(x) for x in s), str(d)) for n, d, s in zip(names, dtypes, shapes)]
        buffers = BucketBuffers(specs, 0)  # one tensor per broadcast, in the order given: SGLang's protocol

        label = body.get("weight_version")  # SGLang's is a label; ours counts unless given an integer one
        version = int(label) if isinstance(label, int) or (isinstance(label, str) and label.isdigit()) else None

        def receive_and_load() -> int:
            received = receive_weights(groups[name], buffers)  # every broadcast is consumed before loading
            return engine.update_weights_from_tensors(received, version=version)

        try:
            version = await asyncio.to_thread(receive_and_load)
        except Exception as exc:
            return _fail(f"weight update over {name!r} failed: {one_line(exc)}", 500)
        return JSONResponse({"success": True, "message": f"updated {len(specs)} tensors",
                             "weight_version": version})

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: fastapi.Request) -> JSONResponse:
        body = await json_body(request, empty_ok=True)
        name = str(body.get("group_name", "weight_update_group"))
        if groups.pop(name, None) is None:
            return _fail(f"no weight update group named {name!r}")
        return JSONResponse({"success": True, "message": f"left {name!r}"})
