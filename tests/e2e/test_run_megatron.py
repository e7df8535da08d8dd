"""`run --trainer megatron`: the GRPO step on Megatron-core's GPT model, judged by the same four gates.

On this CPU machine megatron-core runs with two CUDA-only calls pointed at the CPU (training/megatron/backend.py);
tensor parallelism runs over gloo between Ray actors. The engine is the in-process transformers one, so the
log-prob gate compares two different implementations of the same model.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA host runs Megatron on its GPU (tests/device/)")


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


@pytest.mark.slow
def test_base_on_the_megatron_trainer_passes_the_four_gates(cli, tmp_path):
    proc = cli("run", "base", "--trainer", "megatron", "--steps", "2", "--out", str(tmp_path / "run"), "-q")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = _report(tmp_path / "run")
    assert {g["name"]: g["passed"] for g in report["gates"]} == {
        "logprob_alignment": True, "weight_sync": True, "reproducibility": True, "checkpoint_continuity": True}
    cluster = report["environment"]["cluster"]
    assert (cluster["trainer"], cluster["trainer_model"]) == ("megatron", "GPTModel")
    assert cluster["trainer_parallel"] == {"tp": 1, "pp": 1, "ep": 1, "dp": 1}
    # Megatron's kernels against transformers' in fp32: only the order of arithmetic differs
    assert all(step["logprob_abs_diff_mean"] < 1e-6 for step in report["steps"])


@pytest.mark.slow
def test_tensor_parallel_over_two_ray_ranks_passes_and_checkpoints_each_ranks_optimizer(cli, tmp_path):
    proc = cli("run", "base", "--trainer", "megatron", "--set", "megatron.tensor_parallel=2", "--executor", "ray",
               "--train-devices", "2", "--steps", "2", "--out", str(tmp_path / "run"), "-q")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = _report(tmp_path / "run")
    assert {g["name"]: g["passed"] for g in report["gates"]} == {
        "logprob_alignment": True, "weight_sync": True, "reproducibility": True, "checkpoint_continuity": True}
    assert report["environment"]["cluster"]["trainer_parallel"] == {"tp": 2, "pp": 1, "ep": 1, "dp": 1}
    checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert (checkpoint / "trainer-rank1.pt").is_file()  # rank 1's Adam moments are its own, not rank 0's
    assert "trainer-rank1.pt" in json.loads((checkpoint / "manifest.json").read_text())


@pytest.mark.slow
def test_a_moe_model_reports_the_routing_the_torch_trainer_reports(cli, tmp_path):
    loads = {}
    for trainer in ("torch", "megatron"):
        proc = cli("run", "base", "--model", "tiny-moe", "--trainer", trainer, "--steps", "1",
                   "--out", str(tmp_path / trainer), "-q")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        step = _report(tmp_path / trainer)["steps"][0]
        loads[trainer] = (step["moe_expert_load"], step["moe_router_entropy"])
    # the same rollout, the same weights, the same top-k: every router sends every token where transformers' does
    assert loads["megatron"][0] == loads["torch"][0]
    assert loads["megatron"][1] == pytest.approx(loads["torch"][1], rel=1e-5)


@pytest.mark.slow
def test_expert_parallel_over_two_ray_ranks_passes_every_gate_and_checkpoints_each_ranks_experts(cli, tmp_path):
    proc = cli("run", "base", "--model", "tiny-moe", "--trainer", "megatron", "--set", "megatron.expert_parallel=2",
               "--executor", "ray", "--train-devices", "2", "--steps", "2", "--out", str(tmp_path / "run"), "-q")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = _report(tmp_path / "run")
    assert {g["name"]: g["passed"] for g in report["gates"]} == {
        "logprob_alignment": True, "weight_sync": True, "reproducibility": True, "checkpoint_continuity": True,
        "ranks": True, "moe_health": True}
    assert report["environment"]["cluster"]["trainer_parallel"] == {"tp": 1, "pp": 1, "ep": 2, "dp": 2}
    checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert json.loads((checkpoint / "state.json").read_text())["expert_parallel"] == 2
    # each EP rank's Adam moments cover its own half of the experts: the two files hold different moments
    states = [torch.load(checkpoint / name, weights_only=False)["optimizer"]["state"]
              for name in ("trainer.pt", "trainer-rank1.pt")]
    assert states[0].keys() == states[1].keys()
    differ = [k for k in states[0] if not torch.equal(states[0][k]["exp_avg"], states[1][k]["exp_avg"])]
    assert differ and len(differ) < len(states[0])  # the experts differ; the dense layers (one data-parallel sum) agree


@pytest.mark.slow
def test_tensor_parallel_ranks_that_skip_summing_their_norm_gradients_are_caught(cli, tmp_path):
    proc = cli("run", "base", "--trainer", "megatron", "--set", "megatron.tensor_parallel=2", "--executor", "ray",
               "--train-devices", "2", "--steps", "2", "--inject-fault", "unsummed-tp-norm-grads",
               "--out", str(tmp_path / "run"), "-q")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    gates = {g["name"]: g for g in _report(tmp_path / "run")["gates"]}
    # the engine gets rank 0's q/k norms; the trainer computes rank 1's heads with rank 1's own
    assert not gates["weight_sync"]["passed"] and gates["weight_sync"]["detail"].startswith("step")
    assert gates["reproducibility"]["passed"]  # deterministic, wrong alike
    assert "ranks" not in gates  # TP 2 x DP 1: one data-parallel rank, nothing for the ranks gate to compare


@pytest.mark.parametrize("args, message", [
    (["--set", "megatron.tensor_parallel=2"],
     "megatron.tensor_parallel (2) must divide cluster.train_devices (1); several trainer ranks run on Ray"),
    (["--set", "megatron.pipeline_parallel=2"], "megatron.pipeline_parallel is 2: the Megatron trainer runs no "
                                                "pipeline schedule yet"),
    (["--set", "megatron.expert_parallel=2"], "megatron.expert_parallel (2) must divide the data-parallel size (1"),
    (["--executor", "ray", "--train-devices", "2", "--set", "megatron.expert_parallel=2"],
     "expert parallel size 2 splits the experts of a mixture-of-experts model, and this one is dense"),
    (["--model", "tiny-moe", "--executor", "ray", "--train-devices", "2", "--set", "megatron.tensor_parallel=2"],
     "trains only with sequence parallelism, which needs Transformer Engine (not installed)"),
])
def test_splits_and_models_it_cannot_run_are_refused_in_one_line(cli, tmp_path, args, message):
    proc = cli("run", "base", "--trainer", "megatron", *args, "--steps", "1", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "report.json").exists()


def test_the_norm_gradient_fault_is_refused_where_nothing_is_split(cli, tmp_path):
    proc = cli("run", "base", "--trainer", "megatron", "--inject-fault", "unsummed-tp-norm-grads",
               "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "megatron.tensor_parallel=2" in proc.stderr
