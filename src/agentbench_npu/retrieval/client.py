"""The agent side of retrieval: ask a `/retrieve` server, and show the passages the way Search-R1 does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from ..errors import UserError, one_line


@dataclass(frozen=True)
class SearchClient:
    """A retrieval server at `url` (http://host:port); async calls open a connection per call, so one client
    serves every event loop of a run."""

    url: str
    timeout: float = 30.0

    def __post_init__(self) -> None:
        # Search-R1 recipes give the endpoint itself (…/retrieve); keep the base
        object.__setattr__(self, "url", self.url.rstrip("/").removesuffix("/retrieve"))

    def check(self) -> dict[str, Any]:
        """The server's /health (or, for Search-R1's own server, which has none, one probe of /retrieve), or a
        UserError saying it cannot be reached."""
        try:
            response = httpx.get(f"{self.url}/health", timeout=5.0)
            if response.status_code == 404:
                probe = httpx.post(f"{self.url}/retrieve", json={"queries": ["test"], "topk": 1}, timeout=self.timeout)
                probe.raise_for_status()
                if not isinstance(probe.json().get("result"), list):
                    raise ValueError("/retrieve answered without a 'result' list")
                return {"status": "ok", "health": "none: /retrieve answered a probe"}
            response.raise_for_status()
            body = response.json()
            return body if isinstance(body, dict) else {"health": body}
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise UserError(f"retrieval server {self.url} does not answer /health ({one_line(exc)}); start one with "
                            "`agentbench-npu search-server --corpus FILE`, or give the right URL") from None

    async def retrieve(self, queries: Sequence[str], topk: int) -> list[list[dict[str, Any]]]:
        """Documents per query, best first, as the server returns them (Search-R1's client payload)."""
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            response = await client.post(f"{self.url}/retrieve",
                                         json={"queries": list(queries), "topk": topk, "return_scores": True})
        if response.status_code != 200:
            raise RuntimeError(f"retrieval server {self.url} answered {response.status_code}: {response.text[:200]}")
        return [[item["document"] for item in row] for row in response.json()["result"]]


def passages(documents: Sequence[dict[str, Any]], max_chars: int = 0) -> str:
    """`Doc 1(Title: "t") text` lines, Search-R1's rendering of retrieved documents (the title line as it is,
    quotes included); `max_chars` cuts each text."""
    lines = []
    for number, doc in enumerate(documents, start=1):
        title, _, text = str(doc.get("contents", "")).partition("\n")
        if max_chars and len(text) > max_chars:
            text = text[:max_chars] + "..."
        lines.append(f"Doc {number}(Title: {title}) {text}")
    return "\n".join(lines)
