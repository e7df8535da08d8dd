"""`agentbench-npu run base` end to end on the tiny profile, in fresh processes, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STEP_FIELDS = {
    "step", "reward_mean", "reward_std", "loss", "kl", "entropy", "logprob_abs_diff_mean", "logprob_abs_diff_max",
    "rollout_seconds", "train_seconds", "weight_sync_seconds", "weights_checksum_match", "tokens_per_second",
}
ENVIRONMENT_FIELDS = {"device", "device_name", "device_count", "python", "torch", "transformers", "host",
                      "agentbench_npu"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The default run, exactly as the README's first command does it (plus an explicit --out)."""
    import os
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("base-run")
    proc = subprocess.run([sys.executable, "-m", "agentbench_npu", "run", "base", "--out", "run", "-q"],
                          cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    return cwd / "run", proc


def test_default_base_run_exits_0_and_writes_report_and_samples(base_run):
    run_dir, proc = base_run
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["schema_version"] == 1
    assert report["scenario"] == "base"
    assert report["status"] == "passed"
    assert ENVIRONMENT_FIELDS <= set(report["environment"])
    assert report["environment"]["device"] == "cpu"
    assert report["config"]["run"]["steps"] == 10
    assert report["config"]["model"]["name"] == "tiny"
    assert [(g["name"], g["passed"]) for g in report["gates"]] == [
        ("logprob_alignment", True), ("weight_sync", True), ("reproducibility", True), ("checkpoint_continuity", True),
    ]
    assert all(line in proc.stdout for line in ("gate logprob_alignment: pass", "gate checkpoint_continuity: pass"))
    assert [s["step"] for s in report["steps"]] == list(range(10))
    for row in report["steps"]:
        assert STEP_FIELDS <= set(row), STEP_FIELDS - set(row)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10 * 8 * 8
    assert {"step", "task_id", "prompt", "response", "reward"} <= set(samples[0])
    assert "report.json" in proc.stdout


def test_every_step_has_aligned_logprobs_and_verified_weight_sync(base_run):
    run_dir, _ = base_run
    steps = json.loads((run_dir / "report.json").read_text())["steps"]
    for row in steps:
        assert row["logprob_abs_diff_mean"] <= 1e-5, row
        assert row["logprob_abs_diff_max"] <= 1e-4, row
        assert row["weights_checksum_match"] is True
        assert row["weight_sync_seconds"] > 0


def test_warm_start_gives_nonzero_rewards_from_the_first_step(base_run):
    run_dir, _ = base_run
    steps = json.loads((run_dir / "report.json").read_text())["steps"]
    assert steps[0]["reward_mean"] > 0
    assert 0 < steps[0]["reward_mean"] < 1, "a saturated start leaves GRPO nothing to learn"


def test_final_checkpoint_is_a_loadable_model_dir(base_run):
    run_dir, _ = base_run
    ckpt = run_dir / "checkpoints" / "step-000010"
    assert (ckpt / "manifest.json").is_file()
    assert (ckpt / "model" / "config.json").is_file()
    assert (ckpt / "model" / "tokenizer.json").is_file()


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(cli, tmp_path):
    common = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.samples_per_prompt=4", "--gates", "none", "-q"]
    whole = cli("run", "base", "--steps", "4", "--out", "whole", *common)
    assert whole.returncode == 0, whole.stderr
    first = cli("run", "base", "--steps", "2", "--out", "split", *common)
    assert first.returncode == 0, first.stderr
    resumed = cli("run", "base", "--steps", "4", "--resume", "split", *common)
    assert resumed.returncode == 0, resumed.stderr

    a = json.loads((tmp_path / "whole" / "report.json").read_text())
    b = json.loads((tmp_path / "split" / "report.json").read_text())
    assert b["resumed_from"].endswith("step-000002")
    assert [s["step"] for s in b["steps"]] == [0, 1, 2, 3]
    for key in ("loss", "reward_mean", "weights_checksum", "entropy"):
        assert [s[key] for s in a["steps"]] == [s[key] for s in b["steps"]], key
    samples = (tmp_path / "split" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 * 2 * 4


def test_a_jsonl_dataset_replaces_generated_tasks(cli, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?", "label": i + 1}) for i in range(5)) + "\n")
    proc = cli("run", "base", "--steps", "1", "--out", "ds", "--set", f"data.path={data}",
               "--set", "rollout.prompts_per_step=5", "--set", "rollout.samples_per_prompt=2", "--gates", "none", "-q")
    assert proc.returncode == 0, proc.stderr
    prompts = {json.loads(line)["prompt"] for line in (tmp_path / "ds" / "samples.jsonl").read_text().splitlines()}
    assert len(prompts) == 5 and all(any(f"What is {i} + 1?" in p for p in prompts) for i in range(5))


BAD_INPUT = [
    (["run", "bsae"], "unknown scenario 'bsae' (did you mean: base?)"),
    (["run", "base", "--device", "tpu"], "unknown device 'tpu'"),
    (["run", "base", "--device", "npu"], "agentbench-npu[npu]"),
    (["run", "base", "--model", "/nonexistent/Qwen3-4B"], "is neither a tiny model"),
    (["run", "base", "--set", "train.lrr=1"], "unknown key 'train.lrr' (did you mean: train.lr,"),
    (["run", "base", "--set", "rollout.max_new_tokens=lots"], "rollout.max_new_tokens must be an integer"),
    (["run", "base", "--set", "nosuch"], "expected KEY=VALUE"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a[1:]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, args, message):
    proc = cli(*args, "--out", "never")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert not (tmp_path / "never").exists()


def test_model_dir_without_tokenizer_is_refused(cli, tmp_path):
    model_dir = tmp_path / "half-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    proc = cli("run", "base", "--model", str(model_dir), "--out", "never")
    assert proc.returncode == 2
    assert "has no tokenizer" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_malformed_dataset_line_names_file_and_line(cli, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?", "label": 2}\n{"prompt": "oops", \n')
    proc = cli("run", "base", "--set", f"data.path={data}", "--out", "never")
    assert proc.returncode == 2
    assert f"{data}:2: not valid JSON" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_list_names_the_plugin_and_distribution_behind_builtins(cli):
    proc = cli("list", "--json")
    assert proc.returncode == 0, proc.stderr
    items = json.loads(proc.stdout)["items"]
    base = next(i for i in items["scenario"] if i["name"] == "base")
    assert base["distribution"] == "agentbench-npu"
    assert base["plugin"] == "agentbench_npu.builtin.plugin"
    assert {d["name"] for d in items["device"]} >= {"cpu", "cuda", "npu"}
    assert {e["name"] for e in items["engine"]} >= {"reference"}
    listing = json.loads(proc.stdout)
    assert set(listing["trainers"]) == {"torch", "megatron"}
    assert {"tiny", "a2", "a3", "a5", "h100"} <= set(listing["profiles"])
    assert listing["model_recipes"] == ["qwen2.5-3b", "qwen3-30b-a3b", "qwen3-4b"]
