"""The search_r1 plugin's data: SQuAD-style exact match, the QA file loader (every row shape Search-R1,
FlashRAG and HotpotQA use) and the generated knowledge base the tiny profile ships. Each test name states
the behaviour it pins down."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from agentbench_npu_search_r1.kb import generate_kb, shipped_paths, write_kb
from agentbench_npu_search_r1.qa import (
    exact_match,
    golden_answers,
    load_qa,
    normalize_answer,
)

from agentbench_npu.errors import UserError


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# -- normalize_answer / exact_match -----------------------------------------------------------------
@pytest.mark.parametrize("raw, normal", [
    ("The Eiffel Tower", "eiffel tower"),
    ("an apple a day", "apple day"),
    ("Theatre and another", "theatre and another"),  # articles only as whole words
    ("U.S.A.!", "usa"),
    ("  New   York\n City ", "new york city"),
    ("PARIS", "paris"),
])
def test_normalisation_lowercases_drops_punctuation_articles_and_extra_spaces(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_is_true_when_any_golden_answer_matches_after_normalisation():
    assert exact_match("the  Beatles.", ["Rolling Stones", "Beatles"])


def test_exact_match_is_false_when_no_golden_answer_matches():
    assert not exact_match("Beatles band", ["Rolling Stones", "Beatles"])


def test_exact_match_of_no_prediction_or_a_blank_one_is_false():
    assert not exact_match(None, ["Beatles"])
    assert not exact_match("", [""])
    assert not exact_match("the", ["a"])


def test_exact_match_treats_a_bare_string_as_one_golden_answer_not_its_letters():
    assert exact_match("paris", "Paris")
    assert not exact_match("p", "Paris")


# -- golden_answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("label, answers", [
    ("Paris", ["Paris"]),
    (["Paris", "Paris, France"], ["Paris", "Paris, France"]),
    ({"target": ["1969", "July 1969"]}, ["1969", "July 1969"]),
    (1969, ["1969"]),
    ([1969, 3.0, 2.5], ["1969", "3", "2.5"]),
    ({"target": 42}, ["42"]),
])
def test_golden_answers_accepts_a_string_a_list_and_search_r1_target_dict(label, answers):
    assert golden_answers(label) == answers


@pytest.mark.parametrize("label", [{"answer": "x"}, [], [""], [None], [True], 3 + 0j])
def test_golden_answers_rejects_labels_without_a_usable_answer(label):
    with pytest.raises(ValueError):
        golden_answers(label)


# -- load_qa: row shapes ----------------------------------------------------------------------------
def test_flashrag_jsonl_rows_keep_id_question_and_golden_answers(tmp_path):
    path = write_jsonl(tmp_path / "nq.jsonl", [
        {"id": "test_0", "question": "who got the first nobel prize in physics", "golden_answers": ["Wilhelm Conrad Röntgen"]},
    ])
    (task,) = load_qa(path)
    assert (task.id, task.prompt, task.label, task.metadata) == (
        "test_0", "who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"], {})


def test_search_r1_parquet_rows_read_question_target_and_data_source(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    chat = [{"role": "user", "content": "Answer the given question. Question: who wrote hamlet"}]
    rows = [
        {"id": "train_0", "question": "who wrote hamlet", "prompt": chat, "data_source": "nq",
         "reward_model": {"style": "rule", "ground_truth": {"target": ["Shakespeare", "William Shakespeare"]}}},
        {"id": "train_1", "question": None, "prompt": chat, "data_source": "nq",
         "reward_model": {"style": "rule", "ground_truth": {"target": ["Shakespeare"]}}},
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    first, second = load_qa(str(path))
    assert first.prompt == "who wrote hamlet"  # no '?' added: kept as the file has it
    assert first.label == ["Shakespeare", "William Shakespeare"]
    assert first.metadata == {"data_source": "nq"}
    assert second.prompt == chat[0]["content"]  # no question: the last user message


def test_hotpotqa_rows_use_underscore_id_and_single_answer(tmp_path):
    path = write_jsonl(tmp_path / "hotpot.jsonl", [{"_id": "5a8b57f2", "question": "Were Scott Derrickson and "
                                                    "Ed Wood of the same nationality?", "answer": "yes"}])
    (task,) = load_qa(path)
    assert (task.id, task.label) == ("5a8b57f2", ["yes"])


def test_hotpotqa_json_array_files_load_like_jsonl(tmp_path):
    path = tmp_path / "hotpot_dev.json"
    path.write_text(json.dumps([{"_id": "a1", "question": "q?", "answer": "no"}]), encoding="utf-8")
    assert [(t.id, t.label) for t in load_qa(str(path))] == [("a1", ["no"])]


def test_plain_question_answer_rows_get_an_id_from_the_file_and_position(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"question": "q1", "answer": 7}, {"question": "q2", "answer": "b"}])
    assert [(t.id, t.prompt, t.label) for t in load_qa(path)] == [("plain-0", "q1", ["7"]), ("plain-1", "q2", ["b"])]


# -- load_qa: errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("row, words", [
    ({"id": 1, "golden_answers": ["x"]}, ["'question'", "'prompt'"]),
    ({"question": "q"}, ["no answer", "'golden_answers'", "'answer'", "reward_model.ground_truth.target"]),
    ({"question": "q", "golden_answers": []}, ["'golden_answers'", "no non-empty answer"]),
    ({"question": "q", "reward_model": {"ground_truth": {"answers": ["x"]}}}, ["'reward_model.ground_truth'", "'target'"]),
    (["q", "a"], ["expected an object", "'question'"]),
])
def test_bad_rows_are_user_errors_naming_file_line_and_field(tmp_path, row, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok", "answer": "a"}) + "\n\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_qa(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}:3: ")
    assert "\n" not in message
    for word in words:
        assert word in message


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{path}:2: not valid JSON")):
        load_qa(str(path))


def test_bad_parquet_rows_name_file_and_row(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}, {"question": "q", "answer": None}]), path)
    with pytest.raises(UserError, match=re.escape(f"{path}:row 2: no answer")):
        load_qa(str(path))


def test_parquet_without_pyarrow_says_which_extra_to_install(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=re.escape("pip install 'agentbench-npu-search-r1[parquet]'")):
        load_qa(str(path))


@pytest.mark.parametrize("make", [lambda d: str(d / "missing.jsonl"), lambda d: ""])
def test_missing_file_names_task_qa_and_the_shipped_fallback(tmp_path, make):
    with pytest.raises(UserError) as caught:
        load_qa(make(tmp_path))
    assert "does not exist" in str(caught.value) and 'task.qa=""' in str(caught.value)


def test_empty_file_names_task_qa_and_the_shipped_fallback(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"task\.qa '.*empty\.jsonl' has no rows; .*task\.qa=\"\""):
        load_qa(str(path))


# -- the knowledge base -----------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_files_are_exactly_what_write_kb_makes_with_the_defaults(tmp_path):
    corpus_file, qa_file = shipped_paths()
    assert (read_jsonl(corpus_file), read_jsonl(qa_file)) == generate_kb()
    fresh = write_kb(tmp_path)
    assert [p.name for p in fresh] == ["corpus.jsonl", "qa.jsonl"]
    assert [p.read_bytes() for p in fresh] == [corpus_file.read_bytes(), qa_file.read_bytes()]


def test_shipped_questions_load_as_tasks_with_their_answers():
    tasks = load_qa(str(shipped_paths()[1]))
    _, qa = generate_kb()
    assert [(t.id, t.prompt, t.label) for t in tasks] == [(r["id"], r["question"], r["golden_answers"]) for r in qa]


def test_kb_has_two_string_id_documents_per_entity_and_one_question_per_document():
    corpus, qa = generate_kb()
    ids = [doc["id"] for doc in corpus]
    assert len(ids) == len(set(ids)) == 3 * 80 * 2
    assert all(isinstance(i, str) for i in ids)
    assert [row["id"] for row in qa] == ids == sorted(ids)


def test_kinds_share_numbers_so_the_kind_word_matters():
    corpus, _ = generate_kb()
    numbers = {kind: {d["id"].split("-")[1] for d in corpus if d["id"].startswith(kind)} for kind in ("item", "order", "user")}
    assert all(len(n) == 80 and all(len(x) == 3 for x in n) for n in numbers.values())
    assert numbers["item"] & numbers["order"] and numbers["order"] & numbers["user"] and numbers["item"] & numbers["user"]


def test_documents_are_search_r1_style_title_line_then_the_fact():
    corpus, _ = generate_kb()
    for doc in corpus:
        kind, number, attribute = doc["id"].split("-")
        title, text = doc["contents"].split("\n")
        assert title == f'"{kind} {number}"'
        assert re.fullmatch(rf"The {attribute} of {kind} {number} is \w+\.", text)


def test_every_answer_is_stated_in_the_document_with_the_same_id():
    corpus, qa = generate_kb()
    contents = {doc["id"]: doc["contents"] for doc in corpus}
    for row in qa:
        (answer,) = row["golden_answers"]
        assert contents[row["id"]].endswith(f" is {answer}.")


def test_a_number_answer_is_never_an_entity_number_except_a_users_order():
    corpus, qa = generate_kb()
    entities = {doc["id"].split("-")[1] for doc in corpus}
    numeric = [row for row in qa if row["golden_answers"][0].isdigit()]
    assert {row["id"].split("-", 2)[2] for row in numeric} == {"price", "code", "total", "order"}
    for row in numeric:
        (answer,) = row["golden_answers"]
        assert (answer in entities) == row["id"].endswith("-order"), row


def test_attribute_values_come_from_the_stated_vocabularies():
    _, qa = generate_kb()
    values: dict[str, set[str]] = defaultdict(set)
    for row in qa:
        kind, _, attribute = row["id"].split("-")
        values[f"{kind}-{attribute}"].add(row["golden_answers"][0])
    assert set(values) == {"item-price", "item-code", "order-total", "order-status", "user-status", "user-order"}
    assert values["order-status"] <= {"shipped", "cancelled", "returned", "pending"}
    assert values["user-status"] <= {"active", "closed", "pending", "blocked"}
    assert all(10 <= int(v) <= 9999 for key in ("item-price", "item-code", "order-total") for v in values[key])
    orders = {row["id"].split("-")[1] for row in qa if row["id"].startswith("order-")}
    assert values["user-order"] <= orders  # a real order, so two-hop questions can be built on it


def test_kb_is_deterministic_for_a_seed_and_differs_for_another():
    assert generate_kb(seed=3) == generate_kb(seed=3)
    assert generate_kb(seed=3) != generate_kb(seed=4)
    assert len(generate_kb(seed=1, per_kind=5)[0]) == 30


def test_every_question_words_its_entity_and_attribute_and_its_document_holds_both():
    corpus, qa = generate_kb()
    contents = {doc["id"]: doc["contents"] for doc in corpus}
    for row in qa:
        kind, number, attribute = row["id"].split("-")
        assert f"{kind} {number}" in row["question"] and attribute in row["question"]
        assert f"{kind} {number}" in contents[row["id"]] and f" {attribute} " in contents[row["id"]]


def test_bm25_ranks_each_questions_own_document_first():
    corpus, qa = generate_kb()
    docs = [Counter(re.findall(r"\w+", d["contents"].lower())) for d in corpus]
    avg = sum(sum(d.values()) for d in docs) / len(docs)
    df = Counter(word for d in docs for word in d)
    idf = {w: math.log(1 + (len(docs) - n + 0.5) / (n + 0.5)) for w, n in df.items()}

    def score(query: list[str], doc: Counter) -> float:
        length = sum(doc.values())
        return sum(idf[w] * doc[w] * 2.2 / (doc[w] + 1.2 * (0.25 + 0.75 * length / avg)) for w in query if w in doc)

    for row in qa:
        query = re.findall(r"\w+", row["question"].lower())
        scores = [score(query, d) for d in docs]
        best = max(range(len(docs)), key=scores.__getitem__)
        assert corpus[best]["id"] == row["id"] and sorted(scores)[-2] < scores[best], row["question"]


def test_write_kb_replaces_files_and_leaves_no_temporary_files(tmp_path):
    (tmp_path / "corpus.jsonl").write_text("stale\n", encoding="utf-8")
    corpus_file, qa_file = write_kb(tmp_path, seed=2, per_kind=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "qa.jsonl"]
    assert (read_jsonl(corpus_file), read_jsonl(qa_file)) == generate_kb(seed=2, per_kind=4)
