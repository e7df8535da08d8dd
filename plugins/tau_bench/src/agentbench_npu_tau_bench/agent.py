"""One τ-bench episode: the agent and the simulated user talk, the agent's tool calls change the database,
and the episode is scored when the user stops, the agent transfers to a human, or the budget runs out.

The agent is either the policy (sampled by the engine) or `gold`, which replays the task's gold actions
through the same loop (same rendering, same tool execution, same scoring) and then tells the user what the
task's required outputs are: a check of the environment and the scorer, which must score 1.0 on every task.

A turn with tool calls gets one tool message per call; a call that cannot run (unknown tool, arguments the
schema refuses, a domain rule, a tool that raises, a `<tool_call>` block that is not JSON) gets an `Error: ...`
tool message and the episode goes on. A turn without calls is a message to the user, who replies.
"""

from __future__ import annotations

from typing import Any, Mapping

from agentbench_npu.conversation import ChatEpisode, Turn
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import Task, Trajectory

from .domain import MALFORMED, Domain, canonical, db_diff, db_hash
from .users import STOP, UserSimulator, make_user

MALFORMED_MESSAGE = 'Error: a tool call must be JSON: {"name": "...", "arguments": {...}}'


class GoldScript:
    """The gold agent: one turn per gold action, then a message holding the required outputs."""

    def __init__(self, task: Task):
        self.turns: list[dict[str, Any]] = [
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": a["name"], "arguments": a["kwargs"]}}]}
            for a in task.label["actions"]]
        outputs = task.label["outputs"]
        self.turns.append({"role": "assistant",
                           "content": f"Done: {', '.join(outputs)}." if outputs else "Your request is done."})

    @property
    def exhausted(self) -> bool:
        return not self.turns

    def next(self, convo: ChatEpisode) -> Turn | None:
        if not self.turns:
            return None
        turn = convo.scripted(self.turns[0])
        if turn is not None:  # a turn the budget refused is not spent: the episode ends as "budget"
            self.turns.pop(0)
        return turn


def gold_state(domain: Domain, task: Task, cache: dict[str, tuple[str, dict]]) -> tuple[str, dict]:
    """(hash, database) after the task's gold actions on a fresh copy, computed once per task."""
    key = task.id + canonical(task.label["actions"])
    if key not in cache:
        db = domain.replay(task.label["actions"])
        cache[key] = (db_hash(db), db)
    return cache[key]


def score(domain: Domain, task: Task, db: dict, said: list[str], cache: dict) -> dict[str, Any]:
    """τ-bench's reward: 1 iff the database equals the gold one and every required output was said."""
    gold_hash, gold_db = gold_state(domain, task, cache)
    match = db_hash(db) == gold_hash
    spoken = [message.lower().replace(",", "") for message in said]  # each message on its own, as τ-bench checks
    missing = [o for o in task.label["outputs"] if not any(o.lower() in message for message in spoken)]
    return {"reward": 1.0 if match and not missing else 0.0, "db_match": match, "outputs_missing": missing,
            "db_diff": [] if match else db_diff(db, gold_db)}


async def run_episode(ctx: RolloutContext, task: Task, domain: Domain, options: Mapping[str, Any], policy: str,
                      gold_cache: dict) -> Trajectory:
    user = make_user(str(options["user"]), ctx, task, domain.data, options)
    try:
        return await _converse(ctx, task, domain, options, policy, gold_cache, user)
    finally:
        await user.aclose()


async def _converse(ctx: RolloutContext, task: Task, domain: Domain, options: Mapping[str, Any], policy: str,
                    gold_cache: dict, user: UserSimulator) -> Trajectory:
    db = domain.fresh_db()
    system = [{"role": "system", "content": domain.policy}] if options["policy_in_prompt"] else []
    opening = await user.opening()
    convo = ChatEpisode.start(ctx, system + [{"role": "user", "content": opening}],
                              domain.schemas if options["tools_in_prompt"] else None, int(options["max_response_tokens"]))
    gold = GoldScript(task) if policy == "gold" else None
    statuses: list[str] = []
    said: list[str] = []
    ended = "max_turns"
    limit = int(options["observation_chars"])
    # the gold agent needs one turn per action and one to speak: a policy's turn limit is not its
    turns = int(options["max_turns"]) if gold is None else len(gold.turns) + 1
    for _ in range(turns):
        turn = gold.next(convo) if gold is not None else await convo.sample(ctx.sampling)
        if turn is None:
            ended = "script" if gold is not None and gold.exhausted else "budget"
            break
        if not turn.finished:
            ended = "budget"
            break
        calls = turn.message.get("tool_calls", [])
        if calls or turn.malformed_calls:
            for call in calls:
                fn = call["function"]
                result = domain.call(db, fn["name"], fn["arguments"])
                statuses.append(result.status)
                output = result.output if limit <= 0 else result.output[:limit]
                convo.add({"role": "tool", "name": str(fn["name"]), "content": output})
                if result.terminates:
                    ended = "transfer"
                    break
            if ended == "transfer":
                break
            for _ in range(turn.malformed_calls):
                statuses.append(MALFORMED)
                convo.add({"role": "tool", "content": MALFORMED_MESSAGE})
            continue
        said.append(turn.message["content"])
        reply = await user.reply(turn.message["content"])
        if STOP in reply:
            ended = "user_stop"
            break
        convo.add({"role": "user", "content": reply})
    traj = convo.finish(tool_statuses=statuses, agent_messages=said, ended=ended, policy=policy,
                        user_opening=opening, **score(domain, task, db, said, gold_cache))
    traj.status = "completed" if ended in ("user_stop", "transfer", "script") else "truncated"
    return traj
