"""User simulators: who speaks for the customer. A reply containing `###STOP###` ends the conversation.

- `ScriptedUser` (default): deterministic, from the task alone, so CI runs are reproducible. It opens with the
  task's `opening` (or, lacking one, its instruction), then answers each agent message by fixed rules: a
  request for confirmation gets "Yes, please go ahead." (twice at most), a question about who they are gets
  their email, name and zip from the database, anything else ends the conversation.
- `LLMUser`: a language model plays the customer from the task's instruction, through any OpenAI-compatible
  endpoint (`task.user_url`) or, with no URL, through the policy's own engine (its tokens never enter the
  trajectory). Upstream τ-bench hard-codes cloud models here and calls one at construction time; this one
  calls nothing until the first turn and runs offline against a local server.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Protocol

from agentbench_npu.errors import UserError, one_line
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import Task

STOP = "###STOP###"
_CONFIRM = re.compile(r"\b(confirm|proceed|yes/no|go ahead|shall i|should i|would you like me to)\b", re.I)
_IDENTITY = re.compile(r"\b(e-?mail|zip|name|user id|who you are)\b", re.I)


class UserSimulator(Protocol):
    async def opening(self) -> str: ...

    async def reply(self, agent_message: str) -> str: ...

    async def aclose(self) -> None: ...


class ScriptedUser:
    async def aclose(self) -> None:
        pass

    def __init__(self, task: Task, db: Mapping[str, Any]):
        self.task = task
        user = db["users"][task.metadata["user_id"]]
        name = user["name"]
        self.identity = (f"My email is {user['email']}; I am {name['first_name']} {name['last_name']}, "
                         f"zip {user['address']['zip']}.")
        self.confirmations = 0
        self.identified = False

    async def opening(self) -> str:
        return str(self.task.prompt)

    async def reply(self, agent_message: str) -> str:
        if _CONFIRM.search(agent_message) and self.confirmations < 2:
            self.confirmations += 1
            return "Yes, please go ahead."
        if "?" in agent_message and _IDENTITY.search(agent_message) and not self.identified:
            self.identified = True
            return self.identity
        return STOP


SIMULATOR_PROMPT = (
    "You are a customer talking to the support agent of an online store. {instruction}\n"
    "Write only the customer's next message, one or two short sentences; give details when asked, not all at "
    "once. When your request is done, or the agent cannot do it, reply with " + STOP + " and nothing else."
)


class LLMUser:
    """A model plays the customer: user and agent roles swapped, so the model writes the customer's turns."""

    def __init__(self, ctx: RolloutContext, task: Task, options: Mapping[str, Any]):
        self.ctx = ctx
        self.url = str(options["user_url"])
        self.model = str(options["user_model"])
        self.temperature = float(options["user_temperature"])
        self.max_tokens = int(options["user_max_tokens"])
        self.history: list[dict[str, str]] = [
            {"role": "system", "content": SIMULATOR_PROMPT.format(instruction=task.metadata["instruction"])},
            {"role": "user", "content": "Hi! How can I help you today?"}]
        self.seed = ctx.rng.randrange(2**31)
        self.client = openai_client(self.url) if self.url else None

    async def opening(self) -> str:
        return await self._say()

    async def reply(self, agent_message: str) -> str:
        self.history.append({"role": "user", "content": agent_message})
        return await self._say()

    async def _say(self) -> str:
        self.seed += 1
        if self.client is not None:
            text = await self._remote()
        else:
            ids = self.ctx.render(self.history)
            result = await self.ctx.engine.generate_one(ids, self.ctx.sampling.replace(
                max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=1.0, top_k=-1, seed=self.seed))
            text = self.ctx.tokenizer.decode(result.output_ids, skip_special_tokens=True)
        text = text.strip() or STOP  # a simulator with nothing to say is done
        self.history.append({"role": "assistant", "content": text})
        return text

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def _remote(self) -> str:
        try:
            response = await self.client.chat.completions.create(
                model=self.model, messages=self.history, temperature=self.temperature, max_tokens=self.max_tokens,
                seed=self.seed)
        except Exception as exc:
            raise UserError(f"task.user_url '{self.url}': the user simulator's endpoint failed: {one_line(exc)}") from None
        return response.choices[0].message.content or ""


def require_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise UserError("task.user_url: an LLM user simulator at a URL needs the 'openai' package, which is not "
                        "installed: pip install 'agentbench-npu-tau-bench[llm-user]'") from None
    return openai


def openai_client(url: str) -> Any:
    openai = require_openai()
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return openai.AsyncOpenAI(base_url=base, api_key="EMPTY", max_retries=0, timeout=120.0)


def make_user(kind: str, ctx: RolloutContext, task: Task, db: Mapping[str, Any],
              options: Mapping[str, Any]) -> UserSimulator:
    if kind == "scripted":
        return ScriptedUser(task, db)
    return LLMUser(ctx, task, options)
