"""The retool agent loop with real components: the tiny model's real tokenizer and chat template, a real
`local` sandbox provider (namespaces when run as root), and, in the last test, the real reference engine.

The untrained tiny model writes gibberish, so where a test needs a particular sequence of actions the
POLICY alone is replaced by `ScriptedPolicy`: a test double of our `EngineClient` interface that answers
each `generate` with the next scripted turn, tokenised by the real tokenizer, log-prob -0.5 per token,
honouring the request's `max_new_tokens` and `stop_token_ids` as an engine does. Everything else (the
sandbox, the tokenizer, the trajectory) is the real thing.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
from typing import Any

import pytest
import torch
from agentbench_npu_retool.agent import TOOL_NAME, run_episode
from agentbench_npu_retool.scenario import RetoolScenario

from agentbench_npu.engines.base import EngineClient
from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.models.loading import load_tokenizer, resolve_model_dir
from agentbench_npu.sandbox.base import SandboxLimits
from agentbench_npu.sandbox.local import LocalSandboxProvider, live_processes
from agentbench_npu.scenario import RolloutContext
from agentbench_npu.types import (
    SamplingParams,
    Task,
    Trajectory,
)
from tests.support.scripted_policy import POLICY_LOGPROB, ScriptedPolicy

SCENARIO = RetoolScenario()
OPTIONS = dict(SCENARIO.recipe().values["task"])
# hostile snippets run into these on purpose; small, so that a test takes about a second
LIMITS = SandboxLimits(wall_seconds=1.0, cpu_seconds=1.0, memory_mb=256, processes=16)
# away from the runner's default (3,000,000) and the local sandbox tests' (3,100,000, 3,200,000), so that "no process
# of our uids is left" is about this module's sandboxes only
UID_BASE = 3_300_000


def call(code: str, name: str = TOOL_NAME) -> str:
    """A turn that calls the tool in Qwen's format, as the warm-started policy writes it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': {'code': code}})}\n</tool_call>"


class OpenedSandboxes:
    """The run's provider as agent loops see it (`ctx.sandboxes`), remembering every sandbox handed out."""

    def __init__(self, provider: LocalSandboxProvider):
        self.provider = provider
        self.opened: list[Any] = []

    def sandbox(self) -> Any:
        box = self.provider.sandbox()
        self.opened.append(box)
        return box


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir():
    return resolve_model_dir("tiny", 0)


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def provider():
    provider = LocalSandboxProvider(LIMITS, {"uid_base": UID_BASE, "slots": 8})
    asyncio.run(provider.start())
    uids = provider.describe()["uid_range"]
    yield provider
    asyncio.run(provider.close())
    if uids:
        assert live_processes(set(range(uids[0], uids[1] + 1))) == 0


@pytest.fixture
def sandboxes(provider):
    """Per test: the sandboxes its episodes open; afterwards each must be closed, with nothing left."""
    opened = OpenedSandboxes(provider)
    yield opened
    assert_nothing_left(opened)


def assert_nothing_left(opened: OpenedSandboxes) -> None:
    provider = opened.provider
    assert all(box.workdir is None for box in opened.opened), "an episode left its sandbox open"
    assert provider.leftover_dirs() == 0
    for box in opened.opened:
        assert provider.leftover_processes(box) == 0
    uids = provider.describe()["uid_range"]
    if uids:
        assert live_processes(set(range(uids[0], uids[1] + 1))) == 0


def episode(tok: Any, policy: EngineClient, sandboxes: Any, question: str = "What is 12 * 7 + 5?",
            seed: int = 0, max_new_tokens: int = 128, **options: Any) -> Trajectory:
    """One `run_episode` with the recipe's task options, except that turns and the whole response may be
    long enough for the scripted code (a tool call is 30-80 tokens with the tiny tokenizer), unless given."""
    options = {**OPTIONS, "max_response_tokens": 512, **options}
    ctx = RolloutContext(engine=policy, tokenizer=tok, sampling=SamplingParams(max_new_tokens=max_new_tokens, seed=seed),
                         options=options, rng=random.Random(seed), sandboxes=sandboxes)
    return asyncio.run(run_episode(ctx, question, ctx.options))


# -- invariants ----------------------------------------------------------------------------------
def runs(traj: Trajectory) -> list[tuple[int, list[int], list[float]]]:
    """The response as maximal runs of one loss-mask value: (mask, ids, logprobs)."""
    out: list[tuple[int, list[int], list[float]]] = []
    for i, m, lp in zip(traj.response_ids, traj.loss_mask, traj.rollout_logprobs):
        if out and out[-1][0] == m:
            out[-1][1].append(i)
            out[-1][2].append(lp)
        else:
            out.append((m, [i], [lp]))
    return out


def assert_trajectory_invariants(traj: Trajectory, tok: Any, max_response_tokens: int | None = None) -> None:
    assert len(traj.response_ids) == len(traj.loss_mask) == len(traj.rollout_logprobs)
    assert set(traj.loss_mask) <= {0, 1}
    parts = runs(traj)
    for k, (mask, ids, lps) in enumerate(parts):
        if mask == 0:  # environment tokens: the tool's output, never trained on
            assert all(lp == 0.0 for lp in lps)
            text = tok.decode(ids, skip_special_tokens=False)
            if k == len(parts) - 1 and traj.status == "truncated":  # the response cap may cut the last one
                assert text.startswith("\n<interpreter>") or "\n<interpreter>\n".startswith(text), text
            else:
                assert text.startswith("\n<interpreter>\n") and text.endswith("\n</interpreter>\n"), text
        else:
            assert all(math.isfinite(lp) and lp <= 0.0 for lp in lps)
    assert traj.metadata["tool_calls"] == len(traj.metadata["tool_statuses"])
    assert sum(m == 0 for m, _, _ in runs(traj)) == traj.metadata["tool_calls"]
    if max_response_tokens is not None:
        assert traj.response_length <= max_response_tokens


def env_texts(traj: Trajectory, tok: Any) -> list[str]:
    return [tok.decode(ids, skip_special_tokens=False) for mask, ids, _ in runs(traj) if mask == 0]


# -- the scripted episodes -----------------------------------------------------------------------
def test_tool_call_runs_in_the_sandbox_and_its_stdout_returns_as_masked_interpreter_tokens(tok, sandboxes):
    policy = ScriptedPolicy(tok, [call("print(12 * 7 + 5)"), "The interpreter says 89. \\boxed{89}"])
    # the recipe's own budgets: 48 tokens a turn, 128 for the whole response
    traj = episode(tok, policy, sandboxes, max_new_tokens=48, max_response_tokens=OPTIONS["max_response_tokens"])

    assert traj.status == "completed"
    assert traj.metadata["tool_statuses"] == ["ok"]
    assert env_texts(traj, tok) == ["\n<interpreter>\n89\n</interpreter>\n"]
    assert_trajectory_invariants(traj, tok, OPTIONS["max_response_tokens"])
    # model turns are trained with their rollout log-probs; the tool output between them is not
    (m1, turn1, lp1), (m2, _, lp2), (m3, turn2, lp3) = runs(traj)
    assert (m1, m2, m3) == (1, 0, 1)
    assert [turn1, turn2] == [list(o) for o in policy.outputs]
    assert set(lp1) == set(lp3) == {POLICY_LOGPROB} and set(lp2) == {0.0}
    assert traj.num_trainable == len(turn1) + len(turn2)
    assert traj.response_text.endswith("\\boxed{89}") and "<interpreter>\n89\n</interpreter>" in traj.response_text
    assert traj.weight_version == 3
    assert len(sandboxes.opened) == 1


def test_the_policy_conditions_on_exactly_the_tokens_recorded(tok, sandboxes):
    policy = ScriptedPolicy(tok, [call("print(6 * 7)"), "\\boxed{42}"])
    traj = episode(tok, policy, sandboxes, question="What is 6 * 7?")
    first, second = policy.requests
    assert list(first.input_ids) == traj.prompt_ids
    # the prompt is the question rendered with the model's own chat template, ready for the assistant turn
    rendered = tok.apply_chat_template([{"role": "user", "content": "What is 6 * 7?"}], add_generation_prompt=True,
                                       tokenize=False)
    assert traj.prompt_ids == tok.encode(rendered, add_special_tokens=False)
    # nothing is re-rendered between turns: the second turn sees prompt + response so far, token for token
    assert list(second.input_ids) == traj.prompt_ids + traj.response_ids[:len(traj.response_ids) - len(policy.outputs[1])]


def test_each_turn_stops_at_the_end_of_a_tool_call_within_the_response_budget(tok, sandboxes):
    policy = ScriptedPolicy(tok, [call("print(1)") + " trailing text the engine never emits", "\\boxed{1}"])
    traj = episode(tok, policy, sandboxes, seed=11, max_new_tokens=40, max_response_tokens=60)
    end = tok.convert_tokens_to_ids("</tool_call>")
    for request in policy.requests:
        assert end in request.sampling.stop_token_ids
        assert request.sampling.seed == 11, "the rollout's sampling seed reaches the engine"
        assert request.sampling.max_new_tokens <= 40
    assert policy.outputs[0][-1] == end
    # the second turn may only use what the first turn and the tool output left of the response budget
    assert policy.requests[1].sampling.max_new_tokens == min(40, 60 - len(traj.response_ids) + len(policy.outputs[1]))
    assert traj.metadata["tool_statuses"] == ["ok"]


def test_a_fenced_python_block_is_run_as_a_tool_call(tok, sandboxes):
    policy = ScriptedPolicy(tok, ["Let me compute.\n```python\nprint(2 ** 10)\n```\n", "\\boxed{1024}"])
    traj = episode(tok, policy, sandboxes)
    assert traj.metadata["tool_statuses"] == ["ok"]
    assert env_texts(traj, tok) == ["\n<interpreter>\n1024\n</interpreter>\n"]
    assert_trajectory_invariants(traj, tok)


def test_code_runs_as_the_sandboxes_own_unprivileged_uid(tok, sandboxes, provider):
    if provider.isolation != "namespaces":
        pytest.skip(f"isolation here is {provider.isolation!r} (not root): no per-sandbox uid")
    policy = ScriptedPolicy(tok, [call("import os; print(os.getuid())"), "\\boxed{0}"])
    traj = episode(tok, policy, sandboxes)
    (shown,) = env_texts(traj, tok)
    uid = int(shown.split("\n")[2])
    low, high = provider.describe()["uid_range"]
    assert low <= uid <= high and uid != os.getuid()


def test_one_sandbox_serves_all_tool_calls_of_an_episode_and_none_other(tok, sandboxes):
    writes = call("open('note.txt', 'w').write('41')")
    reads = call("print(int(open('note.txt').read()) + 1)")
    traj = episode(tok, ScriptedPolicy(tok, [writes, reads, "\\boxed{42}"]), sandboxes, max_turns=3, max_tool_calls=2)
    assert traj.metadata["tool_statuses"] == ["ok", "ok"]
    assert env_texts(traj, tok)[1] == "\n<interpreter>\n42\n</interpreter>\n"
    assert len(sandboxes.opened) == 1

    looks = call("import os; print(os.path.exists('note.txt'))")
    other = episode(tok, ScriptedPolicy(tok, [looks, "\\boxed{0}"]), sandboxes)
    assert env_texts(other, tok) == ["\n<interpreter>\nFalse\n</interpreter>\n"]
    assert len(sandboxes.opened) == 2


def test_max_tool_calls_ends_the_episode_at_the_next_tool_call(tok, sandboxes):
    script = [call(f"print({i})") for i in range(4)] + ["\\boxed{3}"]
    policy = ScriptedPolicy(tok, script)
    traj = episode(tok, policy, sandboxes, max_turns=6, max_tool_calls=2, max_response_tokens=400)
    assert traj.metadata["tool_calls"] == 2 and traj.metadata["tool_statuses"] == ["ok", "ok"]
    assert len(policy.requests) == 3, "the third call is generated, then refused: nothing runs after it"
    assert env_texts(traj, tok) == ["\n<interpreter>\n0\n</interpreter>\n", "\n<interpreter>\n1\n</interpreter>\n"]
    assert runs(traj)[-1][0] == 1, "the episode ends on the policy's turn, not on a tool result"
    assert_trajectory_invariants(traj, tok, 400)


def test_running_out_of_turns_right_after_a_tool_result_is_truncated(tok, sandboxes):
    policy = ScriptedPolicy(tok, [call("print(1)"), call("print(2)")])
    traj = episode(tok, policy, sandboxes, max_turns=2, max_tool_calls=5, max_response_tokens=400)
    assert traj.status == "truncated"
    assert traj.metadata["tool_statuses"] == ["ok", "ok"]
    assert_trajectory_invariants(traj, tok, 400)


def test_a_turn_cut_by_the_token_budget_ends_the_episode_truncated(tok, sandboxes):
    policy = ScriptedPolicy(tok, ["word " * 60])
    traj = episode(tok, policy, sandboxes, max_new_tokens=16)
    assert traj.status == "truncated" and traj.response_length == 16
    assert traj.metadata["tool_calls"] == 0 and sandboxes.opened == []


def test_hostile_snippets_come_back_as_observations_and_the_episode_goes_on(tok, sandboxes, provider):
    busy = call("while True:\n    pass")
    shadow = call("print(open('/etc/shadow').read())")
    policy = ScriptedPolicy(tok, [busy, shadow, "\\boxed{7}"])
    traj = episode(tok, policy, sandboxes, max_turns=3, max_tool_calls=2, max_response_tokens=400)

    assert traj.status == "completed" and len(policy.requests) == 3
    statuses = traj.metadata["tool_statuses"]
    assert statuses[0] == "timeout"
    timeout_shown, shadow_shown = env_texts(traj, tok)
    assert timeout_shown.startswith("\n<interpreter>\ntimeout: ")
    if provider.isolation == "namespaces":  # as root without namespaces, /etc/shadow is readable
        assert statuses[1] == "error"
        assert "PermissionError" in shadow_shown and "root:" not in shadow_shown
    assert traj.response_text.endswith("\\boxed{7}")
    assert_trajectory_invariants(traj, tok, 400)


def test_background_processes_left_by_a_snippet_do_not_outlive_the_episode(tok, sandboxes):
    spawn = call("import subprocess; subprocess.Popen(['sleep', '300']); print('spawned')")
    traj = episode(tok, ScriptedPolicy(tok, [spawn, "\\boxed{1}"]), sandboxes)
    assert env_texts(traj, tok) == ["\n<interpreter>\nspawned\n</interpreter>\n"]
    # the `sandboxes` fixture then checks that no process of the sandbox uids is alive


def test_a_malformed_tool_call_shows_the_error_and_runs_nothing(tok, sandboxes):
    policy = ScriptedPolicy(tok, [call("print(1)", name="shell"), "\\boxed{2}"])
    traj = episode(tok, policy, sandboxes)
    assert traj.status == "completed"
    assert traj.metadata["tool_statuses"] == ["malformed"]
    (shown,) = env_texts(traj, tok)
    assert shown == f"\n<interpreter>\nError: unknown tool 'shell'; the tool is {TOOL_NAME}\n</interpreter>\n"
    assert sandboxes.opened == [], "nothing ran, so no sandbox was opened"
    assert_trajectory_invariants(traj, tok)


def test_an_answer_without_a_tool_call_opens_no_sandbox(tok, sandboxes):
    traj = episode(tok, ScriptedPolicy(tok, ["12 * 7 + 5 = 89. \\boxed{89}"]), sandboxes)
    assert traj.status == "completed" and traj.metadata["tool_calls"] == 0 and traj.metadata["tool_statuses"] == []
    assert set(traj.loss_mask) == {1} and sandboxes.opened == []


def test_the_sandbox_is_closed_when_the_policy_fails_mid_episode(tok, sandboxes):
    policy = ScriptedPolicy(tok, [call("print(1)")])  # the second request finds no script: the engine raises
    with pytest.raises(RuntimeError, match="beyond its script"):
        episode(tok, policy, sandboxes)
    assert len(sandboxes.opened) == 1
    # the `sandboxes` fixture checks the box is closed, its dir gone and no process left


def test_tool_output_never_pushes_the_response_past_max_response_tokens(tok, sandboxes):
    """task.max_response_tokens caps 'the whole response (model + tool output tokens)' (retool.toml)."""
    flood = call("print('9 ' * 500)")  # ~27 tokens of call, then 96 characters of output: ~60 more tokens
    policy = ScriptedPolicy(tok, [flood, "\\boxed{1}"])
    traj = episode(tok, policy, sandboxes, max_response_tokens=48, max_new_tokens=48)
    assert traj.status == "truncated"
    assert_trajectory_invariants(traj, tok, 48)


def test_scenario_rollout_labels_the_trajectory_with_its_task(tok, sandboxes):
    task = Task(id="retool-9", prompt=[{"role": "user", "content": "What is 2 + 2?"}], label=4)
    ctx = RolloutContext(engine=ScriptedPolicy(tok, [call("print(2 + 2)"), "\\boxed{4}"]), tokenizer=tok,
                         sampling=SamplingParams(max_new_tokens=48), options=OPTIONS, rng=random.Random(0),
                         sandboxes=sandboxes)
    traj = asyncio.run(SCENARIO.rollout(ctx, task))
    assert traj.task_id == "retool-9"
    assert "What is 2 + 2?" in tok.decode(traj.prompt_ids)
    assert SCENARIO.reward(task, traj) == 1.0


# -- the real engine -----------------------------------------------------------------------------
def test_real_reference_engine_episodes_keep_the_trajectory_invariants(tok, model_dir, sandboxes):
    """The untrained tiny model writes whatever it writes; the trajectory must stay well-formed anyway."""
    engine = ReferenceEngine.create(model_dir, tokenizer=tok, dtype="float32", device=torch.device("cpu"), seed=0)
    options = {**OPTIONS, "max_response_tokens": 64}

    async def many() -> list[Trajectory]:
        async def one(seed: int) -> Trajectory:
            ctx = RolloutContext(engine=engine, tokenizer=tok, sampling=SamplingParams(max_new_tokens=24, seed=seed),
                                 options=options, rng=random.Random(seed), sandboxes=sandboxes)
            return await run_episode(ctx, "What is 12 * 7 + 5?", options)

        return list(await asyncio.gather(*(one(seed) for seed in range(8))))

    for traj in asyncio.run(many()):
        assert traj.status in ("completed", "truncated")
        assert traj.num_trainable > 0
        assert_trajectory_invariants(traj, tok, 64)


def test_a_boxed_answer_printed_by_the_tool_is_not_the_policys_answer():
    """The answer is graded on what the policy wrote: code printing \\boxed{...} cannot answer for it."""
    from agentbench_npu.types import Task, Trajectory
    from agentbench_npu_retool.scenario import NO_ANSWER, RetoolScenario

    traj = Trajectory(prompt_ids=[1])
    traj.response_text = "<tool_call>...</tool_call>\n<interpreter>\n\\boxed{89}\n</interpreter>\n"
    traj.metadata.update({"policy_text": "<tool_call>...</tool_call>", "tool_calls": 1})
    assert RetoolScenario().reward(Task(id="t", prompt="q", label=89), traj) == NO_ANSWER
