"""Retrieval as a scenario service: the runner starts a server over a corpus for the run, or checks an external one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..http_thread import AppThread
from .client import SearchClient
from .corpus import load_corpus
from .index import RETRIEVERS, open_searcher
from .server import MAX_TOPK, server_thread


class SearchService:
    """`with SearchService(...) as client:` a SearchClient for the run. With `url`, an external server (never
    stopped); otherwise a server on a free loopback port, stopped at exit. Construction validates the input (the
    external server answers /health; or the corpus reads and the retriever is known), so a runner fails before
    anything starts."""

    def __init__(self, *, url: str = "", corpus: str | Path = "", retriever: str = "bm25", index: str = "",
                 encoder: str = "", topk: int = 3):
        self.url = SearchClient(url).url if url else ""
        self.retriever, self.index, self.encoder, self.topk = retriever, index, encoder, topk
        self.corpus = str(corpus)
        self.info: dict[str, Any] = {}
        if not 1 <= int(topk) <= MAX_TOPK:
            raise UserError(f"task.topk must be from 1 to {MAX_TOPK}, got {topk}")
        if url:
            self.info = {"url": self.url, "external": True, **SearchClient(self.url).check()}
        else:
            if retriever not in RETRIEVERS:
                raise UserError(f"task.retriever '{retriever}' is unknown; choose one of {', '.join(RETRIEVERS)}")
            load_corpus(self.corpus)
            if retriever == "dense":  # a missing extra is bad input too: say so before anything starts
                from .dense import _faiss, default_model_dir

                _faiss()
                if not encoder:
                    default_model_dir()
                elif not (Path(encoder) / "config.json").is_file():
                    raise UserError(f"task.encoder '{encoder}' is not a model directory (no config.json)")
        self._server: AppThread | None = None

    def __enter__(self) -> SearchClient:
        if self.url:
            return SearchClient(self.url)
        searcher = open_searcher(self.corpus, self.retriever, self.index or None, self.encoder)
        self._server = server_thread(searcher, default_topk=self.topk, max_topk=MAX_TOPK)
        self._server.__enter__()
        self.info = {"url": self._server.url, "external": False, "retriever": searcher.kind,
                     "documents": len(searcher.corpus), "corpus": searcher.corpus.path}
        return SearchClient(self._server.url)

    def __exit__(self, *exc_info: Any) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.__exit__(*exc_info)

    def describe(self) -> dict[str, Any]:
        return dict(self.info)
