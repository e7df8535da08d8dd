"""The tau_bench plugin's episode loop (`agent.run_episode`), its simulated users (`users.py`) and its scenario
(`scenario.py`), with real components: the tiny model's real tokenizer and chat template, the shipped retail
domain (database, tools) and test tasks, the real engine server for the LLM user at a URL and, for
reproducibility, the real reference engine.

Only the POLICY is scripted (`ScriptedPolicy`, tests/support), in Qwen's format: a tool call is
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call><|im_end|>`, a message to the user is text ending
with `<|im_end|>`.

Covered:
- a policy that makes the right calls for a cancel task scores 1 and ends `user_stop`; a wrong argument scores 0
  with the differing database path named;
- bad tool calls (unknown tool, malformed JSON, wrong argument types, a domain refusal, a tool that raises) each
  come back as an `Error: ...` tool message that the engine's next request contains, the episode goes on, and
  `tool_statuses` and the scenario's `step_metrics` count each kind;
- a turn's several calls each get a tool message; `transfer_to_human_agents` ends the episode (calls after it in
  the same turn do not run); `max_turns` and the token budgets bound the episode;
- the gold policy (no engine) scores 1.0 on every shipped test task with the scripted user; a gold script with
  one wrong argument, or missing the required output, scores 0 against the real task;
- `ScriptedUser`'s rules; `LLMUser` through the policy's own engine (its tokens never enter the trajectory as
  policy tokens) and through an OpenAI-compatible URL (our own `serve`); a closed `task.user_url` is a one-line
  UserError naming the option;
- two runs of an episode with the same seed on the real reference engine give identical trajectories.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import random
from typing import Any

import httpx
import pytest
import torch
from agentbench_npu_tau_bench import agent
from agentbench_npu_tau_bench.agent import MALFORMED_MESSAGE, GoldScript, run_episode
from agentbench_npu_tau_bench.domain import ERROR_KINDS, Tool
from agentbench_npu_tau_bench.scenario import TauBenchScenario
from agentbench_npu_tau_bench.tasks import load_tasks, retail_domain, shipped_tasks
from agentbench_npu_tau_bench.users import SIMULATOR_PROMPT, STOP, LLMUser, ScriptedUser

from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.errors import UserError
from agentbench_npu.models.loading import load_tokenizer, resolve_model_dir
from agentbench_npu.scenario import RolloutContext, render_chat
from agentbench_npu.types import SamplingParams, Task, Trajectory
from tests.support.scripted_policy import POLICY_LOGPROB, ScriptedPolicy
from tests.support.servers import cli_server, free_port

EOS = "<|im_end|>"
SCENARIO = TauBenchScenario()
OPTIONS = dict(SCENARIO.recipe().values["task"])
DOMAIN = retail_domain()
TASKS = {t.id: t for t in load_tasks(shipped_tasks("test"), DOMAIN)}
CANCEL = TASKS["retail-test-0"]  # Ben Moss (zip 54580) cancels pending order #W1004, "no longer needed"
STATUS = TASKS["retail-test-4"]  # the status of #W1023 (lena.cruz@mail.com): must say "delivered"


def call(name: str, **arguments: Any) -> str:
    """One tool call as the template renders it (json.dumps' separators are the template's tojson's)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def turn(*calls: str) -> str:
    return "\n".join(calls) + EOS


def say(text: str) -> str:
    return text + EOS


FIND_BEN = turn(call("find_user_id_by_name_zip", first_name="Ben", last_name="Moss", zip="54580"))
CANCEL_W1004 = turn(call("cancel_pending_order", order_id="#W1004", reason="no longer needed"))
RIGHT_CANCEL = [FIND_BEN, CANCEL_W1004, say("Your order #W1004 is cancelled.")]


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model_dir("tiny", 0)


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def context(tok: Any, engine: Any, options: dict, seed: int = 0, max_new_tokens: int = 160,
            policy: str = "model") -> RolloutContext:
    return RolloutContext(engine=engine, tokenizer=tok, sampling=SamplingParams(max_new_tokens=max_new_tokens, seed=seed),
                          options=options, rng=random.Random(seed), policy=policy)


def episode(tok: Any, engine: Any, task: Task = CANCEL, domain: Any = DOMAIN, seed: int = 0,
            max_new_tokens: int = 160, **options: Any) -> Trajectory:
    """One episode through `run_episode` with the recipe's task options, except as given."""
    opts = {**OPTIONS, **options}
    ctx = context(tok, engine, opts, seed=seed, max_new_tokens=max_new_tokens)
    return asyncio.run(run_episode(ctx, task, domain, opts, ctx.policy, {}))


def shown(tok: Any, request: Any) -> str:
    return tok.decode(list(request.input_ids), skip_special_tokens=False)


def tool_response(content: str) -> str:
    return f"<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>"


def runs(traj: Trajectory) -> list[tuple[int, list[int]]]:
    """The response as maximal runs of one loss-mask value: (mask, ids)."""
    out: list[tuple[int, list[int]]] = []
    for i, m in zip(traj.response_ids, traj.loss_mask):
        if out and out[-1][0] == m:
            out[-1][1].append(i)
        else:
            out.append((m, [i]))
    return out


# == a right and a wrong policy ======================================================================
def test_the_right_calls_for_a_cancel_task_score_1_and_the_user_stops(tok):
    policy = ScriptedPolicy(tok, RIGHT_CANCEL)
    ctx = context(tok, policy, dict(OPTIONS))
    traj = asyncio.run(SCENARIO.rollout(ctx, CANCEL))

    assert SCENARIO.reward(CANCEL, traj) == 1.0
    m = traj.metadata
    assert m["ended"] == "user_stop" and traj.status == "completed"
    assert m["tool_statuses"] == ["ok", "ok"] and m["db_match"] is True
    assert m["outputs_missing"] == [] and m["db_diff"] == [] and m["prefix_breaks"] == 0
    assert m["agent_messages"] == ["Your order #W1004 is cancelled."] and m["policy"] == "model"
    assert m["user_opening"] == CANCEL.prompt
    assert traj.prompt_ids == render_chat(tok, [{"role": "user", "content": CANCEL.prompt}])
    # each tool result reaches the next turn, cut to observation_chars
    first, second, third = policy.requests
    assert list(first.input_ids) == traj.prompt_ids
    assert shown(tok, second).endswith(tool_response("ben_moss") + "\n<|im_start|>assistant\n")
    # the cancelled order, as the tool shows it (its JSON), cut to the first observation_chars characters
    cancelled = json.dumps({**DOMAIN.data["orders"]["#W1004"], "status": "cancelled"})[:OPTIONS["observation_chars"]]
    assert OPTIONS["observation_chars"] == 160 and len(cancelled) == 160
    assert shown(tok, third).endswith(tool_response(cancelled) + "\n<|im_start|>assistant\n")
    # the policy's tokens are trained with their log-probs, nothing else is
    assert [ids for mask, ids in runs(traj) if mask == 1] == [list(o) for o in policy.outputs]
    assert {lp for lp, mask in zip(traj.rollout_logprobs, traj.loss_mask) if mask} == {POLICY_LOGPROB}
    row = SCENARIO.task_result(traj)
    assert row == {"db_match": True, "outputs_missing": [], "db_diff": [], "ended": "user_stop", "tool_calls": 2,
                   "tool_errors": 0, "prefix_breaks": 0}


def test_a_wrong_argument_scores_0_and_the_report_names_the_database_path_that_differs(tok):
    wrong = turn(call("cancel_pending_order", order_id="#W1004", reason="ordered by mistake"))
    traj = episode(tok, ScriptedPolicy(tok, [FIND_BEN, wrong, say("Cancelled.")]))
    assert traj.metadata["tool_statuses"] == ["ok", "ok"] and traj.metadata["ended"] == "user_stop"
    assert traj.metadata["reward"] == 0.0 and traj.metadata["db_match"] is False
    assert traj.metadata["db_diff"] == ["orders.#W1004.cancel_reason"]


# == tool calls that cannot run ======================================================================
BAD_CALLS = {
    "unknown_tool": (turn(call("delete_everything", order_id="#W1004")),
                     'Error: unknown tool "delete_everything"; the tools are find_user_id_by_email, '),
    "malformed": ('<tool_call>\n{"name": "find_user_id_by_email", "arguments": {"email": }\n</tool_call>' + EOS,
                  MALFORMED_MESSAGE),
    "bad_arguments": (turn(call("find_user_id_by_email", email=5)),
                      "Error: find_user_id_by_email: argument 'email' must be a string, got 5"),
    "refused": (turn(call("cancel_pending_order", order_id="#W1023", reason="no longer needed")),
                "Error: order '#W1023' is delivered, not pending"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CALLS))
def test_a_call_that_cannot_run_returns_an_error_the_next_turn_reads_and_the_episode_goes_on(tok, kind):
    bad, error = BAD_CALLS[kind]
    policy = ScriptedPolicy(tok, [bad] + RIGHT_CANCEL)
    traj = episode(tok, policy)
    assert traj.metadata["tool_statuses"] == [kind, "ok", "ok"]
    seen = shown(tok, policy.requests[1])
    assert "<|im_start|>user\n<tool_response>\nError: " in seen
    assert error in seen, "the error reaches the policy's next turn"
    assert traj.metadata["ended"] == "user_stop" and traj.metadata["reward"] == 1.0, "and the episode went on"
    metrics = SCENARIO.step_metrics([traj])
    assert {k: metrics[f"tool_errors_{k}"] for k in ERROR_KINDS} == {k: float(k == kind) for k in ERROR_KINDS}
    assert metrics["tool_error_rate"] == pytest.approx(1 / 3) and metrics["tool_calls_mean"] == 3.0
    assert SCENARIO.task_result(traj)["tool_errors"] == 1


def test_arguments_the_schema_refuses_are_bad_arguments_with_the_reason():
    db = DOMAIN.fresh_db()
    missing = DOMAIN.call(db, "cancel_pending_order", {"order_id": "#W1004"})
    enum = DOMAIN.call(db, "cancel_pending_order", {"order_id": "#W1004", "reason": "because"})
    extra = DOMAIN.call(db, "get_order_details", {"order_id": "#W1004", "verbose": True})
    not_object = DOMAIN.call(db, "get_order_details", ["#W1004"])
    assert {r.status for r in (missing, enum, extra, not_object)} == {"bad_arguments"}
    assert missing.output == "Error: cancel_pending_order: missing argument 'reason'"
    assert enum.output.startswith("Error: cancel_pending_order: argument 'reason' must be one of ")
    assert "unknown argument 'verbose'" in extra.output and "must be a JSON object" in not_object.output
    assert db == DOMAIN.data, "nothing ran"


def test_a_tool_that_raises_is_reported_as_raised_and_the_episode_goes_on(tok):
    def boom(db: dict, order_id: str) -> str:
        raise RuntimeError(f"disk on fire reading {order_id}")

    tools = dict(DOMAIN.tools)
    tools["get_order_details"] = dataclasses.replace(tools["get_order_details"], fn=boom)
    domain = dataclasses.replace(DOMAIN, tools=tools)
    policy = ScriptedPolicy(tok, [turn(call("get_order_details", order_id="#W1004"))] + RIGHT_CANCEL)
    traj = episode(tok, policy, domain=domain)
    assert traj.metadata["tool_statuses"] == ["raised", "ok", "ok"]
    assert tool_response("Error: get_order_details failed: RuntimeError: disk on fire reading #W1004") in shown(
        tok, policy.requests[1])
    assert traj.metadata["ended"] == "user_stop" and traj.metadata["reward"] == 1.0
    assert SCENARIO.step_metrics([traj])["tool_errors_raised"] == 1.0
    assert DOMAIN.tools["get_order_details"].fn is not boom, "the shared domain is untouched"


def test_a_registered_tool_that_raises_is_raised_too():
    def flaky(db: dict) -> str:
        raise KeyError("missing")

    tool = Tool("flaky", "Fails.", {}, (), flaky)
    domain = dataclasses.replace(DOMAIN, tools={**DOMAIN.tools, "flaky": tool})
    result = domain.call(domain.fresh_db(), "flaky", {})
    assert (result.status, result.output) == ("raised", "Error: flaky failed: KeyError: 'missing'")
    assert "flaky" not in DOMAIN.tools


def test_each_call_of_a_turn_gets_its_tool_message_and_errors_of_every_kind_are_counted(tok):
    malformed = '<tool_call>\n{"name": "get_order_details" "arguments": {}}\n</tool_call>'
    policy = ScriptedPolicy(tok, [
        turn(call("find_user_id_by_email", email="nobody@mail.com"), call("get_user_details", user_id="ben_moss")),
        turn(malformed),
        turn(call("what_is_this")),
        turn(call("get_order_details", order_id=4)),
    ] + RIGHT_CANCEL)
    traj = episode(tok, policy, observation_chars=0, max_response_tokens=2048)
    assert traj.metadata["tool_statuses"] == ["refused", "ok", "malformed", "unknown_tool", "bad_arguments",
                                              "ok", "ok"]
    two = shown(tok, policy.requests[1])
    user = json.dumps(DOMAIN.data["users"]["ben_moss"])
    assert two.endswith("<|im_start|>user\n<tool_response>\nError: user not found\n</tool_response>\n"
                        f"<tool_response>\n{user}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"), \
        "one tool message per call, in order, shown whole with observation_chars = 0"
    assert shown(tok, policy.requests[2]).endswith(tool_response(MALFORMED_MESSAGE) + "\n<|im_start|>assistant\n")
    other = episode(tok, ScriptedPolicy(tok, RIGHT_CANCEL))
    metrics = SCENARIO.step_metrics([traj, other])
    assert metrics["tool_errors_refused"] == metrics["tool_errors_malformed"] == 1.0
    assert metrics["tool_errors_unknown_tool"] == metrics["tool_errors_bad_arguments"] == 1.0
    assert metrics["tool_errors_raised"] == 0.0
    assert metrics["tool_error_rate"] == pytest.approx(4 / 9) and metrics["tool_calls_mean"] == 4.5
    assert metrics["success_rate"] == metrics["db_match_rate"] == metrics["user_stop_rate"] == 1.0
    assert metrics["transfer_rate"] == 0.0 and metrics["prefix_break_rate"] == 0.0


def test_a_compact_call_is_run_but_breaks_the_prefix_so_the_episode_is_not_trained_on(tok):
    compact = '<tool_call>\n{"name":"find_user_id_by_name_zip","arguments":{"first_name":"Ben","last_name":"Moss",' \
              '"zip":"54580"}}\n</tool_call>' + EOS
    traj = episode(tok, ScriptedPolicy(tok, [compact] + RIGHT_CANCEL[1:]))
    assert traj.metadata["tool_statuses"] == ["ok", "ok"] and traj.metadata["reward"] == 1.0
    assert traj.metadata["prefix_breaks"] == 1 and traj.num_trainable == 0
    assert SCENARIO.step_metrics([traj])["prefix_break_rate"] == 1.0
    assert SCENARIO.task_result(traj)["prefix_break"]["seen"].startswith('"find_user_id_by_name_zip"')


# == how an episode ends =============================================================================
def test_a_transfer_to_a_human_ends_the_episode_and_calls_after_it_do_not_run(tok):
    transfer = call("transfer_to_human_agents", summary="wants a cancel outside the policy")
    policy = ScriptedPolicy(tok, [turn(transfer, call("cancel_pending_order", order_id="#W1004",
                                                      reason="no longer needed")), say("never asked")])
    traj = episode(tok, policy)
    assert traj.metadata["ended"] == "transfer" and traj.status == "completed"
    assert traj.metadata["tool_statuses"] == ["ok"], "the cancel after the transfer did not run"
    assert len(policy.requests) == 1 and traj.metadata["reward"] == 0.0
    assert traj.metadata["db_diff"] == ["orders.#W1004.cancel_reason", "orders.#W1004.payment_history",
                                        "orders.#W1004.status"]
    assert SCENARIO.step_metrics([traj])["transfer_rate"] == 1.0
    # a task whose gold action is the transfer scores it
    task = TASKS["retail-test-12"]
    traj = episode(tok, ScriptedPolicy(tok, [turn(transfer)]), task=task)
    assert traj.metadata["ended"] == "transfer" and traj.metadata["reward"] == 1.0


def test_max_turns_bounds_the_assistant_turns(tok):
    policy = ScriptedPolicy(tok, [FIND_BEN, FIND_BEN, CANCEL_W1004, say("Done.")])
    traj = episode(tok, policy, max_turns=2)
    assert len(policy.requests) == 2 and policy.turns == [CANCEL_W1004, say("Done.")]
    assert traj.metadata["ended"] == "max_turns" and traj.status == "truncated"
    assert traj.metadata["tool_statuses"] == ["ok", "ok"] and traj.metadata["reward"] == 0.0
    assert SCENARIO.step_metrics([traj])["user_stop_rate"] == 0.0


def test_the_response_budget_and_a_turn_cut_short_end_the_episode_as_budget(tok):
    policy = ScriptedPolicy(tok, RIGHT_CANCEL)
    traj = episode(tok, policy, max_response_tokens=60)
    assert traj.metadata["ended"] == "budget" and traj.status == "truncated"
    assert traj.response_length == 60 and len(policy.requests) == 1
    cut = ScriptedPolicy(tok, RIGHT_CANCEL)
    traj = episode(tok, cut, max_new_tokens=10)
    assert traj.metadata["ended"] == "budget" and traj.metadata["tool_statuses"] == []
    assert len(cut.outputs[0]) == 10 and len(cut.requests) == 1


def test_the_scenario_checks_its_options():
    with pytest.raises(UserError, match="task.user is 'robot'"):
        SCENARIO.tasks({**OPTIONS, "user": "robot"}, 0, 0, 1)
    with pytest.raises(UserError, match="task.max_turns must be at least 1"):
        SCENARIO.tasks({**OPTIONS, "max_turns": 0}, 0, 0, 1)
    assert {t.id for t in SCENARIO.tasks(OPTIONS, 0, 0, 14, mode="eval")} == set(TASKS)


# == the gold policy =================================================================================
@pytest.mark.parametrize("task_id", sorted(TASKS, key=lambda i: int(i.rsplit("-", 1)[1])))
def test_the_gold_policy_scores_1_on_every_shipped_test_task_without_an_engine(tok, task_id):
    task = TASKS[task_id]
    engine = ScriptedPolicy(tok, [])  # raises if asked for a turn
    ctx = context(tok, engine, dict(OPTIONS), policy="gold")
    traj = asyncio.run(SCENARIO.rollout(ctx, task))
    assert SCENARIO.reward(task, traj) == 1.0, traj.metadata
    assert engine.requests == []
    transfer = task.label["actions"][-1]["name"] == "transfer_to_human_agents"
    assert traj.metadata["ended"] == ("transfer" if transfer else "user_stop") and traj.status == "completed"
    assert traj.metadata["tool_statuses"] == ["ok"] * len(task.label["actions"])
    assert traj.num_trainable == 0 and traj.metadata["policy"] == "gold"
    assert traj.metadata["prefix_breaks"] == 0
    for output in task.label["outputs"]:
        assert output in " ".join(traj.metadata["agent_messages"])


def _wrong_reason(task: Task) -> Task:
    wrong = copy.deepcopy(task)
    kwargs = wrong.label["actions"][-1]["kwargs"]
    kwargs["reason"] = "ordered by mistake" if kwargs["reason"] != "ordered by mistake" else "no longer needed"
    return wrong


def _no_outputs(task: Task) -> Task:
    wrong = copy.deepcopy(task)
    wrong.label["outputs"] = []
    return wrong


@pytest.mark.parametrize("task, alter, expected", [
    (CANCEL, _wrong_reason, {"db_match": False, "db_diff": ["orders.#W1004.cancel_reason"], "outputs_missing": []}),
    (STATUS, _no_outputs, {"db_match": True, "db_diff": [], "outputs_missing": ["delivered"]}),
], ids=["wrong-argument", "output-not-said"])
def test_a_gold_script_that_differs_from_the_task_scores_0_against_the_real_task(tok, monkeypatch, task, alter,
                                                                                   expected):
    altered = alter(task)
    monkeypatch.setattr(agent, "GoldScript", lambda _task: GoldScript(altered))
    ctx = context(tok, ScriptedPolicy(tok, []), dict(OPTIONS), policy="gold")
    traj = asyncio.run(run_episode(ctx, task, DOMAIN, ctx.options, "gold", {}))
    assert traj.metadata["reward"] == 0.0
    assert {k: traj.metadata[k] for k in expected} == expected
    assert traj.metadata["tool_statuses"] == ["ok"] * len(task.label["actions"])
    assert task.label != altered.label, "the real task was left as it was"


def test_a_gold_script_that_runs_out_while_the_user_talks_on_ends_as_script(tok):
    """The LLM user (on the engine, which serves only the user here) answers the gold closing message with more
    to say: the gold agent has nothing left, and the episode ends as `script`, completed and scored."""
    engine = ScriptedPolicy(tok, [say("Cancel #W1004 please."), say("Thanks! Can you also check my other order?")])
    opts = {**OPTIONS, "user": "llm", "user_url": ""}
    ctx = context(tok, engine, opts, policy="gold")
    traj = asyncio.run(run_episode(ctx, CANCEL, DOMAIN, opts, "gold", {}))
    assert traj.metadata["ended"] == "script" and traj.status == "completed"
    assert traj.metadata["reward"] == 1.0 and len(engine.requests) == 2 and traj.num_trainable == 0
    assert traj.metadata["user_opening"] == "Cancel #W1004 please."


def test_a_gold_episode_cut_by_the_response_budget_before_its_closing_message_ends_as_budget(tok):
    opts = dict(OPTIONS)
    full = asyncio.run(run_episode(context(tok, ScriptedPolicy(tok, []), opts, policy="gold"), STATUS, DOMAIN, opts,
                                   "gold", {}))
    closing = tok.encode("Done: delivered." + EOS, add_special_tokens=False)
    assert full.metadata["ended"] == "user_stop" and full.response_ids[-len(closing):] == closing
    opts = {**OPTIONS, "max_response_tokens": full.response_length - 1}  # all but the closing message fits
    traj = asyncio.run(run_episode(context(tok, ScriptedPolicy(tok, []), opts, policy="gold"), STATUS, DOMAIN, opts,
                                   "gold", {}))
    assert traj.metadata["outputs_missing"] == ["delivered"] and traj.metadata["reward"] == 0.0
    assert traj.metadata["ended"] == "budget" and traj.status == "truncated"


# == the users =======================================================================================
def test_the_scripted_user_opens_with_the_task_and_answers_by_its_rules():
    user = ScriptedUser(CANCEL, DOMAIN.data)
    ben = DOMAIN.data["users"]["ben_moss"]
    assert asyncio.run(user.opening()) == CANCEL.prompt
    replies = [asyncio.run(user.reply(m)) for m in [
        "What is your email or your name and zip code?",
        "Shall I cancel order #W1004?",
        "Please confirm: cancel #W1004 (yes/no)?",
        "Should I proceed?",  # a third confirmation is not given
    ]]
    assert replies[0] == f"My email is {ben['email']}; I am Ben Moss, zip {ben['address']['zip']}."
    assert ben["email"] == "ben.moss@mail.com" and ben["address"]["zip"] == "54580"
    assert replies[1:] == ["Yes, please go ahead.", "Yes, please go ahead.", STOP]
    again = ScriptedUser(CANCEL, DOMAIN.data)
    assert asyncio.run(again.reply("Your order is cancelled.")) == STOP, "anything else ends the conversation"
    assert asyncio.run(again.reply("Your email, please.")) == STOP, "an identity request must be a question"
    third = ScriptedUser(CANCEL, DOMAIN.data)
    assert asyncio.run(third.reply("What is your user id?")).startswith("My email is ")
    assert asyncio.run(third.reply("And your zip?")) == STOP, "identity is given once"


def test_the_scripted_users_identity_reaches_the_policy_as_a_user_turn(tok):
    policy = ScriptedPolicy(tok, [say("Could you tell me your name and zip code?")] + RIGHT_CANCEL)
    traj = episode(tok, policy)
    identity = "My email is ben.moss@mail.com; I am Ben Moss, zip 54580."
    assert shown(tok, policy.requests[1]).endswith(
        f"<|im_start|>user\n{identity}<|im_end|>\n<|im_start|>assistant\n")
    assert traj.metadata["agent_messages"] == ["Could you tell me your name and zip code?",
                                               "Your order #W1004 is cancelled."]
    assert traj.metadata["reward"] == 1.0 and traj.metadata["ended"] == "user_stop"


def test_an_llm_user_on_the_policys_own_engine_speaks_but_never_enters_the_trajectory_as_policy_tokens(tok):
    task = TASKS["retail-test-1"]
    engine = ScriptedPolicy(tok, [
        say("Please cancel my order #W1010."),  # the user's opening
        say("What is your email?"),  # the agent
        say("mo.rossi@mail.com"),  # the user
        say("Thanks, noted."),  # the agent
        say(STOP),  # the user
    ])
    traj = episode(tok, engine, task=task, user="llm", user_url="")
    user_calls, agent_calls = engine.requests[0::2], engine.requests[1::2]
    assert traj.metadata["user_opening"] == "Please cancel my order #W1010."
    assert traj.prompt_ids == render_chat(tok, [{"role": "user", "content": "Please cancel my order #W1010."}])
    assert [list(r.input_ids) for r in agent_calls][0] == traj.prompt_ids
    # the user model reads the simulator prompt with the task's instruction, roles swapped
    opening_request = shown(tok, user_calls[0])
    assert opening_request == tok.apply_chat_template([
        {"role": "system", "content": SIMULATOR_PROMPT.format(instruction=task.metadata["instruction"])},
        {"role": "user", "content": "Hi! How can I help you today?"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is your email?<|im_end|>" in shown(tok, user_calls[1])
    assert "<|im_start|>assistant\nPlease cancel my order #W1010.<|im_end|>" in shown(tok, user_calls[1])
    for r in user_calls:
        assert (r.sampling.temperature, r.sampling.max_new_tokens) == (OPTIONS["user_temperature"],
                                                                       OPTIONS["user_max_tokens"])
    # only the agent's turns are policy tokens; the user's reply is there as the template's environment tokens
    assert [ids for mask, ids in runs(traj) if mask == 1] == [list(engine.outputs[1]), list(engine.outputs[3])]
    (reply,) = [tok.decode(ids) for mask, ids in runs(traj) if mask == 0]
    assert reply == "\n<|im_start|>user\nmo.rossi@mail.com<|im_end|>\n<|im_start|>assistant\n"
    assert traj.metadata["ended"] == "user_stop" and traj.metadata["reward"] == 0.0
    assert len(engine.requests) == 5


def test_an_llm_user_at_an_openai_compatible_url_opens_the_episode_and_replies(tok):
    """Our own `serve` of the tiny model is the endpoint; at temperature 1 with the user's seed, its answers are
    reproducible, so the test asks the server the same requests directly and compares. (Greedy, the untrained
    model writes only newlines, which the simulator would read as ###STOP###.)"""
    task = TASKS["retail-test-1"]
    policy = ScriptedPolicy(tok, [say("Hello, how can I help?"), say("Could you say more?")])
    seed = 7
    first_seed = random.Random(seed).randrange(2**31) + 1  # LLMUser: the context's rng, then one per turn
    history = [{"role": "system", "content": SIMULATOR_PROMPT.format(instruction=task.metadata["instruction"])},
               {"role": "user", "content": "Hi! How can I help you today?"}]
    with cli_server("serve", "--model", "tiny") as (url, _proc):
        traj = episode(tok, policy, task=task, seed=seed, user="llm", user_url=url, max_turns=2, user_temperature=1.0)

        def ask(messages: list[dict], user_seed: int) -> str:
            response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": OPTIONS["user_model"], "messages": messages, "temperature": 1.0,
                "max_tokens": OPTIONS["user_max_tokens"], "seed": user_seed})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"].strip() or STOP

        opening = ask(history, first_seed)
        reply = ask(history + [{"role": "assistant", "content": opening},
                               {"role": "user", "content": "Hello, how can I help?"}], first_seed + 1)
    assert opening != STOP and reply != STOP, "the sampled customer said something"
    assert traj.metadata["user_opening"] == opening
    assert traj.prompt_ids == render_chat(tok, [{"role": "user", "content": opening}])
    assert len(policy.requests) == 2 and traj.metadata["ended"] == "max_turns"
    assert shown(tok, policy.requests[1]).endswith(f"<|im_start|>user\n{reply}<|im_end|>\n<|im_start|>assistant\n")
    assert traj.num_trainable == sum(map(len, policy.outputs)), "the customer's words are not policy tokens"


def test_an_llm_user_at_a_closed_port_is_a_one_line_user_error_naming_the_option(tok):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as info:
        episode(tok, ScriptedPolicy(tok, []), user="llm", user_url=url)
    message = str(info.value)
    assert message.startswith(f"task.user_url '{url}'") and "\n" not in message


def test_an_llm_user_calls_nothing_until_its_first_turn(tok):
    url = f"http://127.0.0.1:{free_port()}"
    ctx = context(tok, ScriptedPolicy(tok, []), {**OPTIONS, "user": "llm", "user_url": url})
    user = LLMUser(ctx, CANCEL, ctx.options)
    assert user.client is not None and user.url == url
    with pytest.raises(UserError, match="task.user_url"):
        asyncio.run(user.opening())


# == reproducibility =================================================================================
def test_two_runs_of_an_episode_with_the_same_seed_on_the_real_engine_are_identical(tok, model_dir):
    """The real tiny model plays both the customer (an LLM user on the policy's own engine) and the agent."""
    def once(seed: int) -> Trajectory:
        engine = ReferenceEngine.create(model_dir, tokenizer=tok, dtype="float32", device=torch.device("cpu"), seed=0)
        return episode(tok, engine, seed=seed, max_new_tokens=48, max_turns=3, max_response_tokens=256,
                       user="llm", user_url="", user_temperature=1.0)

    a, b, other = once(11), once(11), once(12)
    assert a.response_ids and a.num_trainable > 0
    assert (a.prompt_ids, a.response_ids, a.loss_mask) == (b.prompt_ids, b.response_ids, b.loss_mask)
    assert a.rollout_logprobs == b.rollout_logprobs and a.status == b.status
    assert a.metadata == b.metadata
    # and the seed is what makes them equal: another seed samples another customer and another agent
    assert other.metadata["user_opening"] != a.metadata["user_opening"]
    assert other.response_ids != a.response_ids
