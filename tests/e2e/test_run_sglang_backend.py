"""`run --engine sglang`: a whole scenario through the SGLang backend, its server launched for real.

Here the launcher is our own `serve` (same API subset; no accelerator needed): the rollout goes over HTTP, the
engine releases its memory while the trainer steps, and the weights come back from a safetensors staging dir —
and the four gates judge the run as they judge the in-process engine.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_base_through_the_sglang_backend_passes_the_four_gates(cli, tmp_path):
    proc = cli("run", "base", "--engine", "sglang", "--set", "engine.launcher=agentbench", "--steps", "2",
               "--out", str(tmp_path / "run"), "-q")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {g["name"]: g["passed"] for g in report["gates"]} == {
        "logprob_alignment": True, "weight_sync": True, "reproducibility": True, "checkpoint_continuity": True}
    assert report["environment"]["cluster"]["engine"] == "sglang"
    for step in report["steps"]:
        assert step["engine_memory_released"] is True  # released for the step, then resumed and re-sent
        assert step["weight_sync_transport"] == "disk" and step["weights_checksum_match"]
    assert report["steps"][-1]["logprob_abs_diff_mean"] < 1e-5  # fp32 on both sides: only arithmetic order


def test_a_bad_engine_option_is_refused_before_anything_starts(cli, tmp_path):
    proc = cli("run", "base", "--engine", "sglang", "--set", "engine.launcher=vllm", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "engine.launcher must be one of sglang, agentbench" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_fault_that_breaks_the_in_process_engine_is_refused_with_a_server_engine(cli, tmp_path):
    proc = cli("run", "base", "--engine", "sglang", "--set", "engine.launcher=agentbench",
               "--inject-fault", "stale-weights", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "fault 'stale-weights' would not change this run" in proc.stderr
    assert "--engine reference" in proc.stderr and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_over_ray_colocated_the_server_releases_memory_and_takes_weights_over_the_update_group(cli, tmp_path):
    proc = cli("run", "base", "--executor", "ray", "--mode", "colocate", "--engine", "sglang",
               "--set", "engine.launcher=agentbench", "--steps", "2", "--gates", "logprob_alignment,weight_sync",
               "--out", str(tmp_path / "run"), "-q")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["environment"]["cluster"]["sync"] == "distributed (gloo)"  # /update_weights_from_distributed
    assert all(step["engine_memory_released"] is True for step in report["steps"])
    assert all(g["passed"] for g in report["gates"]) and len(report["gates"]) == 2
