"""Indexes on disk and the searcher the server answers from.

An index directory holds the retriever's files and `manifest.json` (retriever, corpus digest, documents,
encoder), so a server reloads it in seconds instead of re-encoding, and refuses an index of another corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError, one_line
from ..paths import atomic_directory
from .bm25 import BM25Retriever
from .corpus import Corpus, load_corpus

RETRIEVERS = ("bm25", "dense")
MANIFEST = "manifest.json"


@dataclass
class Searcher:
    """A corpus and a retriever over it: queries in, the corpus records (and scores) out."""

    corpus: Corpus
    retriever: Any

    @property
    def kind(self) -> str:
        return self.retriever.kind

    def search(self, queries: list[str], k: int) -> list[list[tuple[dict[str, Any], float]]]:
        ids, scores = self.retriever.search(queries, k)
        records = self.corpus.records
        # faiss pads with -1 when a corpus holds fewer than k documents
        return [[(records[i], float(s)) for i, s in zip(row, row_scores) if i >= 0]
                for row, row_scores in zip(ids, scores)]


def _build(corpus: Corpus, kind: str, model: str, prefixes: tuple[str, str]) -> Any:
    if kind == "bm25":
        return BM25Retriever.build(corpus.texts())
    if kind == "dense":
        from .dense import DenseRetriever

        return DenseRetriever.build(corpus.texts(), model_dir=model, query_prefix=prefixes[0],
                                    passage_prefix=prefixes[1])
    raise UserError(f"unknown retriever '{kind}'; choose one of {', '.join(RETRIEVERS)}")


def _check_replaceable(path: Path) -> None:
    """An index may go where nothing is, or replace an index; never a file or someone's directory."""
    if path.exists() and not path.is_dir():
        raise UserError(f"index '{path}' is a file; give a directory")
    if path.is_dir() and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise UserError(f"index directory '{path}' is not empty and holds no {MANIFEST}; "
                        "give an empty or new directory")


def build_index(corpus_path: str | Path, kind: str, directory: str | Path, model: str = "",
                prefixes: tuple[str, str] = ("", "")) -> Searcher:
    """Build and persist an index, replacing whatever index `directory` held only once the new one is complete.

    `model` is the dense encoder's directory; `prefixes` (query, passage) are what e5-style encoders expect,
    e.g. ("query: ", "passage: ")."""
    _check_replaceable(Path(directory).absolute())
    corpus = load_corpus(corpus_path)
    retriever = _build(corpus, kind, model, prefixes)
    with atomic_directory(Path(directory).absolute()) as staging:
        retriever.save(staging)
        (staging / MANIFEST).write_text(json.dumps({
            "retriever": kind, "corpus": corpus.path, "corpus_digest": corpus.digest, "documents": len(corpus),
            "encoder": getattr(getattr(retriever, "encoder", None), "model_dir", None)}, indent=2))
    return Searcher(corpus, retriever)


def open_searcher(corpus_path: str | Path, kind: str = "bm25", directory: str | Path | None = None,
                  model: str = "", on_build: Callable[[], None] | None = None,
                  prefixes: tuple[str, str] = ("", "")) -> Searcher:
    """Load the index in `directory` if it is there (and of this corpus), else build it (and save it there)."""
    if kind not in RETRIEVERS:
        raise UserError(f"unknown retriever '{kind}'; choose one of {', '.join(RETRIEVERS)}")
    corpus = load_corpus(corpus_path)
    if directory is None:
        return Searcher(corpus, _build(corpus, kind, model, prefixes))
    path = Path(directory)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        _check_replaceable(path)
        if on_build is not None:
            on_build()
        return build_index(corpus_path, kind, path, model, prefixes)
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"index '{path}' has an unreadable {MANIFEST} ({one_line(exc)}); rebuild it: agentbench-npu "
                        f"search-index --corpus {corpus.path} --index {path} --retriever {kind}") from None
    if manifest.get("retriever") != kind:
        raise UserError(f"index '{path}' is a {manifest.get('retriever')} index; pass --retriever "
                        f"{manifest.get('retriever')}, another --index, or rebuild it: agentbench-npu search-index "
                        f"--corpus {corpus.path} --index {path} --retriever {kind}")
    if manifest.get("corpus_digest") != corpus.digest:
        raise UserError(f"index '{path}' was built from another corpus ({manifest.get('corpus')}); rebuild it: "
                        f"agentbench-npu search-index --corpus {corpus.path} --index {path} --retriever {kind}")
    if model and Path(str(manifest.get("encoder"))).resolve() != Path(model).resolve():
        raise UserError(f"index '{path}' was encoded by {manifest.get('encoder')}, not {model}; drop --encoder to "
                        "use it, or rebuild it with agentbench-npu search-index")
    if kind == "bm25":
        return Searcher(corpus, BM25Retriever.load(path, len(corpus)))
    from .dense import DenseRetriever

    return Searcher(corpus, DenseRetriever.load(path, len(corpus)))
