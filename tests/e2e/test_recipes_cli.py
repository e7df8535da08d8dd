"""`run --profile a2|a3|a5|h100 --model PATH`: the profile, the model's recipe (found by its config.json), the
memory plan — checked on this CPU machine with the published config.json of each model (no weights needed for
--dry-run) and, for the refusal before a real run starts, with the tiny model's checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from agentbench_npu.models.loading import resolve_model_dir
from tests.unit.test_megatron_convert import QWEN3_4B, QWEN3_30B_A3B


def checkpoint(tmp_path, config: dict, name: str = "model"):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("profile, device, train_devices", [("a2", "npu", 8), ("a3", "npu", 16), ("a5", "npu", 8),
                                                            ("h100", "cuda", 8)])
def test_qwen3_4b_gets_its_recipe_on_every_profile(cli, tmp_path, profile, device, train_devices):
    proc = cli("run", "base", "--profile", profile, "--model", checkpoint(tmp_path, QWEN3_4B), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "recipe: scenarios/models/qwen3-4b.toml" in out and "4.02 B parameters" in out
    assert "trainer rank 30.0 GiB (megatron, 16 B/param / TP 2" in out  # 60 GiB unsplit does not fit 64 GiB NPUs
    for line in (f'device = "{device}"', 'trainer = "megatron"', 'engine = "sglang"', "tensor_parallel = 2",
                 f"train_devices = {train_devices}", 'engine_dtype = "bfloat16"', "logprob_mean = 0.03"):
        assert line in out, line


def test_the_users_settings_win_over_the_recipe_and_what_cannot_fit_is_refused(cli, tmp_path):
    model = checkpoint(tmp_path, QWEN3_4B)
    proc = cli("run", "base", "--profile", "a2", "--model", model, "--set", "megatron.tensor_parallel=4", "--dry-run")
    assert proc.returncode == 0 and "tensor_parallel = 4" in proc.stdout and "TP 4" in proc.stdout
    proc = cli("run", "base", "--profile", "a2", "--model", model, "--trainer", "torch", "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("profile a2: a trainer rank needs 59.9 GiB (torch, 16 B/param; the engine releases its memory for the "
            "step), and 64 GiB devices leave 51.2 GiB") in proc.stderr


def test_qwen3_30b_a3b_trains_with_its_experts_split_over_tp_x_ep_and_less_is_refused(cli, tmp_path):
    model = checkpoint(tmp_path, QWEN3_30B_A3B)
    proc = cli("run", "base", "--profile", "a3", "--model", model, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "recipe: scenarios/models/qwen3-30b-a3b.toml" in proc.stdout
    # dense layers / TP 4, experts / (TP 4 x EP 4); engines apart, bf16 over 4 devices each
    assert "trainer rank 32.7 GiB (megatron, 16 B/param / TP 4, experts / TP x EP 16)" in proc.stdout
    assert "engine weights 14.2 GiB" in proc.stdout
    proc = cli("run", "base", "--profile", "a3", "--model", model, "--set", "megatron.expert_parallel=2", "--dry-run")
    assert proc.returncode == 2 and "a trainer rank needs 59.7 GiB" in proc.stderr
    assert "raise megatron.expert_parallel (it must divide the 4 data-parallel ranks and the 128 experts)" in proc.stderr
    # colocated, an engine worker shares one device with a trainer rank: a server split over 4 cannot launch
    proc = cli("run", "base", "--profile", "a3", "--model", model, "--mode", "eval", "--mode", "colocate", "--dry-run")
    assert proc.returncode == 2 and "use --mode disaggregated (each engine then gets engine.tp_size" in proc.stderr


def test_a_model_no_recipe_knows_runs_on_the_profile_alone(cli, tmp_path):
    other = {**QWEN3_4B, "num_hidden_layers": 28, "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16}
    proc = cli("run", "base", "--profile", "a2", "--model", checkpoint(tmp_path, other), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "no model recipe matched" in proc.stdout and 'trainer = "torch"' in proc.stdout


def test_a_real_run_that_cannot_fit_stops_before_anything_starts(cli, tmp_path):
    model = tmp_path / "tiny-copy"
    shutil.copytree(resolve_model_dir("tiny"), model)
    proc = cli("run", "base", "--profile", "a2", "--model", str(model), "--device", "cpu", "--executor", "local",
               "--set", "cluster.train_devices=1", "--set", "cluster.rollout_devices=1",
               "--set", "hardware.memory_gib=0.002", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-1000:]
    # 361k parameters: 5.5 MiB of trainer state and the bf16 engine beside it, over 0.8 x 2 MiB
    assert "profile a2: a trainer rank needs 0.0 GiB (torch, 16 B/param) + the engine's" in proc.stderr
    assert not (tmp_path / "r" / "report.json").exists()
