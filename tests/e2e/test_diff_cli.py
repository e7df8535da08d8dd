"""`agentbench-npu diff` end to end: real runs of `base` on the tiny profile, compared in fresh processes as a user
compares them. Tolerances are set from what the runs actually recorded, so each test states its bound exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = tomllib.loads((REPO / "scenarios" / "diff.toml").read_text(encoding="utf-8"))
STEPS = 4


def agentbench(*args: str, cwd: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbench_npu", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def base_run(factory: pytest.TempPathFactory, name: str, *extra: str) -> Path:
    cwd = factory.mktemp(f"diff-{name}")
    proc = agentbench("run", "base", "--steps", str(STEPS), "-q", "--out", name, *extra, cwd=cwd)
    assert (cwd / name / "report.json").is_file(), proc.stderr[-3000:]
    return cwd / name


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    return base_run(tmp_path_factory, "A", "--gates", "none", "--seed", "0")


@pytest.fixture(scope="module")
def run_b(tmp_path_factory) -> Path:
    return base_run(tmp_path_factory, "B", "--gates", "none", "--seed", "1")


@pytest.fixture(scope="module")
def run_c(tmp_path_factory) -> Path:
    return base_run(tmp_path_factory, "C", "--gates", "weight_sync", "--seed", "0", "--inject-fault", "stale-weights")


def steps(run: Path) -> list[dict[str, Any]]:
    return json.loads((run / "report.json").read_text(encoding="utf-8"))["steps"]


def last_k_mean(run: Path, metric: str, k: int) -> float:
    """The mean of the last k steps, summed in the order diff sums them."""
    tail = [float(r[metric]) for r in steps(run)][-k:]
    return sum(tail) / len(tail)


def loose_except(metric: str, **entry: float) -> str:
    """A tolerance file that sets `metric` as given and every other default metric so loose it cannot fail."""
    lines = []
    for name in DEFAULTS["metrics"]:
        body = entry if name == metric else {"abs": 1e9, "rel": 0.0, "max_gap": 1e9}
        lines += [f"[metrics.{name}]"] + [f"{k} = {v!r}" for k, v in body.items()] + [""]
    return "\n".join(lines)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    return lines[0]


def test_the_runs_differ_only_as_asked(run_a, run_b, run_c):
    a, b, c = (json.loads((r / "report.json").read_text()) for r in (run_a, run_b, run_c))
    assert [r["step"] for r in a["steps"]] == [r["step"] for r in b["steps"]] == list(range(STEPS))
    assert (a["status"], b["status"], a["gates"], b["gates"]) == ("passed", "passed", [], [])
    assert [(g["name"], g["passed"]) for g in c["gates"]] == [("weight_sync", False)]
    assert c["faults"] == ["stale-weights"]


@pytest.mark.parametrize("k_flag", [None, 2], ids=["last_k from the defaults", "--last-k 2"])
@pytest.mark.parametrize("side", ["above", "below"])
def test_reward_mean_within_exactly_as_configured(run_a, run_b, tmp_path, side, k_flag):
    k = k_flag or DEFAULTS["last_k"]
    delta = last_k_mean(run_b, "reward_mean", k) - last_k_mean(run_a, "reward_mean", k)
    assert delta != 0, "seeds 0 and 1 should end with different rewards"
    bound = abs(delta) * (1.0 + 1e-6 if side == "above" else 1.0 - 1e-6)
    tol = tmp_path / "tol.toml"
    tol.write_text(loose_except("reward_mean", abs=bound, rel=0.0), encoding="utf-8")
    args = ["diff", str(run_a), str(run_b), "--tolerances", str(tol), "--format", "json"]
    proc = agentbench(*args, *(["--last-k", str(k_flag)] if k_flag else []), cwd=tmp_path)
    assert proc.returncode == (0 if side == "above" else 1), proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["within_tolerance"] is (side == "above")
    (scenario,) = data["scenarios"]
    assert scenario["last_k"] == k
    assert scenario["steps_compared"] == list(range(STEPS))
    out = [m["metric"] for m in scenario["metrics"] if m["status"] == "out"]
    assert out == ([] if side == "above" else ["reward_mean"])
    reward = next(m for m in scenario["metrics"] if m["metric"] == "reward_mean")
    assert reward["delta"] == pytest.approx(delta, rel=1e-12, abs=1e-15)
    assert reward["allowed"] == bound


def test_default_tolerances_hold_between_two_seeds_on_alignment(run_a, run_b, tmp_path):
    proc = agentbench("diff", str(run_a), str(run_b), "--format", "json", cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    metrics = {m["metric"]: m for m in json.loads(proc.stdout)["scenarios"][0]["metrics"]}
    for name in ("logprob_abs_diff_mean", "kl"):
        assert metrics[name]["status"] == "ok", metrics[name]
        assert metrics[name]["first_out_step"] is None


def test_a_stale_weight_sync_is_named_with_the_step_where_it_moved(run_a, run_c, tmp_path):
    proc = agentbench("diff", str(run_a), str(run_c), "--format", "json", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["within_tolerance"] is False
    (scenario,) = data["scenarios"]
    assert {"gate": "weight_sync", "baseline": None, "candidate": False, "change": "only in candidate"} \
        in scenario["gates"]
    assert "the candidate run's status is failed" in scenario["notes"]
    metrics = {m["metric"]: m for m in scenario["metrics"]}
    named = [n for n in ("logprob_abs_diff_mean", "sync_probe_abs_diff_max") if metrics[n]["status"] == "out"]
    assert named, metrics
    for name in named:
        max_gap = DEFAULTS["metrics"][name]["max_gap"]
        a, c = steps(run_a), steps(run_c)
        jumped = [r["step"] for r, q in zip(a, c) if abs(q[name] - r[name]) > max_gap]
        assert jumped, (name, [q[name] for q in c])
        assert metrics[name]["first_out_step"] == jumped[0], (name, [q[name] for q in c])
        assert f"step {jumped[0]}:" in metrics[name]["detail"]
        assert all(abs(q[name] - r[name]) < 1e-3 for r, q in zip(a, c) if r["step"] < jumped[0])


def test_a_stale_weight_sync_in_the_table_format(run_a, run_c, tmp_path):
    proc = agentbench("diff", str(run_a), str(run_c), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "OUT OF TOLERANCE" in proc.stdout
    assert "logprob_abs_diff_mean" in proc.stdout


def test_markdown_on_stdout_and_in_out_file_are_the_same(run_a, run_c, tmp_path):
    md_proc = agentbench("diff", str(run_a), str(run_c), "--format", "markdown", "--out", "diff.md", cwd=tmp_path)
    assert md_proc.returncode == 1, md_proc.stderr
    written = (tmp_path / "diff.md").read_text(encoding="utf-8")
    assert md_proc.stdout == written
    assert written.startswith("# agentbench-npu diff: OUT OF TOLERANCE: 1 of 1 scenario(s)\n")
    assert "| logprob_abs_diff_mean | out |" in written
    table_proc = agentbench("diff", str(run_a), str(run_c), "--out", "table.md", cwd=tmp_path)
    assert table_proc.returncode == 1, table_proc.stderr
    assert (tmp_path / "table.md").read_text(encoding="utf-8") == written  # the table format writes markdown


def test_json_out_file_is_the_json_on_stdout(run_a, run_b, tmp_path):
    proc = agentbench("diff", str(run_a), str(run_a / "report.json"), "--format", "json", "--out", "d.json",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "d.json").read_text(encoding="utf-8") == proc.stdout
    data = json.loads(proc.stdout)
    assert data["within_tolerance"] is True
    assert all(m["delta"] in (0.0, None) for m in data["scenarios"][0]["metrics"])


def test_a_directory_holding_a_run_dir_is_paired_by_scenario(run_a, tmp_path):
    holder = tmp_path / "baselines" / "some-name"
    holder.mkdir(parents=True)
    shutil.copy(run_a / "report.json", holder / "report.json")
    proc = agentbench("diff", str(tmp_path / "baselines"), str(run_a), "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (scenario,) = json.loads(proc.stdout)["scenarios"]
    assert scenario["scenario"] == "base"
    assert scenario["baseline"] == str(holder / "report.json")
    assert scenario["candidate"] == str(run_a / "report.json")
    assert scenario["steps_compared"] == list(range(STEPS))


def test_a_missing_path_exits_2_with_one_line(run_a, tmp_path):
    proc = agentbench("diff", str(run_a), str(tmp_path / "nowhere"), cwd=tmp_path)
    assert proc.returncode == 2
    assert str(tmp_path / "nowhere") in one_line(proc.stderr)
    assert proc.stdout == ""


@pytest.mark.parametrize("name, text", [("samples.txt", "not json at all\n"),
                                        ("other.json", '{"hello": "world"}\n'),
                                        ("v2.json", '{"schema_version": 2, "scenario": "base", "steps": []}\n')])
def test_a_file_that_is_not_a_report_exits_2_with_one_line(run_a, tmp_path, name, text):
    bad = tmp_path / name
    bad.write_text(text, encoding="utf-8")
    proc = agentbench("diff", str(bad), str(run_a), cwd=tmp_path)
    assert proc.returncode == 2
    assert str(bad) in one_line(proc.stderr)
    assert proc.stdout == ""


def test_a_bad_tolerance_file_exits_2_naming_the_key(run_a, tmp_path):
    tol = tmp_path / "tol.toml"
    tol.write_text("[metrics.reward_mean]\nabs = -0.5\n", encoding="utf-8")
    proc = agentbench("diff", str(run_a), str(run_a), "--tolerances", str(tol), cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(tol) in line and "metrics.reward_mean.abs" in line
