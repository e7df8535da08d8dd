"""The sglang engine backend's lifecycle against our own `serve` (the same API subset), launched for real.

Launch and wait for /health, generate, weights from disk, memory release and resume, weights over a gloo
process group with SGLang's one-broadcast-per-tensor protocol, teardown; attaching to a running server; and the
ways a launch fails. A real SGLang server needs a GPU or an NPU: its command line is checked in
tests/unit/test_sglang_launch.py and the live run is tests/device/.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading

import pytest
import torch

from agentbench_npu.config import EngineSection
from agentbench_npu.engines.http import EngineRequestError
from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.engines.server import ServerThread
from agentbench_npu.engines.sglang import EngineLaunchError, ServerProcess, SGLangEngine, free_port
from agentbench_npu.models import load_model
from agentbench_npu.models.loading import load_causal_lm
from agentbench_npu.sync.checksum import weights_checksum
from agentbench_npu.sync.distributed import BucketBuffers, open_group, send_weights, weight_specs
from agentbench_npu.types import GenerateRequest, SamplingParams

OURS = {**dataclasses.asdict(EngineSection()), "launcher": "agentbench", "launch_timeout": 120.0}
REQUEST = GenerateRequest((5, 6, 7, 8), SamplingParams(max_new_tokens=6, seed=3))


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny")


@pytest.fixture(scope="module")
def engine(lm):
    engine = SGLangEngine.create(lm.path, dtype="float32", device=torch.device("cpu"), seed=0, options=OURS)
    yield engine
    engine.close()


def perturbed(lm, scale: float) -> list[tuple[str, torch.Tensor]]:
    model = load_causal_lm(lm.path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.ones_like(p))
    return [(n, p.detach()) for n, p in model.named_parameters()]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_a_launched_server_answers_as_the_in_process_engine_does(engine, lm):
    assert engine.process is not None and engine.process.running
    info = engine.generate_batch  # the synchronous call the executors make
    (result,) = info([REQUEST])
    local = ReferenceEngine(load_causal_lm(lm.path), lm.tokenizer)
    (expected,) = local.generate_batch([REQUEST])
    assert result.output_ids == expected.output_ids
    assert result.output_logprobs == pytest.approx(expected.output_logprobs, abs=1e-5)
    assert engine.checksum() == local.checksum()


def test_weights_written_to_disk_reach_the_server(engine, lm):
    named = perturbed(lm, 1e-3)
    version = engine.update_weights_from_tensors(engine.cast_for_update(named))
    assert engine.checksum() == weights_checksum(named)
    assert version == engine.weight_version >= 1
    assert not (engine._staging / "weights.partial").exists()  # written aside, then renamed into place


def test_released_memory_refuses_generation_until_resumed_and_reloaded(engine, lm):
    before = engine.checksum()
    engine.release_memory_occupation()
    with pytest.raises(EngineRequestError, match="memory is released"):
        engine.generate_batch([REQUEST])
    engine.resume_memory_occupation()
    # as with SGLang's memory saver, resumed weights are not the old ones until weights are sent again
    named = perturbed(lm, 5e-4)
    engine.update_weights_from_tensors(engine.cast_for_update(named))
    assert engine.checksum() == weights_checksum(named) != before
    assert engine.generate_batch([REQUEST])[0].output_ids


def test_weights_over_a_gloo_group_one_broadcast_per_tensor(engine, lm):
    named = perturbed(lm, -2e-3)
    specs = weight_specs(named)
    port = free_port()
    joined: dict[str, object] = {}
    joiner = threading.Thread(target=lambda: joined.update(group=open_group("127.0.0.1", port, rank=0, world_size=2)))
    joiner.start()
    engine.init_weights_update_group("127.0.0.1", port, rank=1, world_size=2, backend="gloo")
    joiner.join(60)
    received: dict[str, object] = {}
    receiver = threading.Thread(target=lambda: received.update(version=engine.update_weights_from_distributed(specs)))
    receiver.start()
    sent = send_weights(joined["group"], named, BucketBuffers(specs, 0))
    receiver.join(60)
    assert sent == sum(t.numel() * t.element_size() for _, t in named)
    assert received["version"] == engine.weight_version
    assert engine.checksum() == weights_checksum(named)
    engine.destroy_weights_update_group()
    with pytest.raises(EngineRequestError, match="no weight update group"):
        engine.update_weights_from_distributed(specs)


def test_a_group_on_a_backend_the_server_cannot_join_is_refused(engine):
    with pytest.raises(EngineRequestError, match="backend 'nccl'"):
        engine.init_weights_update_group("127.0.0.1", free_port(), rank=1, world_size=2, backend="nccl")


def test_close_stops_the_server_frees_its_port_and_removes_the_staging_dir(lm):
    engine = SGLangEngine.create(lm.path, dtype="float32", device=torch.device("cpu"), options=OURS)
    port, staging, process = int(engine.url.rsplit(":", 1)[1]), engine._staging, engine.process
    engine.close()
    assert not process.running and port_is_free(port) and not staging.exists()


def test_attaching_to_a_running_server_leaves_it_running(lm):
    local = ReferenceEngine(load_causal_lm(lm.path), lm.tokenizer, model_path=str(lm.path))
    with ServerThread(local) as server:
        engine = SGLangEngine.create(lm.path, dtype="float32", device=torch.device("cpu"),
                                     options={**OURS, "url": server.url})
        assert engine.process is None and engine.checksum() == local.checksum()
        engine.close()
        assert local.checksum() == engine_checksum_over_http(server.url)


def engine_checksum_over_http(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/weights_checksum", timeout=30).json()["checksum"]


def test_attaching_to_nothing_says_so(lm):
    with pytest.raises(EngineLaunchError, match="no SGLang server answers"):
        SGLangEngine.create(lm.path, dtype="float32", device=torch.device("cpu"),
                            options={**OURS, "url": f"http://127.0.0.1:{free_port()}"})


def test_a_server_that_exits_at_launch_is_reported_with_its_log(tmp_path):
    with pytest.raises(EngineLaunchError, match="exited with status") as info:
        SGLangEngine.create(tmp_path / "no-model", dtype="float32", device=torch.device("cpu"), options=OURS)
    assert "no-model" in str(info.value)  # the server's own error, from the tail of its log


def test_a_server_that_never_answers_is_stopped_at_the_deadline(tmp_path):
    process = ServerProcess([sys.executable, "-c", "import time; time.sleep(600)"],
                            f"http://127.0.0.1:{free_port()}", tmp_path / "server.log")
    with pytest.raises(EngineLaunchError, match=r"did not answer .*/health within 1 s"):
        process.start(timeout=1.0)
    assert process.proc is not None and process.proc.poll() is not None  # killed, not left behind
