"""Question answering data and its reward: SQuAD-style exact match, and NQ / HotpotQA-style files.

Search-R1 scores a rollout 1 when its answer equals any golden answer after normalisation, so a file's
answers always become a list of strings (`Task.label`). Rows may be FlashRAG/Search-R1 JSONL, Search-R1's
parquet (chat `prompt`, `reward_model.ground_truth.target`), HotpotQA (`_id`, `answer`) or plain
`{"question", "answer"}`; errors name file:line (or file:row) and the field.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from agentbench_npu.datasets import read_rows
from agentbench_npu.errors import UserError
from agentbench_npu.types import Task

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SHIPPED = "set task.qa=... or task.qa=\"\" for the shipped knowledge base"


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's order)."""
    s = s.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str | None, golden: Sequence[str]) -> bool:
    """True iff the normalised prediction equals a normalised golden answer.

    An empty prediction never matches, so "" or "the" cannot collect reward from a blank answer.
    """
    if prediction is None:
        return False
    guess = normalize_answer(prediction)
    if not guess:
        return False
    answers = [golden] if isinstance(golden, str) else golden
    return any(guess == normalize_answer(str(answer)) for answer in answers)


def golden_answers(label: Any) -> list[str]:
    """A string, a list of strings or numbers, or Search-R1's `{"target": [...]}`, as a list of strings."""
    if isinstance(label, dict):
        if "target" not in label:
            raise ValueError(f"is a mapping without 'target' (keys: {', '.join(map(str, label)) or 'none'})")
        label = label["target"]
    items = [label] if isinstance(label, (str, int, float)) else label
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"must be a string or a list of strings, not {type(label).__name__}")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"holds {item!r}, which is not a string or a number")
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if str(item).strip():
            out.append(str(item))
    if not out:
        raise ValueError("has no non-empty answer")
    return out


@lru_cache(maxsize=4)
def load_qa(path: str) -> tuple[Task, ...]:
    """Every row of a JSONL, JSON-array (HotpotQA's own files) or parquet file as a Task."""
    rows = read_rows(path, "task.qa", _SHIPPED, "agentbench-npu-search-r1[parquet]")
    return tuple(_task(where, row, f"{Path(path).stem}-{index}") for index, (where, row) in enumerate(rows))


def _task(where: str, row: Any, default_id: str) -> Task:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with 'question' and 'golden_answers' (or 'answer')")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        prompt = row.get("prompt")
        if isinstance(prompt, list):  # chat messages: the user's last turn is the question
            users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            question = users[-1] if users else None
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{where}: no question; give 'question' as a string, or 'prompt' as chat messages "
                            "with a user turn")
    for field in ("golden_answers", "answer"):
        if row.get(field) is not None:
            label, name = row[field], field
            break
    else:
        reward_model = row.get("reward_model")
        label = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        name = "reward_model.ground_truth"
        if label is None:
            raise UserError(f"{where}: no answer; give 'golden_answers' (a list), 'answer', "
                            "or 'reward_model.ground_truth.target'")
    try:
        answers = golden_answers(label)
    except ValueError as exc:
        raise UserError(f"{where}: '{name}' {exc}; give a string or a list of strings") from None
    task_id = row.get("id", row.get("_id"))
    metadata = {"data_source": row["data_source"]} if row.get("data_source") is not None else {}
    return Task(id=str(default_id if task_id is None else task_id), prompt=question, label=answers, metadata=metadata)
