"""The search agent: the policy calls a `search` tool in Qwen's tool-call format, as often as it needs.

A turn may hold several `<tool_call>{"name": "search", "arguments": {"query": ...}}</tool_call>`; their queries
go to the server in one request, and the results come back as one user turn of `<tool_response>` blocks —
the tokens Qwen's chat template renders for tool messages, appended as environment tokens. A turn without a
call is the final one; its `<answer>…</answer>` (or, lacking one, its whole text) is the answer.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from agentbench_npu.episode import Episode
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import Trajectory

from .protocol import final_answer
from agentbench_npu.retrieval.client import passages

TOOL_NAME = "search"
SEARCH_TOOL = {"type": "function", "function": {
    "name": TOOL_NAME, "description": "Search the knowledge base; returns the best matching documents.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}},
                   "required": ["query"]}}}
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_calls(text: str) -> list[str | Exception]:
    """Each tool call of a turn: its query, or an error to show the policy instead."""
    out: list[str | Exception] = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            out.append(ValueError("Error: a tool call must be JSON"))
            continue
        args = call.get("arguments") if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(call, dict) or call.get("name") != TOOL_NAME:
            out.append(ValueError(f"Error: unknown tool; the tool is {TOOL_NAME}"))
        elif not isinstance(args, dict) or not isinstance(args.get("query"), str) or not args["query"].strip():
            out.append(ValueError('Error: give the query as {"query": "..."}'))
        else:
            out.append(args["query"].strip())
    return out


def tool_turn(results: list[str]) -> str:
    """The user turn Qwen's template renders for consecutive tool messages, then the next assistant header."""
    blocks = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
    return f"\n<|im_start|>user\n{blocks}<|im_end|>\n<|im_start|>assistant\n"


def agent_answer(final_turn: str) -> str | None:
    tagged = final_answer(final_turn)
    if tagged is not None:
        return tagged
    return final_turn.strip() or None


async def run_agent_episode(ctx: RolloutContext, question: str, options: Mapping[str, Any]) -> Trajectory:
    search = ctx.services["search"]
    messages = ([{"role": "system", "content": options["instruction"]}] if options["instruction"] else [])
    messages.append({"role": "user", "content": question})
    episode = Episode.start(ctx, ctx.render(messages, tools=[SEARCH_TOOL]), options["max_response_tokens"])
    calls: list[str] = []
    queries: list[str] = []
    final = None
    episode.traj.status = "truncated"  # unless a final turn comes
    for turn in range(int(options["max_turns"]) + 1):  # the last turn may only answer
        sampled = await episode.policy_turn(ctx.sampling)
        if sampled is None:
            break
        result, turn_text = sampled
        if result.finish_reason != "stop":
            break
        parsed = parse_calls(turn_text)
        room_for_calls = int(options["max_tool_calls"]) - len(calls)
        if not parsed or room_for_calls <= 0 or turn == int(options["max_turns"]):
            final = agent_answer(TOOL_CALL.sub("", turn_text))
            episode.traj.status = "completed"
            break
        parsed = parsed[:room_for_calls]
        good = [p for p in parsed if isinstance(p, str)]
        found = iter(await search.retrieve(good, int(options["topk"])) if good else [])
        shown = [passages(next(found), int(options["passage_chars"])) if isinstance(p, str) else str(p) for p in parsed]
        calls += ["ok" if isinstance(p, str) else "malformed" for p in parsed]
        queries += good
        if not episode.observe(tool_turn(shown)):
            break
    return episode.finish(answer=final, tool_statuses=calls, queries=queries)
