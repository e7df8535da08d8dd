"""The retool plugin's pure parts, without a model or a sandbox: what counts as a tool call, what the policy
sees of an execution, the reward, the tasks (generated and from a file), the warm-start demonstrations and
the step metrics. Each test name states the behaviour it pins down."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from agentbench_npu_retool.agent import TOOL_NAME, Action, observation, parse_action
from agentbench_npu_retool.scenario import RetoolScenario, reward_for
from agentbench_npu_retool.tasks import dataset_tasks, generated_tasks, load_dataset

from agentbench_npu.errors import UserError
from agentbench_npu.sandbox.base import ExecResult
from agentbench_npu.types import Task, Trajectory

SCENARIO = RetoolScenario()
# the scenario's own defaults, as the runner hands them to tasks(), rollout() and demonstrations()
OPTIONS = dict(SCENARIO.recipe().values["task"])


def tool_call(name: str = TOOL_NAME, arguments: object = None) -> str:
    """A Qwen-format tool call, as the policy writes it."""
    body = json.dumps({"name": name, "arguments": {"code": "print(6 * 7)"} if arguments is None else arguments})
    return f"Let me compute it.\n<tool_call>\n{body}\n</tool_call>"


# -- parse_action ---------------------------------------------------------------------------------
def test_qwen_tool_call_json_yields_its_code():
    assert parse_action(tool_call()) == Action(code="print(6 * 7)")


def test_tool_call_whose_arguments_are_a_json_string_yields_its_code():
    text = tool_call(arguments=json.dumps({"code": "print(2 ** 10)"}))
    assert parse_action(text) == Action(code="print(2 ** 10)")


def test_bare_snippet_inside_tool_call_tags_is_run_as_code():
    assert parse_action("<tool_call>\nprint(12 * 7)\n</tool_call>") == Action(code="print(12 * 7)")


def test_fenced_python_block_is_a_tool_call():
    action = parse_action("I will use Python.\n```python\nprint(3 + 4)\n```\n")
    assert action.error == ""
    assert action.code is not None and action.code.strip() == "print(3 + 4)"


def test_the_last_tool_call_of_a_turn_is_the_one_run():
    text = tool_call(arguments={"code": "print(1)"}) + "\n" + tool_call(arguments={"code": "print(2)"})
    assert parse_action(text).code == "print(2)"


def test_unknown_tool_name_is_an_error_action_naming_it_and_the_real_tool():
    action = parse_action(tool_call(name="web_search", arguments={"query": "x"}))
    assert action.code is None
    assert action.error.startswith("Error:")
    assert "web_search" in action.error and TOOL_NAME in action.error


@pytest.mark.parametrize("arguments", [{}, {"code": ""}, {"code": "   \n"}, {"code": 42}, {"source": "print(1)"}],
                         ids=["no-arguments", "empty", "blank", "not-a-string", "wrong-key"])
def test_tool_call_without_code_is_an_error_action(arguments):
    action = parse_action(tool_call(arguments=arguments))
    assert action.code is None
    assert action.error == "Error: no code in the tool call"


def test_tool_call_with_unparseable_string_arguments_is_an_error_action():
    action = parse_action(tool_call(arguments="{not json"))
    assert action == Action(None, "Error: arguments must be JSON")


def test_tool_call_that_is_json_but_not_an_object_is_an_error_action():
    action = parse_action('<tool_call>["code_interpreter", "print(1)"]</tool_call>')
    assert action.code is None and "JSON object" in action.error


@pytest.mark.parametrize("text", ["The answer is \\boxed{42}.", "", "print(6 * 7)", "```\nprint(1)\n```\n"],
                         ids=["answer", "empty", "unmarked-code", "unlabelled-fence"])
def test_plain_text_is_no_action(text):
    assert parse_action(text) == Action(code=None, error="")


# -- observation ---------------------------------------------------------------------------------
def result(status: str, stdout: str = "", stderr: str = "", exit_code: int | None = 0, detail: str = "") -> ExecResult:
    return ExecResult(status, exit_code, stdout, stderr, 0.01, detail=detail)  # type: ignore[arg-type]


def test_ok_execution_shows_stripped_stdout_inside_interpreter_tags():
    assert observation(result("ok", "84\n"), 96) == "\n<interpreter>\n84\n</interpreter>\n"


def test_ok_execution_without_output_says_so():
    assert observation(result("ok", "  \n"), 96) == "\n<interpreter>\n(no output)\n</interpreter>\n"


def test_error_shows_only_the_last_nonblank_stderr_line():
    stderr = ('Traceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
              "ZeroDivisionError: division by zero\n\n")
    shown = observation(result("error", "partial\n", stderr, exit_code=1, detail="exit code 1"), 96)
    assert shown == "\n<interpreter>\nZeroDivisionError: division by zero\n</interpreter>\n"


def test_error_without_stderr_shows_the_exit_code():
    assert observation(result("error", exit_code=3), 96) == "\n<interpreter>\nexit code 3\n</interpreter>\n"


@pytest.mark.parametrize("status", ["timeout", "memory", "killed", "output_truncated"])
def test_other_failures_show_status_and_detail(status):
    shown = observation(result(status, "some output", exit_code=None, detail="why it stopped"), 96)
    assert shown == f"\n<interpreter>\n{status}: why it stopped\n</interpreter>\n"


def test_output_longer_than_the_limit_is_cut_at_the_limit_and_marked():
    shown = observation(result("ok", "7" * 500), 96)
    assert shown == "\n<interpreter>\n" + "7" * 96 + "...\n</interpreter>\n"


def test_output_exactly_at_the_limit_is_not_cut():
    assert observation(result("ok", "7" * 96), 96) == "\n<interpreter>\n" + "7" * 96 + "\n</interpreter>\n"


# -- reward --------------------------------------------------------------------------------------
def test_correct_answer_scores_1_whatever_the_tool_use():
    assert [reward_for("42", True, n) for n in (0, 1, 2, 10)] == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("calls,expected", [(0, -1.1), (1, -1.05), (2, -1.0), (4, -0.9), (10, -0.6), (30, -0.6)])
def test_wrong_answer_scores_slime_style_minus_1_plus_0_05_per_call_beyond_two_capped_at_minus_0_6(calls, expected):
    # slime examples/retool reward_func: min(-0.6, score + (tool_call_count - 2) / 2 * 0.1) for score -1
    assert reward_for("41", False, calls) == pytest.approx(expected)
    assert reward_for("41", False, calls) <= -0.6


@pytest.mark.parametrize("calls", [0, 2, 10, 30])
def test_no_boxed_answer_scores_minus_1_1_however_many_tool_calls(calls):
    # the one departure from slime: calling the tool instead of answering earns no bonus
    assert reward_for(None, False, calls) == pytest.approx(-1.1)


def test_scenario_reward_reads_the_last_boxed_answer_and_records_correctness():
    task = Task(id="t", prompt="What is 6 * 7?", label=42)
    right = Trajectory(prompt_ids=[1], response_text="\\boxed{41} no wait \\boxed{42}", metadata={"tool_calls": 1})
    wrong = Trajectory(prompt_ids=[1], response_text="\\boxed{41}", metadata={"tool_calls": 4})
    unboxed = Trajectory(prompt_ids=[1], response_text="42", metadata={"tool_calls": 10})
    assert SCENARIO.reward(task, right) == 1.0
    assert (right.metadata["correct"], right.metadata["answered"]) == (True, True)
    assert SCENARIO.reward(task, wrong) == pytest.approx(-0.9)
    assert (wrong.metadata["correct"], wrong.metadata["answered"]) == (False, True)
    assert SCENARIO.reward(task, unboxed) == pytest.approx(-1.1)
    assert (unboxed.metadata["correct"], unboxed.metadata["answered"]) == (False, False)


# -- generated tasks -----------------------------------------------------------------------------
def test_generated_tasks_are_a_function_of_seed_and_cursor():
    assert generated_tasks(OPTIONS, 0, 5, 4) == generated_tasks(OPTIONS, 0, 5, 4)
    # the cursor addresses one stream: a window read later equals the same slice of a longer read
    assert generated_tasks(OPTIONS, 0, 0, 9)[5:9] == generated_tasks(OPTIONS, 0, 5, 4)
    assert SCENARIO.tasks(OPTIONS, 3, 2, 4) == generated_tasks(OPTIONS, 3, 2, 4)


def test_generated_tasks_differ_across_seeds():
    a = [t.prompt for t in generated_tasks(OPTIONS, 0, 0, 16)]
    b = [t.prompt for t in generated_tasks(OPTIONS, 1, 0, 16)]
    assert sum(x != y for x, y in zip(a, b)) >= 12, (a, b)


def test_generated_task_label_is_the_value_of_its_expression_and_ids_are_unique():
    tasks = generated_tasks(OPTIONS, 7, 0, 200)
    for task in tasks:
        assert task.label == eval(task.metadata["expr"]), task  # our own template, never model output
        assert isinstance(task.prompt, str) and task.prompt.strip()
    assert [t.id for t in tasks] == [f"retool-{i}" for i in range(200)]


def test_word_problem_fraction_chooses_between_arithmetic_and_word_problems():
    plain = generated_tasks({**OPTIONS, "word_problem_fraction": 0.0}, 0, 0, 50)
    words = generated_tasks({**OPTIONS, "word_problem_fraction": 1.0}, 0, 0, 50)
    assert all(t.prompt.startswith("What is ") for t in plain)
    assert not any(t.prompt.startswith("What is ") for t in words)
    mixed = generated_tasks(OPTIONS, 0, 0, 400)
    share = sum(not t.prompt.startswith("What is ") for t in mixed) / len(mixed)
    assert abs(share - OPTIONS["word_problem_fraction"]) < 0.08, share


# -- dataset files -------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[object]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_jsonl_rows_with_prompt_and_label_become_tasks(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [{"prompt": "What is 1 + 1?", "label": 2},
                                                 {"id": "q7", "prompt": "What is 2 + 5?", "label": "7"}])
    tasks = load_dataset(path)
    assert [(t.id, t.prompt, t.label) for t in tasks] == [("row-0", "What is 1 + 1?", 2), ("q7", "What is 2 + 5?", "7")]


def test_verl_style_rows_take_the_last_user_turn_and_the_ground_truth(tmp_path):
    row = {"data_source": "math_dapo",
           "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                      {"role": "assistant", "content": "..."}, {"role": "user", "content": "What is 3 * 3?"}],
           "reward_model": {"style": "rule", "ground_truth": "9"}}
    (task,) = load_dataset(write_jsonl(tmp_path / "dapo.jsonl", [row]))
    assert (task.prompt, task.label) == ("What is 3 * 3?", "9")


def test_blank_lines_in_a_jsonl_file_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "gaps.jsonl", [{"prompt": "a?", "label": 1}, "", "   ", {"prompt": "b?", "label": 2}])
    assert [t.prompt for t in load_dataset(path)] == ["a?", "b?"]


def test_dataset_tasks_are_a_deterministic_shuffle_from_seed_and_cursor(tmp_path):
    path = write_jsonl(tmp_path / "ten.jsonl", [{"prompt": f"q{i}?", "label": i} for i in range(10)])
    first = dataset_tasks(path, 0, 0, 10)
    assert sorted(t.label for t in first) == list(range(10)), "one epoch visits every row once"
    assert dataset_tasks(path, 0, 3, 4) == first[3:7]
    assert SCENARIO.tasks({**OPTIONS, "dataset": path}, 0, 3, 4) == first[3:7]


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok?", "label": 1}, '{"prompt": "oops", '])
    with pytest.raises(UserError, match=f"^{path}:2: not valid JSON"):
        load_dataset(path)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "What is 1 + 1?"}, "no answer; give 'label' or 'reward_model.ground_truth'"),
    ({"prompt": "What is 1 + 1?", "reward_model": {"style": "rule"}}, "no answer"),
    ({"label": 2}, "'prompt' must be a string or chat messages"),
    ({"prompt": [{"role": "system", "content": "x"}], "label": 2}, "'prompt' must be"),
    ([1, 2], "expected an object"),
], ids=["no-label", "no-ground-truth", "no-prompt", "no-user-turn", "not-an-object"])
def test_unusable_row_names_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "fine?", "label": 1}, row])
    with pytest.raises(UserError, match=f"^{path}:2: ") as info:
        load_dataset(path)
    assert message in str(info.value)


def test_missing_dataset_file_is_a_user_error_naming_task_dataset(tmp_path):
    path = str(tmp_path / "nonexistent.jsonl")
    with pytest.raises(UserError, match="task.dataset") as info:
        SCENARIO.tasks({**OPTIONS, "dataset": path}, 0, 0, 1)
    assert path in str(info.value)


def test_empty_dataset_file_is_a_user_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="has no rows"):
        load_dataset(str(path))


def test_parquet_without_pyarrow_is_a_user_error_naming_the_extra(tmp_path, monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow.parquet` now raises ImportError
    path = tmp_path / "dapo.parquet"
    path.write_bytes(b"PAR1 not really parquet PAR1")
    with pytest.raises(UserError, match=r"pip install 'agentbench-npu-retool\[parquet\]'"):
        load_dataset(str(path))


def test_parquet_rows_become_tasks(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": "What is 4 * 4?"}], "reward_model": {"ground_truth": "16"}},
    ]), path)
    (task,) = load_dataset(str(path))
    assert (task.prompt, task.label) == ("What is 4 * 4?", "16")


# -- warm-start demonstrations -------------------------------------------------------------------
def segments(response: object) -> list[tuple[str, bool]]:
    """A demonstration's response as (text, trained) segments; plain text is one trained segment."""
    return [(response, True)] if isinstance(response, str) else list(response)  # type: ignore[arg-type]


def test_demonstrations_are_deterministic_from_the_seed():
    assert SCENARIO.demonstrations(OPTIONS, 50, 3) == SCENARIO.demonstrations(OPTIONS, 50, 3)
    assert SCENARIO.demonstrations(OPTIONS, 50, 3) != SCENARIO.demonstrations(OPTIONS, 50, 4)


def test_tool_demos_mark_only_the_interpreter_segment_untrained():
    demos = SCENARIO.demonstrations(OPTIONS, 200, 0)
    tool_demos = [r for _, r in demos if not isinstance(r, str)]
    assert tool_demos, "some demonstrations must call the tool"
    for response in tool_demos:
        parts = segments(response)
        assert [trained for _, trained in parts] == [True, False, True], parts
        assert "<interpreter>" in parts[1][0]
        assert all("<interpreter>" not in text for text, trained in parts if trained)
    for _, response in demos:
        if isinstance(response, str):
            assert "<tool_call>" not in response and "<interpreter>" not in response


def test_tool_demos_speak_the_agent_protocol_exactly():
    """What the policy imitates must be what the agent parses and what it appends after running the code."""
    for messages, response in SCENARIO.demonstrations(OPTIONS, 200, 1):
        assert messages[-1]["role"] == "user"
        if isinstance(response, str):
            continue
        (call, _), (shown, _), (answer, _) = response
        action = parse_action(call)
        assert action.error == "" and action.code is not None and action.code.startswith("print(")
        value = eval(action.code[len("print("):-1])
        assert shown == observation(result("ok", f"{value}\n"), OPTIONS["observation_chars"])
        assert answer.startswith("\\boxed{")


def test_share_of_tool_demos_follows_demo_tool_fraction():
    for fraction in (OPTIONS["demo_tool_fraction"], 0.2):
        demos = SCENARIO.demonstrations({**OPTIONS, "demo_tool_fraction": fraction}, 1000, 0)
        share = sum(not isinstance(r, str) for _, r in demos) / len(demos)
        assert abs(share - fraction) < 0.05, (fraction, share)


def test_demonstrations_include_the_system_prompt_when_one_is_set():
    demos = SCENARIO.demonstrations({**OPTIONS, "system_prompt": "Use the tool."}, 5, 0)
    assert all(m[0] == {"role": "system", "content": "Use the tool."} for m, _ in demos)
    assert all(m[0]["role"] == "user" for m, _ in SCENARIO.demonstrations(OPTIONS, 5, 0))


# -- step metrics --------------------------------------------------------------------------------
def traj(**metadata: object) -> Trajectory:
    return Trajectory(prompt_ids=[1], metadata=dict(metadata))


def test_step_metrics_count_accuracy_tool_use_and_tool_errors():
    trajectories = [
        traj(tool_calls=2, tool_statuses=["ok", "error"], correct=True, answered=True),
        traj(tool_calls=1, tool_statuses=["ok"], correct=True, answered=True),
        traj(tool_calls=1, tool_statuses=["malformed"], correct=False, answered=True),
        traj(tool_calls=0, tool_statuses=[], correct=False, answered=False),
    ]
    assert SCENARIO.step_metrics(trajectories) == pytest.approx({
        "accuracy": 2 / 4, "answer_rate": 3 / 4, "tool_call_rate": 3 / 4, "tool_calls_mean": 4 / 4,
        "tool_error_rate": 2 / 4,
    })


ZEROS = {"accuracy": 0.0, "answer_rate": 0.0, "tool_call_rate": 0.0, "tool_calls_mean": 0.0, "tool_error_rate": 0.0}


def test_step_metrics_of_trajectories_without_tool_use_or_metadata_are_zero():
    assert SCENARIO.step_metrics([traj(), traj(tool_calls=0, tool_statuses=[])]) == ZEROS


def test_step_metrics_of_an_empty_batch_are_zero_not_a_division_error():
    assert SCENARIO.step_metrics([]) == ZEROS
