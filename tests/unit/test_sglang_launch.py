"""The command lines the sglang engine backend launches, and what it refuses before launching anything."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from agentbench_npu.config import EngineSection
from agentbench_npu.engines.sglang import SGLangEngine, agentbench_argv, routes_shape, sglang_argv
from agentbench_npu.errors import MissingExtraError, UserError

DEFAULTS = dataclasses.asdict(EngineSection())


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_a_real_sglang_server_on_an_npu_gets_the_ascend_backend_and_rl_flags():
    argv = sglang_argv("/models/Qwen3-4B", host="127.0.0.1", port=30011, dtype="bfloat16",
                       device="npu", device_index=3, seed=7, options={**DEFAULTS, "tp_size": 2},
                       routed_experts=False, python="/usr/bin/python3")
    assert argv[:3] == ["/usr/bin/python3", "-m", "sglang.launch_server"]
    assert flag(argv, "--model-path") == "/models/Qwen3-4B" and flag(argv, "--port") == "30011"
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--dtype") == "bfloat16"
    assert flag(argv, "--tp-size") == "2" and flag(argv, "--random-seed") == "7"
    assert flag(argv, "--device") == "npu" and flag(argv, "--base-gpu-id") == "3"
    assert flag(argv, "--attention-backend") == "ascend"
    assert "--enable-memory-saver" in argv
    # SGLang's deterministic inference refuses the ascend backend: on NPUs determinism is HCCL_DETERMINISTIC's
    assert "--enable-deterministic-inference" not in argv
    assert "--enable-return-routed-experts" not in argv and "--ep-size" not in argv
    assert "--mem-fraction-static" not in argv  # SGLang's own default unless asked


def test_a_moe_server_on_cuda_with_expert_parallelism_returns_routes_and_takes_extra_flags():
    options = {**DEFAULTS, "tp_size": 8, "ep_size": 8, "mem_fraction_static": 0.7, "release_memory": False,
               "deterministic": False, "extra_args": ["--disable-cuda-graph", "--chunked-prefill-size", 4096]}
    argv = sglang_argv("/models/Qwen3-30B-A3B", host="127.0.0.1", port=1, dtype="bfloat16",
                       device="cuda", seed=0, options=options, routed_experts=True)
    assert flag(argv, "--ep-size") == "8" and flag(argv, "--mem-fraction-static") == "0.7"
    assert flag(argv, "--device") == "cuda" and "--attention-backend" not in argv
    assert "--enable-return-routed-experts" in argv
    assert "--enable-memory-saver" not in argv and "--enable-deterministic-inference" not in argv
    assert argv[-3:] == ["--disable-cuda-graph", "--chunked-prefill-size", "4096"]


@pytest.mark.parametrize("backend, deterministic", [("", True), ("fa3", True), ("flashinfer", True),
                                                     ("triton", True), ("torch_native", False)])
def test_deterministic_inference_is_asked_for_only_with_backends_that_support_it(backend, deterministic):
    argv = sglang_argv("/m", host="h", port=1, dtype="bfloat16", device="cuda", seed=0,
                       options={**DEFAULTS, "attention_backend": backend}, routed_experts=False)
    assert ("--enable-deterministic-inference" in argv) is deterministic


def test_our_own_server_stands_in_with_the_same_api_subset():
    argv = agentbench_argv("/tmp/tiny", host="127.0.0.1", port=4, dtype="float32", device="cpu",
                           seed=2, python="py")
    assert argv == ["py", "-m", "agentbench_npu", "serve", "--model", "/tmp/tiny", "--host", "127.0.0.1",
                    "--port", "4", "--dtype", "float32", "--device", "cpu", "--seed", "2"]


def test_routes_shape_comes_from_an_moe_checkpoints_config(tmp_path):
    assert routes_shape(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 48, "num_experts_per_tok": 8}))
    assert routes_shape(tmp_path) == (48, 8)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 36}))  # dense
    assert routes_shape(tmp_path) is None


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_launching_real_sglang_without_the_extra_names_it(tmp_path):
    with pytest.raises(MissingExtraError, match=r"agentbench-npu\[sglang\]"):
        SGLangEngine.create(tmp_path, dtype="float32", device=torch.device("cpu"), options=DEFAULTS)


def test_an_unknown_launcher_is_refused(tmp_path):
    with pytest.raises(UserError, match="engine.launcher 'vllm'"):
        SGLangEngine.create(tmp_path, dtype="float32", device=torch.device("cpu"),
                            options={**DEFAULTS, "launcher": "vllm"})
