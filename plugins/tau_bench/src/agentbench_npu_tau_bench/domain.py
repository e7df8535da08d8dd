"""A τ-bench domain: a JSON database, a policy text, and tools that read or change the database.

Tools are Python functions `fn(db, **arguments) -> str` with an OpenAI function schema. `Domain.call` is the
one way an agent (or a gold replay) runs a tool: it checks the call against the schema, runs the function on
the episode's own copy of the database (all of its changes or none), and turns every failure into an `Error: ...` message the agent reads,
classified so reports can count them (unknown tool, bad arguments, refused by a domain rule, raised).

The database's identity is a sha256 of canonical JSON (sorted keys, fixed separators), so two databases with
the same content hash equal whatever order their edits happened in; `db_diff` names the paths that differ,
which is what a failed task's report row shows instead of two opaque hashes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# outcomes of a call, as counted in reports
OK, UNKNOWN_TOOL, MALFORMED, BAD_ARGUMENTS, REFUSED, RAISED = (
    "ok", "unknown_tool", "malformed", "bad_arguments", "refused", "raised")
ERROR_KINDS = (UNKNOWN_TOOL, MALFORMED, BAD_ARGUMENTS, REFUSED, RAISED)


class ToolError(Exception):
    """A tool refuses a call by the domain's rules (order not pending, item unavailable, ...)."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, dict[str, Any]]  # name -> JSON schema of the argument
    required: tuple[str, ...]
    fn: Callable[..., str]
    writes: bool = False  # changes the database
    terminates: bool = False  # ends the episode (a transfer to a human)

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI function schema the chat template renders."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": self.parameters, "required": list(self.required)}}}


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
               "object": dict}


def check_arguments(tool: Tool, arguments: Any) -> str | None:
    """Why `arguments` do not fit the tool's schema, or None when they do."""
    if not isinstance(arguments, dict):
        return f"{tool.name}: arguments must be a JSON object"
    missing = [name for name in tool.required if name not in arguments]
    if missing:
        return f"{tool.name}: missing argument {', '.join(repr(m) for m in missing)}"
    unknown = [name for name in arguments if name not in tool.parameters]
    if unknown:
        return (f"{tool.name}: unknown argument {', '.join(repr(u) for u in unknown)}; "
                f"it takes {', '.join(tool.parameters) or 'none'}")
    for name, value in arguments.items():
        problem = _check_value(value, tool.parameters[name])
        if problem:
            return f"{tool.name}: argument '{name}' {problem}"
    return None


def _check_value(value: Any, schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    expected = _JSON_TYPES.get(kind)
    if expected is not None and (not isinstance(value, expected) or (kind != "boolean" and isinstance(value, bool))):
        return f"must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {json.dumps(value)[:40]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"must be one of {', '.join(json.dumps(v) for v in schema['enum'])}"
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            problem = _check_value(item, schema["items"])
            if problem:
                return f"item {i} {problem}"
    return None


@dataclass(frozen=True)
class CallResult:
    output: str
    status: str  # OK or one of ERROR_KINDS
    terminates: bool = False


@dataclass
class Domain:
    name: str
    data: dict[str, Any]
    policy: str
    tools: dict[str, Tool] = field(default_factory=dict)

    def fresh_db(self) -> dict[str, Any]:
        """A copy of the initial database that an episode may change freely."""
        return copy.deepcopy(self.data)

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema for tool in self.tools.values()]

    def call(self, db: dict[str, Any], name: Any, arguments: Any) -> CallResult:
        """Run one tool call on `db`; every failure comes back as an `Error: ...` output with its kind."""
        tool = self.tools.get(name) if isinstance(name, str) else None
        if tool is None:
            return CallResult(f"Error: unknown tool {json.dumps(name)}; the tools are {', '.join(self.tools)}",
                              UNKNOWN_TOOL)
        problem = check_arguments(tool, arguments)
        if problem:
            return CallResult(f"Error: {problem}", BAD_ARGUMENTS)
        scratch = copy.deepcopy(db)  # a call changes the database whole or not at all
        try:
            output = tool.fn(scratch, **arguments)
        except ToolError as exc:
            return CallResult(f"Error: {exc}", REFUSED)
        except Exception as exc:  # a tool bug must not end the episode: the agent reads it like any error
            return CallResult(f"Error: {tool.name} failed: {type(exc).__name__}: {exc}", RAISED)
        db.clear()
        db.update(scratch)
        return CallResult(output, OK, tool.terminates)

    def replay(self, actions: list[Mapping[str, Any]]) -> dict[str, Any]:
        """The database after running `actions` ({name, kwargs}) on a fresh copy: a task's gold state."""
        db = self.fresh_db()
        for action in actions:
            self.call(db, action["name"], action["kwargs"])
        return db


def db_hash(db: Any) -> str:
    return hashlib.sha256(canonical(db).encode()).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def db_diff(a: Any, b: Any, path: str = "", limit: int = 5) -> list[str]:
    """Up to `limit` JSON paths where `a` and `b` differ (`orders.#W1003.status`, say)."""
    out: list[str] = []

    def walk(x: Any, y: Any, where: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                walk(x.get(key, _MISSING), y.get(key, _MISSING), f"{where}.{key}" if where else str(key))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (p, q) in enumerate(zip(x, y)):
                walk(p, q, f"{where}[{i}]")
        elif x is _MISSING or y is _MISSING or canonical(x) != canonical(y):
            out.append(where or "(root)")

    walk(a, b, path)
    return out


_MISSING = object()
