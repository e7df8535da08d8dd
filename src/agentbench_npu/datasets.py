"""Loading task files: JSONL with `prompt` and `label` per line (the format slime-style recipes use)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .errors import UserError, one_line
from .types import Task


def load_jsonl_tasks(path: str | Path, prompt_key: str = "prompt", label_key: str = "label") -> list[Task]:
    """Every line a JSON object with a prompt (string or chat messages) and a label; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset '{path}' does not exist; set data.path to a JSONL file")
    tasks: list[Task] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object with '{prompt_key}' and '{label_key}'")
            missing = [k for k in (prompt_key, label_key) if k not in row]
            if missing:
                raise UserError(f"{where}: missing field {', '.join(repr(m) for m in missing)}")
            prompt = row[prompt_key]
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
                raise UserError(f"{where}: '{prompt_key}' must be a string or a list of chat messages")
            metadata = {k: v for k, v in row.items() if k not in (prompt_key, label_key)}
            tasks.append(Task(id=str(row.get("id", f"{path.stem}-{number}")), prompt=prompt,
                              label=row[label_key], metadata=metadata))
    if not tasks:
        raise UserError(f"dataset '{path}' has no tasks")
    return tasks


def take(tasks: list[Task], seed: int, cursor: int, count: int) -> list[Task]:
    """`count` tasks from position `cursor` of a per-epoch seeded shuffle (deterministic, resumable)."""
    out = []
    for position in range(cursor, cursor + count):
        epoch, index = divmod(position, len(tasks))
        order = list(range(len(tasks)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        out.append(tasks[order[index]])
    return out


def read_rows(path: str, option: str, fallback: str, parquet_extra: str) -> list[tuple[str, Any]]:
    """(where, row) for every row of a JSONL, JSON-array (`.json`) or parquet file, for a scenario's own loader.

    `where` is `file:line`, `file:item N` or `file:row N`, for errors that point at the row. `option` names the
    setting the path came from, `fallback` what to set instead, `parquet_extra` the pip install that brings pyarrow.
    """
    file = Path(path)
    if not path or not file.is_file():
        raise UserError(f"{option} '{path}' does not exist; give a JSONL or parquet file, or {fallback}")
    if file.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{option} '{path}' is parquet, which needs pyarrow: pip install '{parquet_extra}'") from None
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow's errors for a corrupt or non-parquet file vary by version
            raise UserError(f"{option} '{path}' is not a readable parquet file ({one_line(exc)})") from None
        return _non_empty([(f"{path}:row {n}", row) for n, row in enumerate(table.to_pylist(), start=1)],
                          option, path, fallback)
    try:
        return _non_empty(_json_rows(file, path), option, path, fallback)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _non_empty(rows: list[tuple[str, Any]], option: str, path: str, fallback: str) -> list[tuple[str, Any]]:
    if not rows:
        raise UserError(f"{option} '{path}' has no rows; {fallback}")
    return rows


def _json_rows(file: Path, path: str) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if file.suffix == ".json" and (text := file.read_text(encoding="utf-8")).lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        rows = [(f"{path}:item {n}", row) for n, row in enumerate(items, start=1)]
    else:
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{number}", json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return rows
