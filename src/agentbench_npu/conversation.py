"""A multi-turn agent episode kept as chat messages, with the token log the chat template implies.

Agents built on a chat API keep a list of messages (system, user, assistant with tool calls, tool results) and
re-render the whole list before every turn. RL needs the tokens instead: what the engine conditioned on, which
tokens the policy sampled (trained) and which came from the environment (not trained). `ChatEpisode` keeps both:

- before each policy turn the messages are rendered with the model's own template; the part after the text
  already in the context (the *delta*: tool results, the user's reply, the next assistant header) is encoded
  on its own and appended as environment tokens (loss mask 0);
- the policy's sampled tokens are appended as they came, with their log-probs (loss mask 1), and are never
  re-encoded: token in, token out;
- the sampled text becomes an assistant message (content plus parsed tool calls) for the next render.

Prefix stability: the re-rendered conversation must begin with exactly the text the engine has seen. A template
that re-formats an earlier turn (tool-call JSON spacing, a dropped `<think>`, stripped whitespace) breaks that,
and the tokens trained on would no longer be the conversation the agent had. Such a break is counted; from
there on the engine reads the template's rendering (as a chat API would show it), and the trajectory is kept for
scoring but excluded from training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .engines.chat import TOOL_CALL_BLOCK, parse_tool_calls
from .episode import sample_into
from .scenario import RolloutContext
from .types import GenerateResult, SamplingParams, Trajectory


def render_text(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                         add_generation_prompt=add_generation_prompt, tokenize=False)


def assistant_message(text: str, end_of_turn: str) -> tuple[dict[str, Any], int]:
    """The assistant message a turn's text stands for, and how many `<tool_call>` blocks did not parse."""
    body = text[:-len(end_of_turn)] if end_of_turn and text.endswith(end_of_turn) else text
    content, calls = parse_tool_calls(body)
    malformed = len(TOOL_CALL_BLOCK.findall(body)) - len(calls) + _unterminated(body)
    # with no call to take out, the text stays exactly as sampled (a chat API would strip it, and the next
    # render would no longer match the tokens the policy produced)
    message: dict[str, Any] = {"role": "assistant", "content": content if calls else body}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]
    return message, malformed


def assistant_text(tokenizer: Any, messages: Sequence[Mapping[str, Any]], message: Mapping[str, Any],
                   tools: Sequence[Mapping[str, Any]] | None) -> str:
    """The text the template renders for assistant `message` after `messages`: what a policy that said it
    would have generated, from just after the assistant header up to and including the end-of-turn token."""
    before = render_text(tokenizer, messages, tools, add_generation_prompt=True)
    after = render_text(tokenizer, list(messages) + [dict(message)], tools, add_generation_prompt=False)
    text = after[len(before):] if after.startswith(before) else after
    eos = tokenizer.eos_token or ""
    end = text.rfind(eos) if eos else -1
    return text[:end + len(eos)] if end >= 0 else text


def chat_segments(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                  tools: Sequence[Mapping[str, Any]] | None) -> tuple[str, list[tuple[str, bool]]]:
    """A whole chat as (prompt text, [(text, trained)]): assistant turns trained, everything between them not,
    cut exactly where `ChatEpisode` cuts a rollout (a warm start's demonstrations, say)."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    shown = render_text(tokenizer, messages[:first], tools, add_generation_prompt=True)
    prompt, segments = shown, []
    for i in range(first, len(messages)):
        if messages[i].get("role") != "assistant":
            continue
        rendered = render_text(tokenizer, messages[:i], tools, add_generation_prompt=True)
        if not rendered.startswith(shown):
            raise ValueError(f"the chat template renders the history before assistant message {i} differently "
                             "from how it rendered it before; such a chat cannot be cut into a token log")
        if rendered != shown:
            segments.append((rendered[len(shown):], False))
        text = assistant_text(tokenizer, messages[:i], messages[i], tools)
        segments.append((text, True))
        shown = rendered + text
    return prompt, segments


def _unterminated(text: str) -> int:
    return 1 if text.rfind("<tool_call>") > text.rfind("</tool_call>") else 0


@dataclass
class Turn:
    """One assistant turn: the message it became, its text, and the engine's result (None when scripted)."""

    message: dict[str, Any]
    text: str
    malformed_calls: int
    result: GenerateResult | None = None

    @property
    def finished(self) -> bool:
        """The turn ended by itself (not cut by the token budget)."""
        return self.result is None or self.result.finish_reason == "stop"


@dataclass
class ChatEpisode:
    ctx: RolloutContext
    traj: Trajectory
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    max_response_tokens: int
    context: list[int] = field(default_factory=list)  # exactly the ids the engine reads next
    shown: str = ""  # the text of `context`
    breaks: list[dict[str, str]] = field(default_factory=list)  # where re-rendering diverged, for reports

    @classmethod
    def start(cls, ctx: RolloutContext, messages: Sequence[Mapping[str, Any]],
              tools: Sequence[Mapping[str, Any]] | None, max_response_tokens: int) -> ChatEpisode:
        messages = [dict(m) for m in messages]
        tools = [dict(t) for t in tools] if tools else None
        text = render_text(ctx.tokenizer, messages, tools, add_generation_prompt=True)
        ids = ctx.tokenizer.encode(text, add_special_tokens=False)
        return cls(ctx, Trajectory(prompt_ids=list(ids)), messages, tools, int(max_response_tokens), list(ids), text)

    @property
    def room(self) -> int:
        return self.max_response_tokens - self.traj.response_length

    @property
    def end_of_turn(self) -> str:
        return self.ctx.tokenizer.eos_token or ""

    def add(self, message: Mapping[str, Any]) -> None:
        """A message from the environment (a tool result, the user's reply); rendered before the next turn."""
        self.messages.append(dict(message))

    def _catch_up(self) -> bool:
        """Append the rendered delta since the last turn as environment tokens; False when it did not fit."""
        rendered = render_text(self.ctx.tokenizer, self.messages, self.tools, add_generation_prompt=True)
        if rendered.startswith(self.shown):
            delta = rendered[len(self.shown):]
        else:
            common = len(os.path.commonprefix([rendered, self.shown]))
            self.breaks.append({"seen": self.shown[common:common + 60], "rendered": rendered[common:common + 60],
                                "after": self.shown[max(0, common - 40):common]})
            delta = rendered[common:]
            # the engine goes on from the template's rendering; the token log only records what followed
            self.context = self.ctx.tokenizer.encode(rendered[:common], add_special_tokens=False)
        ids = self.ctx.tokenizer.encode(delta, add_special_tokens=False)
        kept = ids[:max(0, self.room)]
        self.traj.append_env_tokens(kept)
        self.context += kept
        self.shown = rendered if len(kept) == len(ids) else self.shown + self.ctx.tokenizer.decode(kept)
        return len(kept) == len(ids)

    async def sample(self, sampling: SamplingParams) -> Turn | None:
        """The policy's next turn, sampled by the engine; None when the response budget is spent."""
        if not self._catch_up():
            return None
        result = await sample_into(self.ctx, self.traj, self.context, sampling, min(sampling.max_new_tokens, self.room))
        if result is None:
            return None
        text = self.ctx.tokenizer.decode(result.output_ids, skip_special_tokens=False)
        self.shown += text
        message, malformed = assistant_message(text, self.end_of_turn)
        self.messages.append(message)
        return Turn(message, text, malformed, result)

    def scripted(self, message: Mapping[str, Any]) -> Turn | None:
        """An assistant turn that was not sampled (a gold replay): the template's text for it, as environment
        tokens (nothing to train on, no log-probs). None when the budget is spent."""
        if not self._catch_up():
            return None
        text = assistant_text(self.ctx.tokenizer, self.messages, message, self.tools)
        ids = self.ctx.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > self.room:
            return None
        self.traj.append_env_tokens(ids)
        self.context += ids
        self.shown += text
        self.messages.append(dict(message))
        return Turn(dict(message), text, 0)

    def finish(self, **metadata: Any) -> Trajectory:
        self.traj.response_text = self.ctx.tokenizer.decode(self.traj.response_ids, skip_special_tokens=False)
        self.traj.metadata.update(prefix_breaks=len(self.breaks), prefix_break_examples=self.breaks[:2], **metadata)
        if self.breaks:
            self.traj.exclude_from_training(f"the chat template re-rendered the history differently "
                                            f"{len(self.breaks)} time(s)")
        return self.traj
