"""`agentbench-npu serve` in its own process: SGLang's /generate and the official OpenAI client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agentbench_npu", "serve", "--model", "tiny", "--port", str(port)],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:  # poll until healthy, bounded by the deadline and by the process staying alive
            if proc.poll() is not None:
                pytest.fail(f"serve exited early: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("serve did not become healthy within 120 s")
            time.sleep(0.1)  # polling interval, not a timing assumption
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
