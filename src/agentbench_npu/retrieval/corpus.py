"""A retrieval corpus in Search-R1's JSONL layout: one `{"id": ..., "contents": "\"Title\"\ntext"}` per line."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class Corpus:
    """The documents, exactly as the file gives them; `digest` ties an index to the file it was built from."""

    path: str
    records: tuple[dict[str, Any], ...]
    digest: str

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> list[str]:
        return [r["contents"] for r in self.records]


def load_corpus(path: str | Path) -> Corpus:
    """Every line a JSON object with a non-empty string `contents`; errors name file:line and what to fix."""
    file = Path(path).absolute()
    try:  # the cache is keyed on the file's identity too, so a file rewritten in place is read again
        stat = file.stat()
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None
    return _load(str(file), stamp)


@lru_cache(maxsize=2)
def _load(path: str, stamp: tuple[int, int, int] | None) -> Corpus:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"corpus '{path}' does not exist; give a JSONL file with one "
                        '{"id": ..., "contents": ...} per line')
    records: list[dict[str, Any]] = []
    digest = hashlib.sha256()
    with file.open("rb") as f:  # line by line: a wiki-sized file is never in memory twice
        for number, raw_line in enumerate(f, start=1):  # binary lines end at b"\n" only, not at U+2028
            digest.update(raw_line)
            record = _record(f"{path}:{number}", raw_line.decode("utf-8", errors="replace"), len(records))
            if record is not None:
                records.append(record)
    if not records:
        raise UserError(f"corpus '{path}' has no documents")
    return Corpus(path=path, records=tuple(records), digest=digest.hexdigest())


def _record(where: str, line: str, index: int) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with 'contents'")
    contents = row.get("contents")
    if contents is None and isinstance(row.get("text"), str):  # {"title", "text"}: the DPR / wiki layout
        contents = f'"{row.get("title", "")}"\n{row["text"]}'
        row = {**row, "contents": contents}
    if not isinstance(contents, str) or not contents.strip():
        raise UserError(f"{where}: 'contents' is missing or empty; every document needs text "
                        "(\"Title\"\\ntext, or 'title' and 'text')")
    row.setdefault("id", str(index))
    return row
