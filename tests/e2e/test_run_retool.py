"""`agentbench-npu run retool` end to end, in fresh processes, as a user runs it.

The default run (CPU, the tiny model, the `local` sandbox, every gate) is the acceptance test of the ReTool
checklist item: the policy calls a real code interpreter, reads its output, and its reward improves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from agentbench_npu.sandbox import docker as docker_backend
from agentbench_npu.sandbox.local import live_processes, lock_uids

pytestmark = pytest.mark.slow

GATES = ["logprob_alignment", "weight_sync", "reproducibility", "checkpoint_continuity"]
ROOT_PREFIX = "agentbench-sandboxes-"


def agentbench(cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbench_npu", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def sandbox_roots() -> set[str]:
    """The local sandbox providers' root dirs under the temp dir (ours and any other run's)."""
    return {p.name for p in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*")}


def roots_of_live_workers() -> set[str]:
    """Root dirs named on the command line of a live sandbox worker: a live provider's, not a leak."""
    live = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for part in cmdline.split(ROOT_PREFIX)[1:]:
            live.add(ROOT_PREFIX + part.split('"')[0].split("\x00")[0].split("/")[0])
    return live




# -- a) the default run: the acceptance test --------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, set[str]]:
    """`agentbench-npu run retool --out run`, exactly the embedded default; and the sandbox roots before it."""
    cwd = tmp_path_factory.mktemp("retool-run")
    before = sandbox_roots()
    # a minute or two on two idle cores; much longer on a loaded machine, hence the generous timeout
    proc = agentbench(cwd, "run", "retool", "--out", "run", "-q", timeout=2400)
    return cwd / "run", proc, before


def report_of(default_run) -> dict[str, Any]:
    run_dir, proc, _ = default_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "report.json").read_text())


def test_default_retool_run_exits_0_with_every_gate_passed(default_run):
    run_dir, proc, _ = default_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["scenario"] == "retool" and report["checklist_item"] == "ReTool"
    assert report["status"] == "passed", report["error"]
    assert report["environment"]["device"] == "cpu"
    assert report["config"]["model"]["name"] == "tiny"
    assert report["config"]["sandbox"]["backend"] == "local"
    assert [(g["name"], g["passed"]) for g in report["gates"]] == [(name, True) for name in GATES], report["gates"]
    assert [s["step"] for s in report["steps"]] == list(range(report["config"]["run"]["steps"]))


def test_the_policy_calls_the_tool_in_every_step(default_run):
    steps = report_of(default_run)["steps"]
    rates = [s["tool_call_rate"] for s in steps]
    assert all(rate > 0 for rate in rates), rates


def test_reward_improves_over_the_run(default_run):
    """The report holds the reward curve; its end must be above its start."""
    steps = report_of(default_run)["steps"]
    curve = [s["reward_mean"] for s in steps]
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last > first, f"mean reward of the first 3 steps {first:.3f}, of the last 3 {last:.3f}: {curve}"


def test_the_report_says_how_the_sandbox_isolated_code(default_run):
    sandbox = report_of(default_run)["environment"]["sandbox"]
    assert sandbox["backend"] == "local"
    assert sandbox["isolation"] == ("namespaces" if os.geteuid() == 0 else "rlimits"), sandbox
    assert sandbox["limits"]["wall_seconds"] == 5.0 and sandbox["limits"]["network"] is False
    if os.geteuid() == 0:
        low, high = sandbox["uid_range"]
        assert 0 < low <= high


def test_samples_show_interpreter_output_inside_responses(default_run):
    run_dir, proc, _ = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    with_output = [s for s in samples if "<interpreter>" in s["response"]]
    assert with_output, "no response holds a tool result"
    assert all("</interpreter>" in s["response"] for s in with_output)


def test_no_sandbox_process_outlives_the_run(default_run):
    sandbox = report_of(default_run)["environment"]["sandbox"]
    if not sandbox.get("uid_range"):
        pytest.skip(f"isolation {sandbox['isolation']!r}: the sandboxes had no uids of their own to look for")
    low, high = sandbox["uid_range"]
    # hold the range's locks while looking, so that no other run can be using these uids meanwhile
    held = lock_uids(range(low, high + 1))
    if held is None:
        pytest.skip(f"another run on this machine holds uids {low}-{high} now; cannot tell its processes from "
                    "leftovers")
    try:
        assert live_processes(set(range(low, high + 1))) == 0
    finally:
        for fd in held:
            os.close(fd)


def test_no_sandbox_directory_outlives_the_run(default_run):
    _, proc, before = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # another run on this machine may hold a root of its own: its worker names it; a leaked one has none
    leaked = sandbox_roots() - before - roots_of_live_workers()
    assert leaked == set(), f"sandbox root dirs left in {tempfile.gettempdir()}: {sorted(leaked)}"


# -- b) the docker backend ---------------------------------------------------------------------------
def test_retool_runs_with_the_docker_sandbox(cli, tmp_path):
    why = docker_backend.unavailable()
    if why:
        pytest.skip(why)
    # a container per episode costs ~1 s on the vfs driver: 2 steps of 4 x 2 episodes prove the path
    proc = cli("run", "retool", "--sandbox", "docker", "--steps", "2", "--gates", "none", "--out", "run", "-q",
               "--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=2", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "passed"
    assert report["environment"]["sandbox"]["backend"] == "docker"
    assert report["environment"]["sandbox"]["isolation"] == "container"
    assert [s["step"] for s in report["steps"]] == [0, 1]
    samples = (tmp_path / "run" / "samples.jsonl").read_text()
    assert "<interpreter>" in samples, "no tool result came back from the docker sandbox"


# -- c, d) bad input -----------------------------------------------------------------------------------
def test_unknown_sandbox_is_one_line_exit_2_naming_it_and_the_available_ones(cli, tmp_path):
    proc = cli("run", "retool", "--sandbox", "nosuch", "--out", "never", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "unknown sandbox 'nosuch'" in lines[0]
    assert all(name in lines[0] for name in ("local", "docker", "modal")), lines[0]
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def missing_dataset_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("retool-bad-dataset")
    proc = agentbench(cwd, "run", "retool", "--set", "task.dataset=/nonexistent.jsonl", "--out", "run", "-q",
                      timeout=1200)
    return cwd / "run", proc


def test_missing_dataset_is_one_line_exit_2_naming_task_dataset(missing_dataset_run):
    run_dir, proc = missing_dataset_run
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "task.dataset '/nonexistent.jsonl' does not exist" in lines[0]
    # whatever the runner wrote on the way says so too: an error report, and no samples
    if (run_dir / "report.json").exists():
        report = json.loads((run_dir / "report.json").read_text())
        assert report["status"] == "error" and "task.dataset" in report["error"]
        assert report["steps"] == []
    if (run_dir / "samples.jsonl").exists():
        assert (run_dir / "samples.jsonl").read_text() == ""


def test_missing_dataset_is_refused_before_the_run_dir_exists(missing_dataset_run):
    """Bad input fails in prepare(), 'before the run dir exists' (runner.py), as data.path does for `base`."""
    run_dir, proc = missing_dataset_run
    assert proc.returncode == 2
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
