"""ReTool's problems: generated from the seed (arithmetic and word problems), or a DAPO-Math-style file.

Generated problems are hard for a tiny policy to do in its head (three two-digit operands) and trivial
with the interpreter, so reward follows tool use. A dataset row is either `{"prompt", "label"}` or the
verl/slime layout `{"prompt": [chat messages], "reward_model": {"ground_truth": ...}}`.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any, Mapping

from agentbench_npu.datasets import read_rows, take
from agentbench_npu.errors import UserError
from agentbench_npu.types import Task

# Worded with the tiny tokenizer's vocabulary in mind, so that a question stays ~20 tokens.
WORD_PROBLEMS = (
    ("An order has {a} items at a price of {c}, plus {b}. What is the total?", "{a} * {c} + {b}"),
    ("The sum of {a} and {b}, minus {c}: what is the result?", "{a} + {b} - {c}"),
    ("The difference of {a} and {b}, times {c}: what is the result?", "({a} - {b}) * {c}"),
    ("First {a} times {c}, then minus {b}. What is the value?", "{a} * {c} - {b}"),
)


def generate(options: Mapping[str, Any], rng: random.Random) -> tuple[str, str, int]:
    """(question, the Python expression that answers it, its value)."""
    hi = int(options["max_operand"])
    if rng.random() < float(options["word_problem_fraction"]):
        template, expr = rng.choice(WORD_PROBLEMS)
        values = {"a": rng.randint(10, hi), "b": rng.randint(2, hi), "c": rng.randint(2, 9)}
        expr = expr.format(**values)
        return template.format(**values), expr, eval(expr)  # our own template, never model output
    a, b, c = rng.randint(10, hi), rng.randint(10, hi), rng.randint(2, 9)
    op1, op2 = rng.choice("+-*"), rng.choice("+-")
    expr = f"{a} {op1} {b} {op2} {c}"
    return f"What is {expr}?", expr, eval(expr)


def generated_tasks(options: Mapping[str, Any], seed: int, cursor: int, count: int) -> list[Task]:
    out = []
    for index in range(cursor, cursor + count):
        question, expr, value = generate(options, random.Random(f"retool:{seed}:{index}"))
        out.append(Task(id=f"retool-{index}", prompt=question, label=value, metadata={"expr": expr}))
    return out


def dataset_tasks(path: str, seed: int, cursor: int, count: int) -> list[Task]:
    return take(list(load_dataset(path)), seed, cursor, count)


@lru_cache(maxsize=4)
def load_dataset(path: str) -> tuple[Task, ...]:
    """Every row of a JSONL or parquet file as a Task; errors name file:line (or file:row) and the field."""
    rows = read_rows(path, "task.dataset", 'set task.dataset=""', "agentbench-npu-retool[parquet]")
    return tuple(_task(where, row, index) for index, (where, row) in enumerate(rows))


def _task(where: str, row: Any, index: int) -> Task:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with 'prompt' and 'label' or 'reward_model.ground_truth'")
    prompt = row.get("prompt")
    if isinstance(prompt, list):  # chat messages: the user's last turn is the question
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: 'prompt' must be a string or chat messages with a user turn")
    label = row.get("label")
    if label is None and isinstance(row.get("reward_model"), dict):
        label = row["reward_model"].get("ground_truth")
    if label is None:
        raise UserError(f"{where}: no answer; give 'label' or 'reward_model.ground_truth'")
    return Task(id=str(row.get("id", f"row-{index}")), prompt=prompt, label=label)
