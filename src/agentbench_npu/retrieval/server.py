"""The retrieval server: Search-R1's `POST /retrieve` and `GET /health`, over any Searcher.

Request  {"queries": ["..."], "topk": 3, "return_scores": false}    (topk null or absent: the server's default)
Response {"result": [[doc, ...], ...]}                                one list per query, best first
         {"result": [[{"document": doc, "score": s}, ...], ...]}    with return_scores
`doc` is the corpus record as the file gives it ({"id", "contents", ...}). Bad requests get a 4xx whose
`detail` is one line naming the field; the server stays up. A blank query is answered (with zero scores
under BM25), as Search-R1's server answers it: its trainer sends every rollout's query in one request, and a
policy's empty `<search></search>` must not fail the whole batch. Other fields are ignored, as Search-R1's
server ignores them.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..http_thread import AppThread
from .index import Searcher

MAX_QUERIES = 4096
MAX_QUERY_CHARS = 8192
MAX_TOPK = 1000


class BadRequest(ValueError):
    """A request we refuse, with the one-line reason sent back as `detail`."""


def parse_request(payload: Any, default_topk: int, max_topk: int) -> tuple[list[str], int, bool]:
    """(queries, topk, return_scores) of a /retrieve body, or BadRequest naming the field at fault."""
    if not isinstance(payload, dict):
        raise BadRequest('the body must be a JSON object: {"queries": [...], "topk": 3, "return_scores": false}')
    queries = payload.get("queries")
    if not isinstance(queries, list) or not queries:
        raise BadRequest("'queries' must be a non-empty list of strings")
    if len(queries) > MAX_QUERIES:
        raise BadRequest(f"'queries' holds {len(queries)} queries; send at most {MAX_QUERIES} per request")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise BadRequest(f"queries[{i}] must be a string, not {type(query).__name__}")
        if len(query) > MAX_QUERY_CHARS:
            raise BadRequest(f"queries[{i}] has {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
    topk = payload.get("topk")
    if topk is None:
        topk = default_topk
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= max_topk:
        raise BadRequest(f"'topk' must be an integer from 1 to {max_topk}, got {json.dumps(topk)}")
    scores = payload.get("return_scores", False)
    if not isinstance(scores, bool):
        raise BadRequest(f"'return_scores' must be true or false, got {json.dumps(scores)}")
    return queries, topk, scores


def make_app(searcher: Searcher, *, default_topk: int = 3, max_topk: int = MAX_TOPK) -> FastAPI:
    app = FastAPI(title="agentbench-npu retrieval", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "retriever": searcher.kind, "documents": len(searcher.corpus),
                "default_topk": default_topk}

    @app.post("/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return JSONResponse({"detail": f"the body is not valid JSON ({exc})"}, status_code=400)
        except RecursionError:
            return JSONResponse({"detail": "the body nests JSON too deeply"}, status_code=400)
        try:
            queries, topk, with_scores = parse_request(payload, default_topk, max_topk)
        except BadRequest as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        hits = await run_in_threadpool(searcher.search, queries, topk)
        if with_scores:
            result: list[Any] = [[{"document": doc, "score": score} for doc, score in row] for row in hits]
        else:
            result = [[doc for doc, _ in row] for row in hits]
        return JSONResponse({"result": result})

    return app


def server_thread(searcher: Searcher, host: str = "127.0.0.1", port: int = 0, *, default_topk: int = 3,
                  max_topk: int = MAX_TOPK) -> AppThread:
    """The server on a background thread; `with server_thread(s) as srv: srv.url` (port 0 picks a free one)."""
    return AppThread(lambda: make_app(searcher, default_topk=default_topk, max_topk=max_topk),
                     "retrieval server", host, port)
