"""`agentbench-npu run tau-bench` end to end, in fresh processes, as a user runs it.

The checklist item "τ-bench — tool-call agentic eval": the gold policy checks the environment and the scorer
(1.0 on every shipped task), the tiny policy is scored in eval mode (pass^k, per-task table) and trained in
train mode, each behind the gates that apply to it; a run is reproducible from its seed, and bad input stops
before anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentbench_npu_tau_bench.tasks import shipped_tasks

pytestmark = pytest.mark.slow

SHIPPED_TEST = json.loads(shipped_tasks("test").read_text())


def agentbench(cwd: Path, *args: str, timeout: float = 2400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbench_npu", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def passed_report(run_dir: Path, proc: subprocess.CompletedProcess) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "passed", report["error"]
    return report


@pytest.fixture(scope="module")
def gold_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cwd = tmp_path_factory.mktemp("gold")
    proc = agentbench(cwd, "run", "tau-bench", "--mode", "eval", "--policy", "gold", "--steps", "1", "--out", "run",
                      "-q")
    return passed_report(cwd / "run", proc)


def test_gold_policy_scores_1_on_every_shipped_task(gold_run):
    evaluation = gold_run["evaluation"]
    assert evaluation["policy"] == "gold"
    assert sorted(t["task_id"] for t in evaluation["tasks"]) == sorted(t["id"] for t in SHIPPED_TEST)
    for task in evaluation["tasks"]:
        assert task["successes"] == task["trials"] == 4, task
        assert all(run["db_match"] and not run["outputs_missing"] for run in task["runs"])
    assert set(evaluation["pass_hat_k"].values()) == {1.0}
    step = gold_run["steps"][0]
    assert step["success_rate"] == 1.0 and step["tool_error_rate"] == 0.0 and step["prefix_break_rate"] == 0.0


def test_a_gold_run_is_judged_by_the_gates_that_apply_to_it(gold_run):
    # nothing is sampled (no log-probs to align) and nothing trained (no checkpoint to continue)
    assert [g["name"] for g in gold_run["gates"]] == ["weight_sync", "reproducibility"]
    assert all(g["passed"] for g in gold_run["gates"])


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cwd = tmp_path_factory.mktemp("eval")
    return passed_report(cwd / "run", agentbench(cwd, "run", "tau-bench", "--mode", "eval", "--out", "run", "-q"))


def test_the_tiny_policy_is_scored_with_pass_k_and_a_per_task_table(eval_run):
    assert [g["name"] for g in eval_run["gates"]] == ["logprob_alignment", "weight_sync", "reproducibility"]
    evaluation = eval_run["evaluation"]
    steps = eval_run["config"]["run"]["steps"]
    trials = steps * eval_run["config"]["rollout"]["samples_per_prompt"]
    assert evaluation["trials_per_task"] == trials and len(evaluation["tasks"]) == len(SHIPPED_TEST)
    curve = [evaluation["pass_hat_k"][str(k)] for k in range(1, trials + 1)]
    assert curve == sorted(curve, reverse=True)  # all k trials succeeding can only get rarer with k
    rewards = [run["reward"] for task in evaluation["tasks"] for run in task["runs"]]
    assert curve[0] == pytest.approx(sum(r == 1.0 for r in rewards) / len(rewards))
    seeds = [run["seed"] for task in evaluation["tasks"] for run in task["runs"]]
    assert len(set(seeds)) == len(seeds)  # every trial its own recorded seed
    # an eval run trains nothing: no checkpoints, no weight updates
    assert eval_run["checkpoints"] == [] and len({s["weight_version"] for s in eval_run["steps"]}) == 1


def test_the_warm_started_policy_calls_tools_and_errors_are_counted_not_fatal(eval_run):
    step = eval_run["steps"][0]
    assert step["tool_calls_mean"] > 1
    errors = sum(step[f"tool_errors_{kind}"] for kind in
                 ("unknown_tool", "malformed", "bad_arguments", "refused", "raised"))
    assert errors == pytest.approx(step["tool_error_rate"] * step["tool_calls_mean"] * step["trajectories"])


def test_two_eval_runs_with_the_same_seed_agree_exactly(tmp_path: Path, eval_run):
    args = ("run", "tau-bench", "--mode", "eval", "--steps", "1", "--gates", "none", "-q")
    first = passed_report(tmp_path / "a", agentbench(tmp_path, *args, "--out", "a"))
    second = passed_report(tmp_path / "b", agentbench(tmp_path, *args, "--out", "b"))
    assert first["evaluation"] == second["evaluation"]
    assert first["steps"][0]["tokens_digest"] == second["steps"][0]["tokens_digest"]
    other = passed_report(tmp_path / "c", agentbench(tmp_path, *args, "--seed", "1", "--out", "c"))
    assert other["steps"][0]["tokens_digest"] != first["steps"][0]["tokens_digest"]


def test_the_default_training_run_passes_all_four_gates(tmp_path: Path):
    report = passed_report(tmp_path / "run", agentbench(tmp_path, "run", "tau-bench", "--out", "run", "-q"))
    assert report["checklist_item"] == "τ-bench" and "evaluation" not in report
    assert [g["name"] for g in report["gates"]] == ["logprob_alignment", "weight_sync", "reproducibility",
                                                     "checkpoint_continuity"]
    assert all(g["passed"] for g in report["gates"]), report["gates"]
    versions = [s["weight_version"] for s in report["steps"]]
    assert versions == list(range(versions[0], versions[0] + len(versions)))  # a GRPO step and a sync per step


def test_a_teams_own_task_file_runs_through_the_same_loop(tmp_path: Path):
    rows = [{"id": "mine-1", **{k: v for k, v in SHIPPED_TEST[0].items() if k != "id"}},
            {"id": "mine-2", "user_id": SHIPPED_TEST[4]["user_id"], "instruction": SHIPPED_TEST[4]["instruction"],
             "actions": [{"name": a["name"], "arguments": a["kwargs"]} for a in SHIPPED_TEST[4]["actions"]],
             "outputs": SHIPPED_TEST[4]["outputs"]}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = passed_report(tmp_path / "run", agentbench(
        tmp_path, "run", "tau-bench", "--mode", "eval", "--policy", "gold", "--steps", "1", "--set",
        "task.tasks=mine.jsonl", "--set", "rollout.prompts_per_step=2", "--gates", "none", "--out", "run", "-q"))
    assert sorted(t["task_id"] for t in report["evaluation"]["tasks"]) == ["mine-1", "mine-2"]
    assert report["evaluation"]["pass_hat_k"]["1"] == 1.0


@pytest.mark.parametrize("args, message", [
    (("retool", "--mode", "eval", "--policy", "gold"), "scenario 'retool' has no gold policy; --policy gold works with:"),
    (("tau-bench", "--policy", "gold"), "run.policy=gold replays gold actions"),
    (("tau-bench", "--mode", "eval", "--mode", "train"), "--mode given both 'eval' and 'train'"),
    (("tau-bench", "--set", "task.user=robot"), "task.user is 'robot'; choose scripted or llm"),
    (("tau-bench", "--mode", "eval", "--set", "rollout.prompts_per_step=10"),
     "--mode eval tries every task in every step, and there are 14 tasks; set rollout.prompts_per_step=14"),
    (("tau-bench", "--mode", "eval", "--inject-fault", "drop-optimizer-state"),
     "fault 'drop-optimizer-state' would not change this run: the gate that catches it (checkpoint_continuity) "
     "does not apply"),
    (("tau-bench", "--mode", "eval", "--inject-fault", "stale-weights"), "syncs weights once, before any update"),
])
def test_bad_requests_exit_2_with_one_line_and_write_nothing(tmp_path: Path, args, message):
    proc = agentbench(tmp_path, "run", *args, "--out", "run", timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_broken_task_file_names_the_row_and_field(tmp_path: Path):
    bad = [dict(SHIPPED_TEST[0], id="ok"),
           dict(SHIPPED_TEST[1], id="broken", actions=[{"name": "cancel_order", "kwargs": {}}])]
    (tmp_path / "tasks.json").write_text(json.dumps(bad))
    proc = agentbench(tmp_path, "run", "tau-bench", "--mode", "eval", "--set", "task.tasks=tasks.json", "--out", "run",
                      timeout=300)
    assert proc.returncode == 2
    assert "tasks.json:item 2: actions[0]: unknown tool 'cancel_order'" in proc.stderr
    assert not (tmp_path / "run").exists()
