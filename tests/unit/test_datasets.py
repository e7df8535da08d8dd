"""JSONL task files (errors name file:line) and `take`: a deterministic, resumable, per-epoch shuffle."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from agentbench_npu.datasets import load_jsonl_tasks, read_rows, take
from agentbench_npu.errors import UserError
from agentbench_npu.types import Task


def write_lines(tmp_path, *lines: str, name: str = "tasks.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(**fields) -> str:
    return json.dumps(fields)


def load_error(path) -> str:
    with pytest.raises(UserError) as info:
        load_jsonl_tasks(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- loading ---------------------------------------------------------------------------------------
def test_each_line_becomes_a_task_with_its_prompt_label_id_and_other_fields_as_metadata(tmp_path):
    path = write_lines(tmp_path, row(prompt="1+1?", label=2, source="gsm"), row(id="q7", prompt="2+2?", label="4"))
    first, second = load_jsonl_tasks(path)
    assert first == Task(id="tasks-1", prompt="1+1?", label=2, metadata={"source": "gsm"})
    assert (second.id, second.prompt, second.label) == ("q7", "2+2?", "4")


def test_blank_lines_are_skipped_and_line_numbers_still_count_them(tmp_path):
    path = write_lines(tmp_path, row(prompt="a", label=1), "", "   ", row(prompt="b", label=2))
    tasks = load_jsonl_tasks(path)
    assert [t.prompt for t in tasks] == ["a", "b"]
    assert [t.id for t in tasks] == ["tasks-1", "tasks-4"]


def test_a_prompt_may_be_a_list_of_chat_messages(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    tasks = load_jsonl_tasks(write_lines(tmp_path, row(prompt=messages, label=2)))
    assert tasks[0].prompt == messages


def test_prompt_and_label_keys_can_be_renamed(tmp_path):
    path = write_lines(tmp_path, row(question="q", answer="a"))
    tasks = load_jsonl_tasks(path, prompt_key="question", label_key="answer")
    assert (tasks[0].prompt, tasks[0].label, tasks[0].metadata) == ("q", "a", {})


def test_a_malformed_json_line_names_the_file_and_line(tmp_path):
    path = write_lines(tmp_path, row(prompt="a", label=1), '{"prompt": "b", "label": ')
    message = load_error(path)
    assert message.startswith(f"{path}:2: not valid JSON (")


def test_a_missing_label_names_the_field_and_the_line(tmp_path):
    path = write_lines(tmp_path, row(prompt="a", label=1), row(prompt="b", answer=2))
    assert load_error(path) == f"{path}:2: missing field 'label'"


def test_a_missing_prompt_and_label_are_both_named(tmp_path):
    path = write_lines(tmp_path, row(text="a"))
    assert load_error(path) == f"{path}:1: missing field 'prompt', 'label'"


def test_a_line_that_is_not_an_object_is_refused(tmp_path):
    path = write_lines(tmp_path, "[1, 2]")
    assert load_error(path).startswith(f"{path}:1: expected a JSON object with 'prompt' and 'label'")


@pytest.mark.parametrize("prompt", [3, None, {"role": "user"}, ["just text"]])
def test_a_prompt_that_is_neither_text_nor_chat_messages_is_refused(tmp_path, prompt):
    path = write_lines(tmp_path, row(prompt=prompt, label=1))
    assert load_error(path) == f"{path}:1: 'prompt' must be a string or a list of chat messages"


def test_a_file_with_no_tasks_is_an_error(tmp_path):
    path = write_lines(tmp_path, "", "  ")
    assert load_error(path) == f"dataset '{path}' has no tasks"


def test_a_missing_file_says_to_set_data_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert load_error(path) == f"dataset '{path}' does not exist; set data.path to a JSONL file"


# -- take ------------------------------------------------------------------------------------------
TASKS = [Task(id=f"t{i}", prompt=f"p{i}", label=i) for i in range(7)]


def ids(tasks: list[Task]) -> list[str]:
    return [t.id for t in tasks]


def test_take_is_deterministic_for_a_seed():
    assert ids(take(TASKS, seed=3, cursor=0, count=20)) == ids(take(TASKS, seed=3, cursor=0, count=20))


def test_take_depends_on_the_seed():
    assert ids(take(TASKS, seed=3, cursor=0, count=7)) != ids(take(TASKS, seed=4, cursor=0, count=7))


def test_each_epoch_covers_every_task_exactly_once():
    n = len(TASKS)
    drawn = take(TASKS, seed=0, cursor=0, count=3 * n)
    for epoch in range(3):
        assert Counter(ids(drawn[epoch * n:(epoch + 1) * n])) == Counter(ids(TASKS))


def test_epochs_are_shuffled_differently():
    n = len(TASKS)
    drawn = ids(take(TASKS, seed=0, cursor=0, count=3 * n))
    epochs = [drawn[e * n:(e + 1) * n] for e in range(3)]
    assert len({tuple(e) for e in epochs}) > 1


def test_taking_in_pieces_from_a_cursor_resumes_exactly_where_it_left_off():
    whole = ids(take(TASKS, seed=11, cursor=0, count=17))
    pieces: list[str] = []
    cursor = 0
    for count in (3, 5, 1, 8):
        pieces += ids(take(TASKS, seed=11, cursor=cursor, count=count))
        cursor += count
    assert pieces == whole


def test_take_of_zero_tasks_is_empty():
    assert take(TASKS, seed=0, cursor=5, count=0) == []


# -- read_rows: the row reader scenario loaders share ------------------------------------------------------
def read(path) -> list:
    return read_rows(str(path), "task.qa", 'set task.qa=""', "pkg[parquet]")


def test_read_rows_names_each_row_by_file_and_line_item_or_row(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": 1}\n\n{"q": 2}\n')
    assert read(tmp_path / "a.jsonl") == [(f"{tmp_path}/a.jsonl:1", {"q": 1}), (f"{tmp_path}/a.jsonl:3", {"q": 2})]
    (tmp_path / "b.json").write_text('[{"q": 1}, {"q": 2}]')
    assert [where for where, _ in read(tmp_path / "b.json")] == [f"{tmp_path}/b.json:item 1", f"{tmp_path}/b.json:item 2"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": [1, 2]}), tmp_path / "c.parquet")
    assert read(tmp_path / "c.parquet") == [(f"{tmp_path}/c.parquet:row 1", {"q": 1}), (f"{tmp_path}/c.parquet:row 2", {"q": 2})]


@pytest.mark.parametrize("name, content, says", [
    ("missing.jsonl", None, "task.qa '{path}' does not exist; give a JSONL or parquet file, or set task.qa=\"\""),
    ("empty.jsonl", b"\n\n", "task.qa '{path}' has no rows; set task.qa=\"\""),
    ("bad.jsonl", b'{"q": 1}\n{"q": \n', "{path}:2: not valid JSON"),
    ("latin1.jsonl", '{"q": "caf\xe9"}\n'.encode("latin-1"), "{path}: not UTF-8 text"),
    ("corrupt.parquet", b"not parquet at all", "task.qa '{path}' is not a readable parquet file"),
], ids=["missing", "empty", "invalid-json", "not-utf8", "corrupt-parquet"])
def test_read_rows_refuses_bad_files_with_one_line_naming_the_file(tmp_path, name, content, says):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        read(path)
    message = str(caught.value)
    assert message.startswith(says.format(path=path)) and "\n" not in message, message
