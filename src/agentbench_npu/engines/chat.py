"""Chat completions as text: Qwen-style tool calls `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
and the OpenAI message shapes built from them.

Used by the OpenAI-compatible endpoint of our engine server, and by scenarios that read an agent's
actions out of a completion. A block that does not parse is left in the content untouched, so the
agent (and whoever reads the trajectory) sees exactly what the model wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..types import GenerateResult

TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function name and its arguments as a JSON object."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_openai(self, call_id: str | None = None) -> dict[str, Any]:
        """The call as an entry of an OpenAI `message.tool_calls` list (arguments as a JSON string)."""
        return {
            "id": call_id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


def parse_tool_call(body: str) -> ToolCall | None:
    """The call inside one `<tool_call>` block, or None when it is not a JSON object with a string `name`.

    `arguments` may be an object, a JSON string holding an object (some models double-encode), or absent.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=data["name"], arguments=arguments)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content outside well-formed tool-call blocks, the calls in order).

    Malformed blocks and an unterminated `<tool_call>` stay in the content verbatim. The content is
    stripped of surrounding whitespace.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in TOOL_CALL_BLOCK.finditer(text):
        call = parse_tool_call(match.group(1).strip())
        if call is None:
            continue  # stays in the content with the surrounding text
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def openai_choice(index: int, result: GenerateResult, tokenizer: Any, *, parse_tools: bool = True,
                  logprobs: bool = False) -> dict[str, Any]:
    """One entry of an OpenAI chat completion's `choices` for an engine result.

    With tool calls, `content` is the text outside the call blocks (None when that is empty) and a
    stop becomes finish_reason "tool_calls"; a truncated generation stays "length".
    """
    content, calls = parse_tool_calls(result.text) if parse_tools else (result.text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = [call.to_openai() for call in calls]
    token_logprobs = None
    if logprobs:
        tokens = [tokenizer.decode([tid]) for tid in result.output_ids]
        token_logprobs = {"content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
            for t, lp in zip(tokens, result.output_logprobs)
        ]}
    finish = "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason
    return {"index": index, "message": message, "logprobs": token_logprobs, "finish_reason": finish}
