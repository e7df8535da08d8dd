"""`agentbench-npu serve` in its own process: SGLang's /generate and the official OpenAI client."""

from __future__ import annotations


import httpx
import openai
import pytest

from tests.support.servers import cli_server


@pytest.fixture(scope="module")
def server_url():
    with cli_server("serve", "--model", "tiny") as (url, _):
        yield url


def test_serve_answers_generate_with_token_logprobs(server_url):
    body = {"text": "What is 2 + 2?", "sampling_params": {"max_new_tokens": 6, "sampling_seed": 1},
            "return_logprob": True}
    reply = httpx.post(f"{server_url}/generate", json=body, timeout=60).json()
    logprobs = reply["meta_info"]["output_token_logprobs"]
    assert len(logprobs) == reply["meta_info"]["completion_tokens"] > 0
    assert all(lp <= 0 and isinstance(tok, int) for lp, tok, _ in logprobs)
    assert reply["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_the_openai_client_gets_a_chat_completion(server_url):
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="none")
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8, seed=3,
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert completion.usage.completion_tokens > 0
