"""The ReTool agent loop: write code, run it in the sandbox, read the result, answer.

One assistant turn grows by appends. The policy's tokens are trainable; each tool result is appended as
`<interpreter>…</interpreter>` environment tokens (loss mask 0), exactly the tokens the policy then
conditions on, so nothing is re-rendered and nothing drifts between rollout and training.

Actions the policy may take in a turn:
  <tool_call>{"name": "code_interpreter", "arguments": {"code": "..."}}</tool_call>   (Qwen's tool format)
  ```python ... ```                                                                (a fenced block)
  anything else ends the episode; the last \\boxed{} in the response is the answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from agentbench_npu.episode import Episode
from agentbench_npu.sandbox.base import ExecResult
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import Trajectory

TOOL_NAME = "code_interpreter"
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
FENCED = re.compile(r"```(?:python|py)\s*\n(.*?)```", re.S)


@dataclass(frozen=True)
class Action:
    code: str | None  # None: the turn holds no tool call
    error: str = ""  # a malformed call, shown to the policy instead of running anything


def parse_action(text: str) -> Action:
    """The tool call a turn ends with, if any."""
    calls = TOOL_CALL.findall(text)
    if calls:
        body = calls[-1]
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return Action(code=body)  # a bare snippet inside the tags: lenient, as ReTool's parsers are
        if not isinstance(call, dict):
            return Action(None, "Error: a tool call must be a JSON object")
        if call.get("name") != TOOL_NAME:
            return Action(None, f"Error: unknown tool {call.get('name')!r}; the tool is {TOOL_NAME}")
        args = call.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return Action(None, "Error: arguments must be JSON")
        code = args.get("code") if isinstance(args, dict) else None
        if not isinstance(code, str) or not code.strip():
            return Action(None, "Error: no code in the tool call")
        return Action(code=code)
    fenced = FENCED.findall(text)
    if fenced:
        return Action(code=fenced[-1])
    return Action(code=None)


def observation(result: ExecResult, limit: int) -> str:
    """What the policy sees of an execution: stdout, or the error's last line, cut to `limit` chars."""
    if result.status == "ok":
        body = result.stdout.strip() or "(no output)"
    elif result.status == "error":
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        body = lines[-1] if lines else f"exit code {result.exit_code}"
    else:
        body = f"{result.status}: {result.detail}"
    if len(body) > limit:
        body = body[:limit] + "..."
    return f"\n<interpreter>\n{body}\n</interpreter>\n"


async def run_episode(ctx: RolloutContext, question: str, options: Mapping[str, Any]) -> Trajectory:
    """One ReTool episode; `traj.metadata` records tool calls and their sandbox statuses."""
    tok = ctx.tokenizer
    messages = []
    if options["system_prompt"]:
        messages.append({"role": "system", "content": options["system_prompt"]})
    messages.append({"role": "user", "content": question})
    episode = Episode.start(ctx, ctx.render(messages), options["max_response_tokens"])
    traj = episode.traj
    stop_ids = tuple(i for i in (tok.convert_tokens_to_ids("</tool_call>"),) if isinstance(i, int) and i >= 0)
    sampling = ctx.sampling.replace(stop_token_ids=stop_ids, stop=("```\n",))
    calls: list[str] = []
    box = None
    try:
        for _turn in range(int(options["max_turns"])):
            sampled = await episode.policy_turn(sampling)
            if sampled is None or sampled[0].finish_reason != "stop":
                traj.status = "truncated"
                break
            action = parse_action(sampled[1])
            if action.code is None and not action.error:
                traj.status = "completed"
                break  # the final answer (or nothing usable): the episode is over
            if len(calls) >= int(options["max_tool_calls"]):
                traj.status = "completed"
                break
            if action.error:
                shown = f"\n<interpreter>\n{action.error}\n</interpreter>\n"
                calls.append("malformed")
            else:
                if box is None:  # opened at the first call: an episode that never calls the tool costs nothing
                    box = await ctx.sandbox().__aenter__()
                executed = await box.run_python(action.code)
                calls.append(executed.status)
                shown = observation(executed, int(options["observation_chars"]))
            if not episode.observe(shown):  # the cap covers tool output too: keep what fits, and stop
                traj.status = "truncated"
                break
        else:
            traj.status = "truncated"  # out of turns right after a tool result: no answer was given
    finally:
        if box is not None:
            await box.__aexit__(None, None, None)
    return episode.finish(tool_calls=len(calls), tool_statuses=calls)
