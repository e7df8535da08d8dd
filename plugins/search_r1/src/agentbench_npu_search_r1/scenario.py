"""The `search-r1` and `search-agent` scenarios: tasks, the retrieval service, rewards, warm start, step metrics."""

from __future__ import annotations

import asyncio
import json
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from agentbench_npu.datasets import take
from agentbench_npu.errors import MissingExtraError, UserError
from agentbench_npu.recipes import Layer, load_toml
from agentbench_npu.retrieval.client import SearchClient, passages
from agentbench_npu.retrieval.corpus import load_corpus
from agentbench_npu.retrieval.index import open_searcher
from agentbench_npu.retrieval.service import SearchService
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import Task, Trajectory

from .kb import shipped_paths, two_hop_questions
from .protocol import final_answer, information, run_episode
from .qa import exact_match, golden_answers, load_qa
from .tool_agent import SEARCH_TOOL, TOOL_NAME, run_agent_episode, tool_turn


def demo_query(question: str) -> str:
    """The query a demonstration searches with: the question without its wh- opening and question mark."""
    return re.sub(r"^(what|who|which|where|when) (is|are|was|were) (the )?", "", question.strip(" ?"), flags=re.I)


class _SearchScenario:
    """What both scenarios share: the QA tasks, the search service, exact-match reward and the warm start."""

    uses_sandbox = False

    def recipe(self) -> Layer:
        name = self.name.replace("-", "_") + ".toml"
        with resources.as_file(resources.files(__package__).joinpath(name)) as path:
            return load_toml(Path(path))

    def tasks(self, options: Mapping[str, Any], seed: int, cursor: int, count: int) -> list[Task]:
        return take(self._all_tasks(options), seed, cursor, count)

    def _all_tasks(self, options: Mapping[str, Any]) -> list[Task]:
        if options["qa"]:
            return list(load_qa(str(options["qa"])))
        tasks = list(load_qa(str(shipped_paths()[1])))
        if options["multi_hop"]:  # the shipped knowledge base's two-search questions too
            rows = two_hop_questions(list(load_corpus(shipped_paths()[0]).records))
            tasks += [Task(id=r["id"], prompt=r["question"], label=r["golden_answers"], metadata={"hops": r["hops"]})
                      for r in rows]
        return tasks

    def services(self, options: Mapping[str, Any]) -> dict[str, SearchService]:
        try:
            return {"search": SearchService(url=str(options["search_url"]), corpus=self._corpus(options),
                                            retriever=str(options["retriever"]), index=str(options["index"]),
                                            encoder=str(options["encoder"]), topk=int(options["topk"]))}
        except MissingExtraError:
            raise
        except UserError as exc:
            if str(exc).startswith("task."):
                raise
            field = "task.search_url" if options["search_url"] else "task.corpus"
            raise UserError(f"{field}: {exc}") from None

    @staticmethod
    def _corpus(options: Mapping[str, Any]) -> str:
        return str(options["corpus"] or shipped_paths()[0])

    def reward(self, task: Task, traj: Trajectory) -> float:
        answer = self.answer(traj)
        correct = exact_match(answer, golden_answers(task.label))
        traj.metadata.update(correct=correct, answered=answer is not None)
        return 1.0 if correct else 0.0

    def _demo_parts(self, options: Mapping[str, Any], count: int, seed: int):
        """(question, [(query, docs), ...], the answer the demo gives) per demonstration; no hops: a guess.

        A demo searches with the question's words and copies the last word of the top document; a two-hop
        question searches its first hop, copies the order number it finds into the second query, then answers.
        """
        rng = random.Random(f"{self.name}-demos:{seed}")
        tasks = self._all_tasks(options)
        topk = int(options["topk"])
        if options["search_url"]:  # the server the run will search, so demos show what rollouts will see
            client = SearchClient(str(options["search_url"]))

            def top(query: str) -> list[dict]:
                return asyncio.run(client.retrieve([query], topk))[0]
        else:
            searcher = open_searcher(self._corpus(options), str(options["retriever"]), str(options["index"]) or None,
                                     str(options["encoder"]))

            def top(query: str) -> list[dict]:
                return [doc for doc, _ in searcher.search([query], topk)[0]]

        def fact(doc: dict) -> str:
            return doc["contents"].rstrip(".").split()[-1]

        for _ in range(count):
            task = rng.choice(tasks)
            if rng.random() >= float(options["demo_search_fraction"]):
                yield task.prompt, [], str(rng.randint(10, 9999))  # a guess without searching
                continue
            hops = task.metadata.get("hops")
            if hops:
                first = top(hops[0])
                docs = top(f"total of order {fact(first[0])}")
                steps = [(hops[0], first), (f"total of order {fact(first[0])}", docs)]
            else:
                query = demo_query(str(task.prompt))
                docs = top(query)
                steps = [(query, docs)]
            answer = fact(docs[0])
            if rng.random() < float(options["demo_wrong_copy_fraction"]) and len(docs) > 1:
                answer = fact(docs[1])  # a neighbour's value: the policy starts imperfect, RL has work to do
            yield task.prompt, steps, answer


class SearchR1Scenario(_SearchScenario):
    """Search-R1: <search> / <information> / <answer> over a real retrieval server; exact-match reward."""

    name = "search-r1"
    checklist_item = "Search-R1"
    description = "retrieval-augmented rollout: <search> queries a real BM25/dense server; exact-match reward"

    async def rollout(self, ctx: RolloutContext, task: Task) -> Trajectory:
        return await run_episode(ctx, str(task.prompt), ctx.options)

    def answer(self, traj: Trajectory) -> str | None:
        return final_answer(traj.metadata.get("policy_text", ""))

    def step_metrics(self, trajectories: list[Trajectory]) -> dict[str, float]:
        n = max(1, len(trajectories))
        actions = [a for t in trajectories for a in t.metadata.get("actions", [])]
        return {
            "accuracy": sum(bool(t.metadata.get("correct")) for t in trajectories) / n,
            "answer_rate": sum(bool(t.metadata.get("answered")) for t in trajectories) / n,
            "search_rate": sum("search" in t.metadata.get("actions", []) for t in trajectories) / n,
            "searches_mean": actions.count("search") / n,
            "invalid_action_rate": actions.count("invalid") / len(actions) if actions else 0.0,
            "no_valid_tag_rate": sum(set(t.metadata.get("actions", [])) <= {"invalid"} for t in trajectories) / n,
        }

    def demonstrations(self, options: Mapping[str, Any], count: int, seed: int) -> list[tuple[list[dict], Any]]:
        demos = []
        for question, steps, answer in self._demo_parts(options, count, seed):
            content = f"{options['instruction']}{question}" if options["instruction"] else question
            response: Any = f"<answer> {answer} </answer>"
            if steps:
                response = [segment for query, docs in steps for segment in (
                    (f"<search> {query} </search>", True), (information(docs, int(options["passage_chars"])), False))]
                response.append((f"<answer> {answer} </answer>", True))
            demos.append(([{"role": "user", "content": content}], response))
        return demos


class SearchAgentScenario(_SearchScenario):
    """A search agent: `search` tool calls in Qwen's format, several per episode, over the same server."""

    name = "search-agent"
    checklist_item = "Search Agent"
    description = "search-integrated agent: OpenAI/Qwen tool calls to a real retrieval server; exact-match reward"

    async def rollout(self, ctx: RolloutContext, task: Task) -> Trajectory:
        return await run_agent_episode(ctx, str(task.prompt), ctx.options)

    def answer(self, traj: Trajectory) -> str | None:
        return traj.metadata.get("answer")

    def step_metrics(self, trajectories: list[Trajectory]) -> dict[str, float]:
        n = max(1, len(trajectories))
        statuses = [s for t in trajectories for s in t.metadata.get("tool_statuses", [])]
        return {
            "accuracy": sum(bool(t.metadata.get("correct")) for t in trajectories) / n,
            "answer_rate": sum(bool(t.metadata.get("answered")) for t in trajectories) / n,
            "tool_call_rate": sum(bool(t.metadata.get("tool_statuses")) for t in trajectories) / n,
            "tool_calls_mean": len(statuses) / n,
            "tool_error_rate": sum(s != "ok" for s in statuses) / len(statuses) if statuses else 0.0,
        }

    def demonstrations(self, options: Mapping[str, Any], count: int, seed: int) -> list[tuple[list[dict], Any, list]]:
        demos = []
        for question, steps, answer in self._demo_parts(options, count, seed):
            messages = ([{"role": "system", "content": options["instruction"]}] if options["instruction"] else [])
            messages.append({"role": "user", "content": question})
            response: Any = f"<answer> {answer} </answer>"
            if steps:
                response = []
                for query, docs in steps:
                    call = json.dumps({"name": TOOL_NAME, "arguments": {"query": query}})
                    response += [(f"<tool_call>\n{call}\n</tool_call><|im_end|>", True),
                                 (tool_turn([passages(docs, int(options["passage_chars"]))]), False)]
                response.append((f"<answer> {answer} </answer>", True))
            demos.append((messages, response, [SEARCH_TOOL]))
        return demos
