"""The shipped retail domain, and τ-bench-style task files (the shipped splits or a team's own).

A task file is a JSON array, JSONL or parquet of objects:

    {"id": "...", "user_id": "...", "instruction": "what the simulated user wants (for an LLM user)",
     "actions": [{"name": "cancel_pending_order", "kwargs": {"order_id": "#W1004", "reason": "..."}}, ...],
     "outputs": ["words the agent must say"], "opening": "the scripted user's first message (optional)"}

`arguments` is read as a synonym of `kwargs` (τ²-bench's spelling). Every task is checked when the run is set
up: unknown fields are ignored, but a missing field, an action on an unknown tool, arguments its schema refuses,
or gold actions that do not all succeed on the initial database fail with the row's file:line.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from agentbench_npu.datasets import read_rows
from agentbench_npu.errors import UserError
from agentbench_npu.types import Task

from .domain import OK, Domain, check_arguments
from .retail import TOOLS


def _data(name: str) -> Path:
    with resources.as_file(resources.files(__package__).joinpath("data", "retail", name)) as path:
        return Path(path)


@lru_cache(maxsize=1)
def retail_domain() -> Domain:
    return Domain("retail", json.loads(_data("db.json").read_text(encoding="utf-8")),
                  _data("policy.md").read_text(encoding="utf-8"), {t.name: t for t in TOOLS})


def shipped_tasks(split: str) -> Path:
    return _data(f"tasks_{split}.json")


def load_tasks(path: str | Path, domain: Domain, option: str = "task.tasks") -> list[Task]:
    tasks: list[Task] = []
    seen: set[str] = set()
    for where, row in read_rows(str(path), option, "leave it empty for the shipped tasks",
                                "agentbench-npu-tau-bench[parquet]"):
        task = _task(where, row, domain, len(tasks))
        if task.id in seen:
            raise UserError(f"{where}: task id '{task.id}' appears twice; ids name rows in the report")
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise UserError(f"{option} '{path}' holds no tasks")
    return tasks


def _task(where: str, row: Any, domain: Domain, index: int) -> Task:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with user_id, instruction and actions")
    missing = [k for k in ("user_id", "instruction", "actions") if k not in row]
    if missing:
        raise UserError(f"{where}: missing field {', '.join(repr(m) for m in missing)}")
    if not isinstance(row["instruction"], str) or not row["instruction"].strip():
        raise UserError(f"{where}: 'instruction' must be a non-empty string")
    if not isinstance(row["user_id"], str) or row["user_id"] not in domain.data["users"]:
        raise UserError(f"{where}: user_id '{row['user_id']}' is not a user of the {domain.name} database")
    outputs = row.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise UserError(f"{where}: 'outputs' must be a list of strings")
    if any("," in o for o in outputs):
        raise UserError(f"{where}: an output holds a comma, which never matches: the agent's messages are compared "
                        "with commas removed (τ-bench's rule); write it without")
    if not isinstance(row["actions"], list):
        raise UserError(f"{where}: 'actions' must be a list of {{name, kwargs}} objects")
    actions = []
    db = domain.fresh_db()
    for n, action in enumerate(row["actions"]):
        field = f"{where}: actions[{n}]"
        if not isinstance(action, dict) or not isinstance(action.get("name"), str):
            raise UserError(f"{field}: expected an object with a 'name' and 'kwargs'")
        kwargs = action.get("kwargs", action.get("arguments", {}))
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError:
                raise UserError(f"{field}: 'kwargs' is a string that is not JSON") from None
        if isinstance(kwargs, dict):  # parquet structs carry every key seen in the column, absent ones as None
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
        tool = domain.tools.get(action["name"])
        if tool is None:
            raise UserError(f"{field}: unknown tool '{action['name']}'; the {domain.name} tools are "
                            f"{', '.join(domain.tools)}")
        problem = check_arguments(tool, kwargs)
        if problem:
            raise UserError(f"{field}: {problem}")
        if actions and domain.tools[actions[-1]["name"]].terminates:
            raise UserError(f"{field}: follows {actions[-1]['name']}, which ends the conversation; "
                            "put it last or drop what follows")
        result = domain.call(db, action["name"], kwargs)
        if result.status != OK:
            raise UserError(f"{field}: the gold action fails on the initial database ({result.output}); "
                            "a task's gold actions must all succeed")
        actions.append({"name": action["name"], "kwargs": kwargs})
    opening = row.get("opening")
    if opening is not None and not isinstance(opening, str):
        raise UserError(f"{where}: 'opening' must be a string")
    return Task(id=str(row.get("id", f"task-{index}")), prompt=opening or row["instruction"],
                label={"actions": actions, "outputs": outputs},
                metadata={"user_id": row["user_id"], "instruction": row["instruction"], "kind": row.get("kind", "")})
