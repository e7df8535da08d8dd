"""The engine server on loopback: SGLang's /generate protocol, weight updates, HttpEngine, OpenAI chat.

The tiny model is untrained, so these tests check shapes, protocol and agreement with the in-process
engine, never the content of the text.
"""

from __future__ import annotations

import asyncio
import copy
import json

import httpx
import openai
import pytest
import torch

from agentbench_npu.engines.http import EngineRequestError, HttpEngine
from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.engines.server import ServerThread
from agentbench_npu.models import load_model
from agentbench_npu.sync.checksum import weights_checksum
from agentbench_npu.types import GenerateRequest, GenerateResult, SamplingParams

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny")


@pytest.fixture(scope="module")
def engine(lm):
    return ReferenceEngine(lm.model, lm.tokenizer, model_path=str(lm.path))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def in_process(engine, prompt, **sampling) -> GenerateResult:
    (result,) = engine.generate_batch([GenerateRequest(tuple(prompt), SamplingParams(**sampling))])
    return result


def post_generate(client, body) -> dict:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- /generate ----------------------------------------------------------------------------------

def test_generate_returns_the_in_process_logprobs_exactly_for_the_same_seed(client, engine):
    sampling = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "ignore_eos": True}
    out = post_generate(client, {"input_ids": PROMPT, "sampling_params": {**sampling, "sampling_seed": 7},
                                 "return_logprob": True})
    expected = in_process(engine, PROMPT, **sampling, seed=7)
    meta = out["meta_info"]
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == list(expected.output_logprobs)
    assert [tid for _, tid, _ in meta["output_token_logprobs"]] == list(expected.output_ids)
    assert out["output_ids"] == list(expected.output_ids)
    assert out["text"] == expected.text
    assert meta["prompt_tokens"] == len(PROMPT) and meta["completion_tokens"] == 12
    assert meta["finish_reason"]["type"] == "length"
    assert meta["weight_version"] == engine.weight_version
    assert all(text is None for _, _, text in meta["output_token_logprobs"])


def test_seed_is_accepted_as_an_alias_of_sampling_seed(client):
    body = {"input_ids": PROMPT, "return_logprob": True}
    a = post_generate(client, {**body, "sampling_params": {"max_new_tokens": 6, "seed": 11}})
    b = post_generate(client, {**body, "sampling_params": {"max_new_tokens": 6, "sampling_seed": 11}})
    assert a["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"]


def test_logprobs_are_left_out_unless_requested(client):
    out = post_generate(client, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3}})
    assert "output_token_logprobs" not in out["meta_info"]
    assert len(out["output_ids"]) == out["meta_info"]["completion_tokens"]


def test_return_text_in_logprobs_fills_the_token_text(client, lm):
    out = post_generate(client, {"input_ids": PROMPT, "return_logprob": True, "return_text_in_logprobs": True,
                                 "sampling_params": {"max_new_tokens": 4, "sampling_seed": 1}})
    for _, tid, text in out["meta_info"]["output_token_logprobs"]:
        assert text == lm.tokenizer.decode([tid])


def test_stop_token_id_ends_generation_with_finish_reason_stop_and_the_matched_id(client, engine):
    free = in_process(engine, PROMPT, max_new_tokens=16, seed=3, ignore_eos=True)
    stop_id = free.output_ids[2]
    first = free.output_ids.index(stop_id)
    out = post_generate(client, {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {
        "max_new_tokens": 16, "sampling_seed": 3, "ignore_eos": True, "stop_token_ids": [stop_id]}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["output_ids"] == list(free.output_ids[: first + 1])


def test_stop_string_ends_generation_and_is_trimmed_from_the_text(client, engine, lm):
    free = in_process(engine, PROMPT, max_new_tokens=24, temperature=0.0, ignore_eos=True)
    pieces = [lm.tokenizer.decode([t]) for t in free.output_ids]
    k, stop = next((k, p) for k, p in enumerate(pieces) if k >= 2 and p.strip() and p.isascii() and p.isprintable())
    out = post_generate(client, {"input_ids": PROMPT, "sampling_params": {
        "max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True, "stop": [stop, "never-generated-stop"]}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["meta_info"]["completion_tokens"] <= k + 1
    assert stop not in out["text"]
    assert free.text.startswith(out["text"])


def test_batch_of_input_ids_returns_a_list_matching_the_in_process_batch(client, engine):
    prompts = [PROMPT, [11, 12, 13, 14, 15, 16, 17, 18]]
    seeds = [21, 22]
    body = {"input_ids": prompts, "return_logprob": True,
            "sampling_params": [{"max_new_tokens": 8, "sampling_seed": s, "ignore_eos": True} for s in seeds]}
    out = post_generate(client, body)
    expected = engine.generate_batch([GenerateRequest(tuple(p), SamplingParams(max_new_tokens=8, seed=s,
                                                                               ignore_eos=True))
                                      for p, s in zip(prompts, seeds)])
    assert isinstance(out, list) and len(out) == 2
    for item, exp in zip(out, expected):
        assert [lp for lp, _, _ in item["meta_info"]["output_token_logprobs"]] == list(exp.output_logprobs)
        assert item["output_ids"] == list(exp.output_ids)
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [5, 8]
    assert len({o["meta_info"]["id"] for o in out}) == 2


def test_text_input_is_tokenised_with_the_engine_tokenizer(client, lm):
    text = "What is 12 + 30?"
    ids = lm.tokenizer.encode(text)
    sampling = {"max_new_tokens": 5, "sampling_seed": 4, "ignore_eos": True}
    by_text = post_generate(client, {"text": text, "sampling_params": sampling, "return_logprob": True})
    by_ids = post_generate(client, {"input_ids": ids, "sampling_params": sampling, "return_logprob": True})
    assert by_text["meta_info"]["prompt_tokens"] == len(ids)
    assert by_text["output_ids"] == by_ids["output_ids"]
    batch = post_generate(client, {"text": [text, "hello"], "sampling_params": sampling})
    assert [len(o["output_ids"]) for o in batch] == [5, 5]


def test_zero_new_tokens_finishes_by_length_with_no_output(client):
    out = post_generate(client, {"input_ids": PROMPT, "return_logprob": True,
                                 "sampling_params": {"max_new_tokens": 0}})
    assert out["output_ids"] == [] and out["meta_info"]["output_token_logprobs"] == []
    assert out["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("body, fragment", [
    ({}, "exactly one of input_ids or text"),
    ({"input_ids": [1, 2], "text": "x"}, "exactly one of input_ids or text"),
    ({"input_ids": []}, "input_ids is empty"),
    ({"input_ids": [[1, 2], []]}, "input_ids[1] is empty"),
    ({"text": ""}, "text is empty"),
    ({"input_ids": [1, 10**6]}, "token ids in [0, 512)"),
    ({"input_ids": [1, "2"]}, "input_ids must be"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "temperature must be >= 0"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p must be in (0, 1]"),
    ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "top_k must be -1"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "8"}}, "sampling_params.max_new_tokens must be"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_token": 8}}, "did you mean: max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"repetition_penalty": 1.3}}, "repetition_penalty=1.3 is not supported"),
    ({"input_ids": [1, 2], "sampling_params": {"stop": [""]}}, "sampling_params.stop must be"),
    ({"input_ids": [1, 2], "sampling_params": {"seed": 1, "sampling_seed": 2}}, "disagree"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 100000}}, "exceed the model's context"),
    ({"input_ids": [1, 2], "stream": True}, "stream=true is not supported"),
    ({"input_ids": [1, 2], "return_logprobs": True}, "did you mean: return_logprob"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "one per prompt"),
])
def test_invalid_generate_input_is_a_400_with_a_one_line_message(client, body, fragment):
    response = client.post("/generate", json=body)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert fragment in message and "\n" not in message


def test_body_that_is_not_json_is_a_400(client):
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


# -- management routes --------------------------------------------------------------------------

def test_health_model_info_flush_cache_and_models_answer(client, engine):
    assert client.get("/health").status_code == 200
    info = client.get("/get_model_info").json()
    assert info["model_path"] == engine.model_path and info["is_generation"] is True
    assert info["weight_version"] == engine.weight_version and info["architecture"] == "Qwen3ForCausalLM"
    assert client.post("/flush_cache").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == engine.model_path


def test_weights_checksum_route_reports_the_engine_checksum(client, engine):
    assert client.get("/weights_checksum").json() == {"checksum": engine.checksum(),
                                                     "weight_version": engine.weight_version}


def test_update_weights_from_disk_changes_the_checksum_and_bumps_the_weight_version(lm, tmp_path):
    updated = copy.deepcopy(lm.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in updated.parameters():
            param.add_(0.01 * torch.randn_like(param))
    updated.save_pretrained(tmp_path / "step1")
    own = ReferenceEngine(copy.deepcopy(lm.model), lm.tokenizer, model_path=str(lm.path))
    with ServerThread(own) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        before = http.get("/weights_checksum").json()
        response = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "step1")})
        assert response.status_code == 200, response.text
        assert response.json()["success"] is True and response.json()["weight_version"] == before["weight_version"] + 1
        after = http.get("/weights_checksum").json()
        assert after["checksum"] != before["checksum"]
        assert after["checksum"] == weights_checksum(updated.named_parameters())
        assert after["weight_version"] == before["weight_version"] + 1
        out = post_generate(http, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
        assert out["meta_info"]["weight_version"] == after["weight_version"]

        failed = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")})
        assert failed.status_code == 400 and failed.json()["success"] is False
        assert "no *.safetensors" in failed.json()["message"]
        assert http.get("/weights_checksum").json() == after


def test_server_thread_releases_its_port_on_exit(engine):
    with ServerThread(engine) as srv:
        url = srv.url
        assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


# -- HttpEngine ---------------------------------------------------------------------------------

def test_http_engine_round_trip_equals_the_in_process_result(server, engine):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=5, ignore_eos=True)

    async def run():
        client = HttpEngine(server.url)
        try:
            return await client.generate_one(PROMPT, params)
        finally:
            await client.aclose()

    assert asyncio.run(run()) == engine.generate_batch([GenerateRequest(tuple(PROMPT), params)])[0]


def test_http_engine_concurrent_requests_match_in_process_results_per_seed(server, engine):
    requests = [GenerateRequest((5, 6, 7 + i, 8), SamplingParams(max_new_tokens=6, seed=100 + i, ignore_eos=True))
                for i in range(4)]

    async def run():
        client = HttpEngine(server.url)
        try:
            return await client.generate(requests)
        finally:
            await client.aclose()

    results = asyncio.run(run())
    for request, got in zip(requests, results):
        expected = engine.generate_batch([request])[0]
        assert got.output_ids == expected.output_ids
        # the server batches concurrent requests as they arrive; padding may move the last bits
        assert got.output_logprobs == pytest.approx(expected.output_logprobs, abs=1e-5)
        assert (got.finish_reason, got.prompt_tokens) == ("length", 4)


def test_http_engine_management_calls_reach_the_server(server, engine):
    async def run():
        client = HttpEngine(server.url)
        try:
            return (await client.health(), await client.model_info(), await client.weights_checksum(),
                    await client.flush_cache())
        finally:
            await client.aclose()

    healthy, info, checksum, _ = asyncio.run(run())
    assert healthy and info["model_path"] == engine.model_path and checksum == engine.checksum()


def test_http_engine_raises_the_servers_message_on_a_bad_request(server):
    async def run():
        client = HttpEngine(server.url)
        try:
            await client.generate_one([10**6], SamplingParams(max_new_tokens=2))
        finally:
            await client.aclose()

    with pytest.raises(EngineRequestError, match=r"HTTP 400.*token ids in \[0, 512\)"):
        asyncio.run(run())


def test_http_engine_says_clearly_when_a_server_has_no_weights_checksum():
    # what a real SGLang server answers for a route it does not have
    transport = httpx.MockTransport(lambda request: httpx.Response(404, json={"detail": "Not Found"}))

    async def run():
        client = HttpEngine("http://sglang.invalid:30000", transport=transport)
        try:
            await client.weights_checksum()
        finally:
            await client.aclose()

    with pytest.raises(EngineRequestError, match="no /weights_checksum endpoint.*SGLang"):
        asyncio.run(run())


def test_http_engine_reports_an_unreachable_server_as_unhealthy():
    async def run():
        client = HttpEngine("http://127.0.0.1:9", timeout=5)
        try:
            return await client.health()
        finally:
            await client.aclose()

    assert asyncio.run(run()) is False


# -- OpenAI-compatible chat ---------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"}]


def test_openai_client_gets_a_chat_completion_with_usage(oai, lm):
    completion = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=3,
                                             temperature=0.7, logprobs=True)
    prompt = lm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert completion.object == "chat.completion" and completion.model == "tiny"
    (choice,) = completion.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    usage = completion.usage
    assert usage.prompt_tokens == len(lm.tokenizer.encode(prompt, add_special_tokens=False))
    assert 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len(choice.logprobs.content) == usage.completion_tokens
    assert all(entry.logprob <= 0 for entry in choice.logprobs.content)


def test_openai_n_gives_n_choices_each_seeded_base_plus_index(oai):
    two = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, seed=40, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    second_alone = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, seed=41)
    assert two.choices[1].message.content == second_alone.choices[0].message.content


def test_openai_max_tokens_cuts_generation_with_finish_reason_length(oai, lm):
    completion = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=2,
                                             stop=None, seed=1)
    assert completion.usage.completion_tokens <= 2
    if completion.usage.completion_tokens == 2:
        assert completion.choices[0].finish_reason == "length"


def test_openai_tools_are_rendered_into_the_prompt(oai):
    tools = [{"type": "function", "function": {"name": "calculator", "description": "adds",
                                               "parameters": {"type": "object", "properties": {}}}}]
    plain = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, seed=0)
    with_tools = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, seed=0, tools=tools)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens


def test_openai_streaming_request_is_refused_as_unsupported(oai):
    with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
        oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, stream=True)


def test_chat_without_messages_is_a_400(client):
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert response.status_code == 400 and "messages must be" in response.json()["error"]["message"]


class ScriptedEngine(ReferenceEngine):
    """Answers every request with fixed text, to exercise tool-call parsing through the server."""

    text = ('Let me add.\n<tool_call>\n{"name": "calculator", "arguments": {"a": 2, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "search", "arguments": {"query": "2+2"}}\n</tool_call>')

    async def generate(self, requests):
        ids = tuple(self.tokenizer.encode(self.text, add_special_tokens=False))
        return [GenerateResult(output_ids=ids, output_logprobs=(-0.5,) * len(ids), text=self.text,
                               finish_reason="stop", prompt_tokens=len(r.input_ids), matched_stop=2)
                for r in requests]


def test_openai_chat_returns_tool_calls_parsed_from_the_generated_text(lm):
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    scripted = ScriptedEngine(lm.model, lm.tokenizer, model_path=str(lm.path))
    with ServerThread(scripted) as srv:
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        completion = oai.chat.completions.create(model="tiny", messages=MESSAGES, tools=tools, max_tokens=64)
        without_tools = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=64)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me add."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["calculator", "search"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"a": 2, "b": 2}, {"query": "2+2"}]
    assert all(c.type == "function" and c.id for c in calls) and calls[0].id != calls[1].id
    # without tools in the request the text is the answer as generated
    assert without_tools.choices[0].message.tool_calls is None
    assert without_tools.choices[0].finish_reason == "stop"
