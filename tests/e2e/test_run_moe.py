"""Scenarios `moe` and `r3` end to end on the tiny profile (tiny-moe), in fresh processes, as a user runs them:
the moe_health gate, the routing summary both ways (with and without rollout routing replay), the MoE faults and
what is refused up front."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GATES = ["logprob_alignment", "weight_sync", "reproducibility", "checkpoint_continuity", "moe_health"]
SMALL = ("--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=4", "-q")
MOE_STEP_FIELDS = {
    "moe_route_agreement", "moe_load_cv", "moe_load_imbalance", "moe_load_max_min", "moe_dead_experts",
    "moe_dead_fraction", "moe_router_entropy", "moe_router_entropy_max", "moe_nonfinite_router_logits",
    "moe_expert_load", "moe_routing_replay", "moe_routes_recorded", "logprob_abs_diff_mean_replay",
    "logprob_abs_diff_mean_no_replay", "kl_replay", "kl_no_replay",
    "nonfinite_logprobs", "nonfinite_loss", "skipped_updates", "aborted_fraction",
}
ROUTING_SUMMARY = {"moe_route_agreement", "logprob_abs_diff_mean_replay", "logprob_abs_diff_mean_no_replay",
                   "kl_replay", "kl_no_replay", "replay", "mismatch_ratio_no_replay_over_replay"}
NUM_EXPERTS, NUM_LAYERS = 8, 2  # tiny-moe


def agentbench(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbench_npu", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=900)


def load_report(run_dir: Path) -> tuple[dict, dict[str, dict]]:
    report = json.loads((run_dir / "report.json").read_text())
    return report, {g["name"]: g for g in report["gates"]}


# -- scenario moe, defaults --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`agentbench-npu run moe` with its defaults (4 steps, 8x8, every gate); the run dir sits in runs/ so that the
    checklist can read it."""
    cwd = tmp_path_factory.mktemp("moe-run")
    proc = agentbench(cwd, "run", "moe", "--out", "runs/moe", "-q")
    return cwd, proc


def test_default_moe_run_passes_the_four_gates_and_moe_health(moe_run):
    cwd, proc = moe_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, gates = load_report(cwd / "runs" / "moe")
    assert report["scenario"] == "moe" and report["status"] == "passed" and report["error"] is None
    assert report["checklist_item"] == "Qwen3-30B-A3B end-to-end"
    assert report["config"]["model"]["name"] == "tiny-moe"
    assert report["config"]["model"]["engine_dtype"] in ("", "float32")
    assert report["config"]["train"]["routing_replay"] is False
    assert report["config"]["run"]["steps"] == 4
    assert [g["name"] for g in report["gates"]] == GATES
    assert all(g["passed"] for g in gates.values()), {n: g["detail"] for n, g in gates.items()}
    health = gates["moe_health"]
    assert health["value"]["nonfinite"] == 0 and health["value"]["dead_fraction"] <= 0.1
    assert health["detail"].startswith("4 steps finite"), health["detail"]
    assert "gate moe_health: pass" in proc.stdout


def test_every_moe_step_carries_routing_and_health_fields(moe_run):
    cwd, _ = moe_run
    report, _ = load_report(cwd / "runs" / "moe")
    assert [s["step"] for s in report["steps"]] == [0, 1, 2, 3]
    for row in report["steps"]:
        assert MOE_STEP_FIELDS <= set(row), MOE_STEP_FIELDS - set(row)
        assert 0.0 <= row["moe_route_agreement"] <= 1.0
        # engine and trainer both in float32: they route every token alike
        assert row["moe_route_agreement"] == 1.0, row["moe_route_agreement"]
        assert 0.0 <= row["moe_load_imbalance"] <= 1.0
        assert row["moe_load_cv"] >= 0 and row["moe_load_max_min"] >= 1
        assert row["moe_dead_experts"] == 0 and row["moe_dead_fraction"] == 0.0
        assert row["moe_router_entropy_max"] == pytest.approx(math.log(NUM_EXPERTS))
        assert 0 < row["moe_router_entropy"] <= row["moe_router_entropy_max"]
        assert row["moe_routing_replay"] is False and row["moe_routes_recorded"] is True
        assert (row["nonfinite_logprobs"], row["nonfinite_loss"], row["skipped_updates"],
                row["moe_nonfinite_router_logits"], row["aborted_fraction"]) == (0, 0, 0, 0, 0.0)
        load = row["moe_expert_load"]
        assert sorted(load) == [str(i) for i in range(NUM_LAYERS)]
        assert all(len(v) == NUM_EXPERTS for v in load.values())
        # every token goes to top_k experts in every layer: the same total per layer
        assert len({sum(v) for v in load.values()}) == 1
        # without replay the step's own mismatch is the no-replay one
        assert row["logprob_abs_diff_mean"] == row["logprob_abs_diff_mean_no_replay"]


def test_with_identical_routes_replay_changes_nothing(moe_run):
    """Routes agree everywhere (fp32 engine), so replaying them must give the same log-probs as not replaying:
    both mismatches at float32 noise. (The first MoE commit measured the reference case after the optimizer step,
    which showed replay ~3e-2 here; fixed in 757efe8.)"""
    cwd, _ = moe_run
    report, _ = load_report(cwd / "runs" / "moe")
    routing = report["summary"]["routing"]
    assert set(routing) == ROUTING_SUMMARY
    assert routing["replay"] is False
    assert routing["moe_route_agreement"] == 1.0
    assert routing["logprob_abs_diff_mean_no_replay"] <= 1e-5
    assert routing["logprob_abs_diff_mean_replay"] <= 1e-5, routing
    assert routing["kl_replay"] <= 1e-8 and routing["kl_no_replay"] <= 1e-8, routing
    assert routing["mismatch_ratio_no_replay_over_replay"] == pytest.approx(1.0, rel=1e-6)
    for row in report["steps"]:
        for key in ("logprob_abs_diff_mean", "kl"):
            assert row[f"{key}_replay"] == pytest.approx(row[f"{key}_no_replay"], rel=1e-6, abs=1e-12), row["step"]


def test_moe_report_has_the_routing_section_and_plot(moe_run):
    cwd, _ = moe_run
    run_dir = cwd / "runs" / "moe"
    md = (run_dir / "report.md").read_text()
    assert "## MoE routing (engine vs trainer)" in md
    section = md.split("## MoE routing (engine vs trainer)", 1)[1].split("\n## ", 1)[0]
    assert "| step | route agreement | Δlogp replay | Δlogp no replay |" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1", "2", "3"]
    assert "plots/routing.png" in md
    png = (run_dir / "plots" / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MoE routing (engine vs trainer)" in (run_dir / "report.html").read_text()


def test_the_moe_run_passes_the_qwen3_30b_a3b_checklist_item(moe_run):
    cwd, _ = moe_run
    proc = agentbench(cwd, "checklist", "--runs", "runs", "--only", "qwen3-30b-a3b,r3", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in json.loads(proc.stdout)}
    assert rows["qwen3-30b-a3b"]["status"] == "passed", rows["qwen3-30b-a3b"]["detail"]
    assert rows["qwen3-30b-a3b"]["scenarios"] == ["moe"] and "moe_health" in rows["qwen3-30b-a3b"]["required_gates"]
    assert rows["r3"]["scenarios"] == ["r3"] and rows["r3"]["status"] == "not run"


def test_list_shows_the_moe_scenarios_gate_and_faults(cli):
    proc = cli("list")
    assert proc.returncode == 0, proc.stderr
    names = {line.split("│")[1].strip() for line in proc.stdout.splitlines() if line.startswith("│")}
    assert {"moe", "r3", "moe_health", "corrupt-routing", "nan-expert"} <= names
    items = json.loads(cli("list", "--json").stdout)["items"]
    scenarios = {i["name"]: i for i in items["scenario"]}
    assert scenarios["moe"]["checklist_item"] == "Qwen3-30B-A3B end-to-end"
    assert scenarios["r3"]["checklist_item"] == "R3 (Rollout Routing Replay)"
    assert "moe_health" in {g["name"] for g in items["gate"]}
    assert {"corrupt-routing", "nan-expert"} <= {f["name"] for f in items["fault"]}


# -- scenario r3: replay vs no replay with a bf16 engine -----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_r3_replay_lowers_the_train_rollout_mismatch(cli, tmp_path, seed):
    # The seeds of docs/moe.md's table (no replay / replay: 1.26x, 1.005x, 1.19x). Not every seed shows it: on
    # the warmed-up tiny model routes flip at ~0.4% of (token, layer) pairs, mostly where the next token is
    # near-certain, so on seed 3 the two are equal to 1e-4 (replay 0.9999x) — docs/moe.md says so. Runs are
    # bitwise deterministic, so these three are facts, not draws.
    proc = cli("run", "r3", "--engine-dtype", "bfloat16", "--seed", str(seed), "--gates", "none", "--out", "r", "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, gates = load_report(tmp_path / "r")
    assert report["status"] == "passed" and gates == {}
    assert report["config"]["model"]["engine_dtype"] == "bfloat16"
    assert report["config"]["train"]["routing_replay"] is True
    assert report["config"]["train"]["routing_compare"] is True
    steps = report["steps"]
    for row in steps:
        assert MOE_STEP_FIELDS <= set(row), MOE_STEP_FIELDS - set(row)
        assert row["moe_routing_replay"] is True and row["moe_routes_recorded"] is True
        # with replay on, the step's own mismatch is the replayed one
        assert row["logprob_abs_diff_mean"] == row["logprob_abs_diff_mean_replay"]
        assert 0.0 <= row["moe_route_agreement"] <= 1.0
        if row["moe_route_agreement"] == 1.0:  # no flip (read without replay): replay has nothing to fix
            assert row["logprob_abs_diff_mean_replay"] == pytest.approx(row["logprob_abs_diff_mean_no_replay"],
                                                                        rel=1e-6, abs=1e-12)
    # bf16 rounding flips some routes, so the comparison below is not vacuous
    assert any(row["moe_route_agreement"] < 1.0 for row in steps), [r["moe_route_agreement"] for r in steps]
    routing = report["summary"]["routing"]
    assert set(routing) == ROUTING_SUMMARY
    assert routing["replay"] is True
    assert 0.9 < routing["moe_route_agreement"] < 1.0, routing
    assert routing["logprob_abs_diff_mean_replay"] < routing["logprob_abs_diff_mean_no_replay"], routing
    assert routing["kl_replay"] < routing["kl_no_replay"], routing
    assert routing["mismatch_ratio_no_replay_over_replay"] == pytest.approx(
        routing["logprob_abs_diff_mean_no_replay"] / routing["logprob_abs_diff_mean_replay"])
    assert routing["mismatch_ratio_no_replay_over_replay"] > 1.0
    assert "## MoE routing (engine vs trainer)" in (tmp_path / "r" / "report.md").read_text()


# -- faults --------------------------------------------------------------------------------------------------------


def test_corrupt_routing_is_caught_by_logprob_alignment_and_moe_health_stays_green(cli, tmp_path):
    proc = cli("run", "r3", "--inject-fault", "corrupt-routing", "--steps", "4", "--out", "runs/r", *SMALL)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, gates = load_report(tmp_path / "runs" / "r")
    assert report["status"] == "failed" and report["faults"] == ["corrupt-routing"] and report["error"] is None
    assert [g["name"] for g in report["gates"]] == GATES
    caught = gates["logprob_alignment"]
    assert not caught["passed"] and caught["detail"].startswith("step"), caught["detail"]
    assert "gate logprob_alignment: FAIL" in proc.stdout
    # weight_sync may honestly fail too (its probe replays the same routes); nothing else may
    for name in ("reproducibility", "checkpoint_continuity", "moe_health"):
        assert gates[name]["passed"], f"false alarm from {name}: {gates[name]['detail']}"
    # replaying wrong experts makes the mismatch with replay far worse than without it
    routing = report["summary"]["routing"]
    assert routing["logprob_abs_diff_mean_replay"] > 10 * routing["logprob_abs_diff_mean_no_replay"], routing
    listed = json.loads(cli("checklist", "--runs", "runs", "--only", "r3", "--json").stdout)
    assert listed[0]["status"] == "failed" and "logprob_alignment" in listed[0]["detail"], listed[0]


@pytest.fixture(scope="module")
def nan_expert_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("nan-expert")
    proc = agentbench(cwd, "run", "moe", "--inject-fault", "nan-expert", "--steps", "2", "--out", "r", *SMALL)
    return cwd / "r", proc


def test_nan_expert_fails_moe_health_without_crashing_the_run(nan_expert_run):
    run_dir, proc = nan_expert_run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, gates = load_report(run_dir)
    assert report["status"] == "failed" and report["error"] is None and report["faults"] == ["nan-expert"]
    assert "moe_health" in gates
    health = gates["moe_health"]
    assert not health["passed"]
    assert health["detail"].startswith("step 0") and "non-finite" in health["detail"], health["detail"]
    assert health["value"]["nonfinite"] > 0
    assert "gate moe_health: FAIL" in proc.stdout
    first, second = report["steps"]
    assert first["nonfinite_logprobs"] > 0 and first["skipped_updates"] > 0
    # the NaN weights reach the engine with the next sync: it aborts every request instead of sampling NaN
    assert second["aborted_fraction"] == 1.0


def test_the_report_of_a_nan_run_is_still_standard_json(nan_expert_run):
    run_dir, _ = nan_expert_run

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads((run_dir / "report.json").read_text(), parse_constant=refuse)


# -- refused up front ----------------------------------------------------------------------------------------------

REFUSED = [
    (["run", "moe", "--inject-fault", "corrupt-routing"],
     "fault 'corrupt-routing' would not change this run: train.routing_replay is off"),
    (["run", "base", "--inject-fault", "corrupt-routing"], "model 'tiny' is dense: it has no routes to replay"),
    (["run", "base", "--inject-fault", "nan-expert"],
     "fault 'nan-expert' would not change this run: model 'tiny' is dense"),
    (["run", "base", "--model", "tiny", "--gates", "moe_health"],
     "gate 'moe_health' does not apply to this run: a training run (--mode train) of a mixture-of-experts model"),
    (["run", "moe", "--set", "model.engine_dtype=fp8"], "model.engine_dtype must be one of float32, bfloat16, float16"),
]


@pytest.mark.parametrize("args,message", REFUSED, ids=[" ".join(a[1:]) for a, _ in REFUSED])
def test_what_cannot_apply_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, args, message):
    proc = cli(*args, "--out", "never")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "never").exists()


def test_routing_replay_on_a_dense_model_is_refused_up_front(cli, tmp_path):
    proc = cli("run", "r3", "--model", "tiny", "--set", "warm_start.steps=0", "--out", "never", "-q")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "routing_replay" in lines[0] and "mixture-of-experts" in lines[0], proc.stderr
    assert "unexpected" not in lines[0]
    assert not (tmp_path / "never").exists()
