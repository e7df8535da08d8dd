"""BM25 over a corpus with bm25s: sparse scores in numpy, an index of a few MB per 100k documents."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence


class BM25Retriever:
    """Lower-cased word tokens, English stop words dropped, no stemming (none ships with bm25s)."""

    kind = "bm25"

    def __init__(self, model, tokenizer, documents: int):  # noqa: ANN001 (bm25s objects)
        self.model, self.tokenizer, self.documents = model, tokenizer, documents
        self._lock = threading.Lock()  # bm25s' tokenizer and scorer are not documented thread-safe

    @classmethod
    def build(cls, texts: Sequence[str]) -> BM25Retriever:
        import bm25s
        from bm25s.tokenization import Tokenizer

        tokenizer = Tokenizer(stopwords="en")
        ids = tokenizer.tokenize(list(texts), return_as="ids", show_progress=False)
        model = bm25s.BM25()
        model.index(ids, show_progress=False)
        return cls(model, tokenizer, len(texts))

    def save(self, directory: Path) -> None:
        self.model.save(str(directory), show_progress=False)
        self.tokenizer.save_vocab(str(directory))
        self.tokenizer.save_stopwords(str(directory))

    @classmethod
    def load(cls, directory: Path, documents: int) -> BM25Retriever:
        import bm25s
        from bm25s.tokenization import Tokenizer

        model = bm25s.BM25.load(str(directory), show_progress=False)
        tokenizer = Tokenizer(stopwords=[])
        tokenizer.load_vocab(str(directory))
        tokenizer.load_stopwords(str(directory))
        return cls(model, tokenizer, documents)

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[int]], list[list[float]]]:
        """The `k` best documents per query (indices into the corpus) and their scores, best first."""
        import numpy as np

        k = min(k, self.documents)
        docs, scores = [], []
        with self._lock:
            ids = self.tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
            known = self.model.unique_token_ids_set
            for tokens in ids:
                tokens = [t for t in tokens if t in known]  # as bm25s' retrieve does
                row = self.model.get_scores(tokens) if tokens else np.zeros(self.documents, dtype=np.float32)
                # not bm25s' argpartition(row, -k): on mostly-zero rows numpy's introselect degrades (1 ms at 10k
                # documents, 160 ms at 1M); selecting the k smallest of -row stays linear
                top = np.argpartition(-row, k - 1)[:k]
                top = top[np.argsort(-row[top], kind="stable")]
                docs.append(top.tolist())
                scores.append(row[top].tolist())
        return docs, scores
