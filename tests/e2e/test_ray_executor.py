"""The Ray executor for real: actors on a local Ray, a 2-node cluster on loopback, gloo weight sync,
data-parallel ranks, and what happens when things go wrong."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RAY_ENV = {"RAY_AUTH_MODE": "disabled"}  # loopback-only test clusters; see MACHINE-NOTES on auth tokens
SMALL = ("--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=4")


def report_of(tmp_path: Path, name: str = "r") -> dict:
    return json.loads((tmp_path / name / "report.json").read_text())


def test_disaggregated_run_syncs_over_gloo_and_matches_the_local_run_token_for_token(cli, tmp_path):
    proc = cli("run", "base-disaggregated", "--out", "r", "-q", *SMALL, env=RAY_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(tmp_path)
    cluster = report["environment"]["cluster"]
    assert (cluster["executor"], cluster["mode"], cluster["sync"]) == ("ray", "disaggregated", "distributed (gloo)")
    assert all(s["weight_sync_transport"] == "distributed (gloo)" for s in report["steps"])
    gates = {g["name"]: g["passed"] for g in report["gates"]}
    assert gates["weight_sync"] and gates["logprob_alignment"], report["gates"]

    local = cli("run", "base-disaggregated", "--out", "local", "-q", *SMALL, "--executor", "local",
                "--mode", "colocate", "--gates", "none")
    assert local.returncode == 0, local.stderr
    same = [(s["tokens_digest"], s["loss"], s["weights_checksum"]) for s in report["steps"]]
    assert same == [(s["tokens_digest"], s["loss"], s["weights_checksum"]) for s in report_of(tmp_path, "local")["steps"]]


def test_a_partial_sync_over_the_process_group_is_caught(cli, tmp_path):
    proc = cli("run", "base-disaggregated", "--out", "r", "-q", "--steps", "2", *SMALL, "--inject-fault",
               "partial-sync", "--gates", "weight_sync", env=RAY_ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (gate,) = report_of(tmp_path)["gates"]
    assert not gate["passed"] and "checksum" in gate["detail"]


def test_an_unreachable_ray_address_is_a_clear_error(cli, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    proc = cli("run", "base-disaggregated", "--out", "r", "--ray-address", f"127.0.0.1:{port}", env=RAY_ENV,
               timeout=30)
    assert proc.returncode == 2
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_more_devices_than_the_cluster_has_lists_what_it_has(cli, tmp_path):
    proc = cli("run", "base-disaggregated", "--out", "r", "--train-devices", "8", "--rollout-devices", "8",
               "--set", "rollout.prompts_per_step=8", env=RAY_ENV)
    assert proc.returncode == 2, proc.stderr
    assert "needs 16 bundles" in proc.stderr and "the Ray cluster has {'CPU'" in proc.stderr


def test_a_dead_engine_actor_ends_the_run_as_error_and_the_checkpoint_resumes(cli, tmp_path):
    args = [sys.executable, "-m", "agentbench_npu", "run", "base-disaggregated", "--out", "r", "-q", "--steps", "40",
            "--set", "checkpoint.every=1", "--gates", "none", *SMALL]
    run = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, **RAY_ENV}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "r" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*/manifest.json"))):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)  # polling interval only
    killed = subprocess.run(["pkill", "-9", "-f", "ray::EngineWorker"], capture_output=True)
    assert killed.returncode == 0, "no engine actor process to kill"
    out, err = run.communicate(timeout=240)
    assert run.returncode == 2, out + err
    assert "a Ray worker died" in err
    report = report_of(tmp_path)
    assert report["status"] == "error" and "a Ray worker died" in report["error"]
    done = len(report["steps"])
    resumed = cli("run", "base-disaggregated", "--resume", "r", "--steps", str(done + 1), "-q", "--gates", "none",
                  *SMALL, env=RAY_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert report_of(tmp_path)["status"] == "passed"


# -- a real two-node Ray cluster on loopback ----------------------------------------------------
@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    head = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                          env=env, capture_output=True, text=True)
    address = f"127.0.0.1:{port}"
    try:
        assert head.returncode == 0, head.stderr
        worker = subprocess.run([ray_bin, "start", f"--address={address}", *common], env=env, capture_output=True,
                                text=True)
        assert worker.returncode == 0, worker.stderr
        yield address
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)


def test_multi_node_ranks_agree_on_a_two_node_cluster(cli, tmp_path, two_node_cluster):
    proc = cli("run", "multi-node", "--out", "r", "-q", "--ray-address", two_node_cluster, *SMALL, env=RAY_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(tmp_path)
    assert report["environment"]["cluster"]["actor_nodes"] == 2  # the ranks really sit on two nodes
    ranks = next(g for g in report["gates"] if g["name"] == "ranks")
    assert ranks["passed"] and ranks["value"]["ranks"] == 2, ranks
    assert all(len(set(s["rank_checksums"])) == 1 for s in report["steps"])


def test_rank_divergence_is_caught_by_the_ranks_gate(cli, tmp_path, two_node_cluster):
    proc = cli("run", "multi-node", "--out", "r", "-q", "--steps", "2", "--ray-address", two_node_cluster, *SMALL,
               "--inject-fault", "rank-divergence", "--gates", "ranks", env=RAY_ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (gate,) = report_of(tmp_path)["gates"]
    assert not gate["passed"] and "parameter checksums differ across ranks" in gate["detail"]


MEGATRON_TP2_DP2 = ("run", "base", "--trainer", "megatron", "--set", "megatron.tensor_parallel=2", "--executor", "ray",
                    "--train-devices", "4", "--steps", "2", "--out", "r", "-q", *SMALL)
needs_megatron = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA host runs Megatron on its GPU "
                                                                     "(tests/device/)")


@needs_megatron
def test_megatron_tensor_and_data_parallel_over_two_nodes_pass_every_gate(cli, tmp_path, two_node_cluster):
    # 4 ranks: TP 2 within a node, DP 2 across the nodes; each TP pair trains on its own data shard
    proc = cli(*MEGATRON_TP2_DP2, "--ray-address", two_node_cluster, env=RAY_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = report_of(tmp_path)
    assert report["environment"]["cluster"]["trainer_parallel"] == {"tp": 2, "pp": 1, "ep": 1, "dp": 2}
    assert {g["name"]: g["passed"] for g in report["gates"]} == {
        "logprob_alignment": True, "weight_sync": True, "reproducibility": True, "checkpoint_continuity": True,
        "ranks": True}


@needs_megatron
def test_a_diverging_data_parallel_replica_of_a_split_model_is_caught_by_the_ranks_gate(cli, tmp_path,
                                                                                     two_node_cluster):
    proc = cli(*MEGATRON_TP2_DP2, "--ray-address", two_node_cluster, "--inject-fault", "rank-divergence",
               "--gates", "ranks", env=RAY_ENV)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (gate,) = report_of(tmp_path)["gates"]
    # rank 1 (replica 0's second TP rank) keeps its local gradients: replica 0's weights leave replica 1's
    assert not gate["passed"] and "rank 0" in gate["detail"] and "rank 2" in gate["detail"]


def test_a_disaggregated_server_engine_gets_engine_tp_size_devices(cli, tmp_path, two_node_cluster):
    proc = cli("run", "base", "--executor", "ray", "--mode", "disaggregated", "--engine", "sglang",
               "--set", "engine.launcher=agentbench", "--set", "engine.tp_size=2", "--ray-address", two_node_cluster,
               "--steps", "1", "--gates", "logprob_alignment,weight_sync", "--out", "r", "-q", *SMALL, env=RAY_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = report_of(tmp_path)
    assert report["environment"]["cluster"]["engine_devices"] == 2  # a bundle of 2 CPUs for the one engine
    assert all(g["passed"] for g in report["gates"])
    # 3 of the 4 CPUs: a second engine of 2 does not fit, and the refusal says what the run needs
    proc = cli("run", "base", "--executor", "ray", "--mode", "disaggregated", "--engine", "sglang",
               "--set", "engine.launcher=agentbench", "--set", "engine.tp_size=2", "--rollout-devices", "2",
               "--ray-address", two_node_cluster, "--steps", "1", "--out", "r2", "-q", *SMALL, env=RAY_ENV)
    assert proc.returncode == 2 and "2 engine(s) of 2 device(s)" in proc.stderr


def test_the_local_executor_refuses_several_devices(cli, tmp_path):
    proc = cli("run", "base", "--out", "r", "--train-devices", "2")
    assert proc.returncode == 2
    assert "use --executor ray" in proc.stderr
