"""Search-R1's protocol: `<search>q</search>` asks, `<information>…</information>` answers, `<answer>…</answer>` ends.

Observations are environment tokens (loss mask 0) appended exactly as the policy then reads them. A turn with
no valid tag gets feedback instead of ending the episode, and is counted: the invalid-action rate is how a
run shows that half its rollouts carry no tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from agentbench_npu.episode import Episode
from agentbench_npu.retrieval.client import passages
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import Trajectory

SEARCH = re.compile(r"<search>(.*?)</search>", re.S)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
INVALID_FEEDBACK = ("\nThat action is invalid. To search, write the query between <search> and </search>; "
                    "to answer, write the answer between <answer> and </answer>.\n")


@dataclass(frozen=True)
class Action:
    kind: str  # "search" | "answer" | "invalid"
    text: str = ""


def parse_action(text: str) -> Action:
    """The first complete tag of a turn decides it (the turn stops at its closing tag)."""
    found = [(m.start(), "search", m.group(1)) for m in SEARCH.finditer(text)]
    found += [(m.start(), "answer", m.group(1)) for m in ANSWER.finditer(text)]
    if not found:
        return Action("invalid")
    _, kind, body = min(found)
    body = body.strip()
    return Action(kind, body) if body else Action("invalid")


def final_answer(text: str) -> str | None:
    """The last `<answer>` of the policy's own text, or None."""
    answers = ANSWER.findall(text)
    return answers[-1].strip() if answers else None


def information(documents: list[dict[str, Any]], max_chars: int) -> str:
    return f"\n\n<information>{passages(documents, max_chars)}</information>\n\n"


def _tag_stops(tokenizer: Any) -> tuple[int, ...]:
    ids = [tokenizer.convert_tokens_to_ids(tag) for tag in ("</search>", "</answer>")]
    unk = getattr(tokenizer, "unk_token_id", None)
    return tuple(i for i in ids if isinstance(i, int) and i >= 0 and i != unk)


async def run_episode(ctx: RolloutContext, question: str, options: Mapping[str, Any]) -> Trajectory:
    """One Search-R1 episode: up to `max_turns` searches, then an answer; metadata counts every action."""
    search = ctx.services["search"]
    content = f"{options['instruction']}{question}" if options["instruction"] else question
    episode = Episode.start(ctx, ctx.render([{"role": "user", "content": content}]), options["max_response_tokens"])
    sampling = ctx.sampling.replace(stop=("</search>", "</answer>"), stop_token_ids=_tag_stops(ctx.tokenizer))
    actions: list[str] = []
    queries: list[str] = []
    episode.traj.status = "truncated"  # unless an answer comes
    for turn in range(int(options["max_turns"]) + 1):  # the last turn may only answer
        sampled = await episode.policy_turn(sampling)
        if sampled is None:
            break
        result, turn_text = sampled
        action = parse_action(turn_text)
        if action.kind == "search" and turn == int(options["max_turns"]):
            action = Action("invalid")  # out of searches: only an answer counts now
        actions.append(action.kind)
        if action.kind == "answer":
            episode.traj.status = "completed"
            break
        if result.finish_reason != "stop":
            break  # out of tokens mid-turn
        if turn == int(options["max_turns"]):
            break  # no turn follows to read feedback or results
        if action.kind == "search":
            queries.append(action.text)
            docs = (await search.retrieve([action.text], int(options["topk"])))[0]
            shown = information(docs, int(options["passage_chars"]))
        else:
            shown = INVALID_FEEDBACK
        if not episode.observe(shown):
            break
    return episode.finish(actions=actions, queries=queries)
