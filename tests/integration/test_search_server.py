"""The retrieval server on a real loopback port, spoken to with plain HTTP in Search-R1's request shape; its
indexes on disk, its corpus checks, the SearchService a runner uses, and the two CLI commands. Each test name
states the behaviour it pins down."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from agentbench_npu.errors import UserError
from agentbench_npu.http_thread import AppThread
from agentbench_npu.retrieval.corpus import load_corpus
from agentbench_npu.retrieval.index import MANIFEST, build_index, open_searcher
from agentbench_npu.retrieval.server import MAX_QUERIES, server_thread
from agentbench_npu.retrieval.service import SearchService
from tests.support.servers import cli_server, free_port

DEFAULT_TOPK = 4  # not Search-R1's 3, so a request that gives no topk shows the server's default was used
SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "tu", "va", "ze"]


def name(i: int) -> str:
    """A made-up word per document, so a query naming it has exactly one right answer."""
    return f"{SYLLABLES[i // 10]}{SYLLABLES[i % 10]}ton"


def docs(n: int = 50) -> list[dict]:
    return [{"id": str(i), "contents": f'"{name(i).title()} Harbour"\n{name(i).title()} is a harbour town on the '
             f"coast; its market sells fish, salt and rope every morning.", "year": 1800 + i} for i in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", docs())


@pytest.fixture(scope="module")
def server(corpus):
    with server_thread(open_searcher(corpus, "bm25"), default_topk=DEFAULT_TOPK) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def retrieve(client: httpx.Client, **body) -> list:
    response = client.post("/retrieve", json=body)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"result"}
    return response.json()["result"]


# -- /retrieve: Search-R1's shapes -------------------------------------------------------------------------
def test_without_scores_each_query_gets_its_list_of_corpus_records_best_first(client):
    result = retrieve(client, queries=[f"{name(7)} harbour", f"where is {name(42)}?"], topk=3)
    assert len(result) == 2 and [len(row) for row in result] == [3, 3]
    assert result[0][0] == docs()[7] and result[1][0] == docs()[42]  # the record as written, extra keys kept
    assert all(doc in docs() for row in result for doc in row)


def test_with_scores_items_are_document_and_float_score_sorted_descending(client):
    [row] = retrieve(client, queries=[f"{name(13)} market"], topk=5, return_scores=True)
    assert len(row) == 5 and all(set(item) == {"document", "score"} for item in row)
    assert row[0]["document"] == docs()[13]
    scores = [item["score"] for item in row]
    assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)
    assert scores[0] > scores[1]


@pytest.mark.parametrize("body", [{}, {"topk": None}], ids=["absent", "null"])
def test_topk_absent_or_null_uses_the_server_default(client, body):
    assert [len(row) for row in retrieve(client, queries=["harbour town"], **body)] == [DEFAULT_TOPK]


def test_topk_larger_than_the_corpus_returns_every_document_once(client):
    [row] = retrieve(client, queries=[name(3)], topk=500)
    assert sorted(doc["id"] for doc in row) == sorted(d["id"] for d in docs())


def test_a_query_with_no_indexed_word_still_gets_topk_documents_scored_zero(client):
    result = retrieve(client, queries=["the of and", "qqqxyzzy"], topk=3, return_scores=True)
    assert [[item["score"] for item in row] for row in result] == [[0.0] * 3] * 2


def test_search_r1_trainer_payload_as_raw_bytes(client):
    payload = json.dumps({"queries": [name(21), name(5)], "topk": 3, "return_scores": True}).encode()
    response = client.post("/retrieve", content=payload, headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    result = response.json()["result"]
    assert [row[0]["document"]["id"] for row in result] == ["21", "5"] and all(len(row) == 3 for row in result)


def test_a_blank_query_is_answered_so_one_rollouts_empty_search_does_not_fail_the_batch(client):
    """Search-R1's trainer sends every rollout's query in one request; `<search></search>` sends ""."""
    response = client.post("/retrieve", json={"queries": ["ok", "   ", ""], "topk": 2, "return_scores": True})
    assert response.status_code == 200
    result = response.json()["result"]
    assert [len(row) for row in result] == [2, 2, 2]
    assert all(item["score"] == 0.0 for row in result[1:] for item in row)


def test_health_names_the_retriever_and_corpus_size(client):
    assert client.get("/health").json() == {"status": "ok", "retriever": "bm25", "documents": 50,
                                            "default_topk": DEFAULT_TOPK}


@pytest.mark.parametrize("content, field", [
    (json.dumps({"queries": []}), "queries"),
    (json.dumps({"queries": ["ok", 7]}), "queries[1]"),
    (json.dumps({"queries": ["ok"] * (MAX_QUERIES + 1)}), "queries"),
    (json.dumps({"queries": ["ok"], "topk": 0}), "topk"),
    (json.dumps({"queries": ["ok"], "topk": 10**6}), "topk"),
    (json.dumps({"queries": ["ok"], "topk": "3"}), "topk"),
    (json.dumps({"queries": ["ok"], "return_scores": "yes"}), "return_scores"),
    ('{"queries": ["ok"], "topk": ', "JSON"),
    (json.dumps([{"queries": ["ok"]}]), "object"),
], ids=["no-queries", "non-string-query", "too-many-queries", "topk-0", "topk-huge", "topk-string",
        "return-scores-string", "malformed-json", "array-body"])
def test_bad_input_gets_a_4xx_with_a_one_line_detail_naming_the_field_and_the_server_keeps_answering(
        client, content, field):
    response = client.post("/retrieve", content=content.encode(), headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and field in detail
    assert retrieve(client, queries=[name(1)], topk=1)[0][0]["id"] == "1"


def test_32_concurrent_clients_all_get_their_own_correct_answers(server):
    clients, each = 32, 8

    async def one_client(c: int) -> list[tuple[int, int, str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            got = []
            for r in range(each):
                target = (c * each + r) % 50
                response = await http.post("/retrieve", json={"queries": [name(target)], "topk": 2})
                got.append((target, response.status_code, response.json()["result"][0][0]["id"]))
            return got

    async def everyone() -> list:
        return await asyncio.gather(*(one_client(c) for c in range(clients)))

    answers = [a for per_client in asyncio.run(everyone()) for a in per_client]
    assert len(answers) == clients * each
    assert all(status == 200 and got == str(target) for target, status, got in answers)


# -- the dense retriever -----------------------------------------------------------------------------------
def test_dense_retriever_returns_the_semantically_nearest_document(tmp_path):
    topical = [{"id": "cat", "contents": '"Cat"\nThe cat is a small domesticated carnivore kept as a pet.'},
               {"id": "volcano", "contents": '"Volcano"\nA volcano is a rupture in a planet\'s crust where lava, '
                                             "ash and gases escape."},
               {"id": "piano", "contents": '"Piano"\nThe piano is a keyboard instrument whose hammers strike '
                                           "strings."}]
    corpus = write_jsonl(tmp_path / "c.jsonl", topical + docs(20))
    with server_thread(open_searcher(corpus, "dense")) as srv:
        result = httpx.post(f"{srv.url}/retrieve", json={"queries": [
            "a feline animal living in people's homes", "molten rock erupting from a mountain",
            "a musical instrument you play with keys"], "topk": 2, "return_scores": True}, timeout=60).json()["result"]
    assert [row[0]["document"]["id"] for row in result] == ["cat", "volcano", "piano"]
    assert all(row[0]["score"] > row[1]["score"] for row in result)


def test_a_dense_index_keeps_its_prefixes_and_refuses_another_encoder(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs(5))
    built = build_index(corpus, "dense", tmp_path / "idx", prefixes=("query: ", "passage: "))
    reloaded = open_searcher(corpus, "dense", tmp_path / "idx", on_build=fail_if_built)
    assert (reloaded.retriever.query_prefix, reloaded.retriever.passage_prefix) == ("query: ", "passage: ")
    assert reloaded.search(["x"], 2)[0][0][1] == pytest.approx(built.search(["x"], 2)[0][0][1], abs=1e-5)
    other = tmp_path / "other-encoder"
    other.mkdir()
    with pytest.raises(UserError, match="was encoded by .* not .*other-encoder"):
        open_searcher(corpus, "dense", tmp_path / "idx", model=str(other))


# -- indexes on disk ---------------------------------------------------------------------------------------
def fail_if_built() -> None:
    raise AssertionError("the saved index was rebuilt instead of loaded")


def test_a_saved_index_is_loaded_not_rebuilt_and_answers_identically(corpus, tmp_path):
    queries = [name(9), f"{name(30)} rope", "fish and salt"]
    built = build_index(corpus, "bm25", tmp_path / "idx").search(queries, 5)
    stamp = (tmp_path / "idx" / MANIFEST).stat().st_mtime_ns
    reloaded = open_searcher(corpus, "bm25", tmp_path / "idx", on_build=fail_if_built).search(queries, 5)
    assert reloaded == built
    assert (tmp_path / "idx" / MANIFEST).stat().st_mtime_ns == stamp


def test_a_new_index_directory_is_built_once_then_reused(corpus, tmp_path):
    builds = []
    open_searcher(corpus, "bm25", tmp_path / "new", on_build=lambda: builds.append(1))
    open_searcher(corpus, "bm25", tmp_path / "new", on_build=lambda: builds.append(1))
    assert builds == [1] and (tmp_path / "new" / MANIFEST).is_file()


def test_an_index_of_another_corpus_is_refused_with_a_rebuild_hint(corpus, tmp_path):
    build_index(corpus, "bm25", tmp_path / "idx")
    other = write_jsonl(tmp_path / "other.jsonl", docs(10))
    with pytest.raises(UserError, match="another corpus.*rebuild") as caught:
        open_searcher(other, "bm25", tmp_path / "idx")
    assert "search-index" in str(caught.value)


def test_a_corpus_rewritten_in_place_no_longer_matches_its_old_index(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", docs(20))
    build_index(path, "bm25", tmp_path / "idx")
    write_jsonl(path, docs(5))
    with pytest.raises(UserError, match="rebuild"):
        open_searcher(path, "bm25", tmp_path / "idx")


def test_a_bm25_index_opened_as_dense_is_refused(corpus, tmp_path):
    build_index(corpus, "bm25", tmp_path / "idx")
    with pytest.raises(UserError, match="is a bm25 index.*--retriever bm25"):
        open_searcher(corpus, "dense", tmp_path / "idx")


def test_a_non_empty_directory_without_a_manifest_is_refused_and_left_alone(corpus, tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"holds no {MANIFEST}"):
        open_searcher(corpus, "bm25", tmp_path / "idx")
    assert [p.name for p in (tmp_path / "idx").iterdir()] == ["notes.txt"]


def test_building_into_a_non_empty_directory_without_a_manifest_is_refused_and_left_alone(corpus, tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"holds no {MANIFEST}"):
        build_index(corpus, "bm25", tmp_path / "idx")
    assert [p.name for p in (tmp_path / "idx").iterdir()] == ["notes.txt"]


# -- corpus errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_line, says", [
    ('{"id": "x", "title": "no contents"}', "'contents' is missing"),
    ('{"id": "x", "contents": "  \\n "}', "'contents' is missing or empty"),
    ('{"id": "x", "contents": ', "not valid JSON"),
    ('["id", "contents"]', "expected an object"),
], ids=["no-contents", "blank-contents", "invalid-json", "not-an-object"])
def test_a_bad_corpus_line_is_a_user_error_naming_file_and_line(tmp_path, bad_line, says):
    path = write_jsonl(tmp_path / "c.jsonl", [docs(1)[0], bad_line])
    with pytest.raises(UserError, match=says) as caught:
        load_corpus(path)
    assert f"{path}:2:" in str(caught.value)


def test_a_missing_or_empty_corpus_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="does not exist") as missing:
        load_corpus(tmp_path / "absent.jsonl")
    assert str(tmp_path / "absent.jsonl") in str(missing.value)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no documents") as empty:
        load_corpus(tmp_path / "empty.jsonl")
    assert str(tmp_path / "empty.jsonl") in str(empty.value)


def test_title_and_text_rows_are_accepted_and_searchable(tmp_path):
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"id": "1", "title": "Oslo", "text": "Capital of Norway."},
                                                 {"id": "2", "title": "Lima", "text": "Capital of Peru."}])
    assert load_corpus(path).records[0]["contents"] == '"Oslo"\nCapital of Norway.'
    [[(best, _), _]] = open_searcher(path, "bm25").search(["norway"], 2)
    assert (best["id"], best["title"], best["text"]) == ("1", "Oslo", "Capital of Norway.")


def test_lines_split_only_at_newlines_so_unicode_separators_stay_inside_a_document(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"id": "1", "contents": '"T"\nbefore\u2028after\u0085end'}, {"id": "2", "contents": '"U"\nplain'}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert list(load_corpus(path).records) == rows


def search_r1_style_app():
    """A stand-in for Search-R1's own retrieval server: POST /retrieve only, no /health (GET /ready is for
    AppThread's start-up wait, which Search-R1's server does not have either)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict:
        return {}

    @app.post("/retrieve")
    def retrieve(body: dict) -> dict:
        return {"result": [[{"document": {"id": "0", "contents": '"T"\nfound'}, "score": 1.0}] for _ in body["queries"]]}

    return app


def test_search_service_takes_search_r1s_own_server_given_by_its_endpoint_url():
    """Search-R1 recipes name the endpoint (…/retrieve), and its server has no /health: both must work."""
    with AppThread(search_r1_style_app, "search-r1 stand-in", health="/ready") as server:
        service = SearchService(url=f"{server.url}/retrieve")
        assert service.describe()["url"] == server.url and service.describe()["external"] is True
        with service as client:
            assert asyncio.run(client.retrieve(["q1", "q2"], 1)) == [[{"id": "0", "contents": '"T"\nfound'}]] * 2


# -- SearchService -----------------------------------------------------------------------------------------
def test_search_service_serves_on_a_free_port_and_stops_at_exit(corpus):
    service = SearchService(corpus=corpus, topk=2)
    with service as search:
        url = service.describe()["url"]
        assert httpx.get(f"{url}/health", timeout=5).json()["documents"] == 50
        [row] = asyncio.run(search.retrieve([name(11)], 2))
        assert row[0] == docs()[11] and len(row) == 2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


def test_search_service_checks_an_external_url_and_leaves_it_running(server):
    service = SearchService(url=server.url + "/")
    with service:
        assert service.describe()["external"] is True and service.describe()["documents"] == 50
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_search_service_refuses_an_unreachable_url_at_construction_naming_it():
    url = f"http://127.0.0.1:{free_port()}"  # the scenario adds "task.search_url:" in front
    with pytest.raises(UserError, match="does not answer /health") as caught:
        SearchService(url=url)
    assert url in str(caught.value)


# -- the CLI -----------------------------------------------------------------------------------------------
def test_cli_builds_an_index_then_serves_it(cli, corpus, tmp_path):
    index = tmp_path / "idx"
    built = cli("search-index", "--corpus", str(corpus), "--index", str(index))
    assert built.returncode == 0, built.stderr
    assert json.loads((index / MANIFEST).read_text())["documents"] == 50
    with cli_server("search-server", "--corpus", str(corpus), "--index", str(index), timeout=60) as (url, proc):
        result = httpx.post(f"{url}/retrieve", json={"queries": [name(44)], "topk": 3}, timeout=30).json()["result"]
        assert result[0][0] == docs()[44] and len(result[0]) == 3
    output = proc.communicate(timeout=30)[0]
    assert "building" not in output  # the saved index was loaded


def test_cli_search_index_of_a_bad_corpus_exits_2_naming_file_line_and_writes_nothing(cli, tmp_path):
    corpus = write_jsonl(tmp_path / "bad.jsonl", [docs(1)[0], '{"id": "2"}'])
    done = cli("search-index", "--corpus", str(corpus), "--index", str(tmp_path / "idx"))
    assert done.returncode == 2
    assert f"{corpus}:2" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
