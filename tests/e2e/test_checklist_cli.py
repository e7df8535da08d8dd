"""`agentbench-npu checklist` as a user runs it: the status of every RFC item, `--run` and JUnit XML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

pytestmark = pytest.mark.slow


def agentbench(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbench_npu", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=1800)


def test_with_no_runs_nothing_is_passed(tmp_path: Path):
    proc = agentbench(tmp_path, "checklist", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 23 and {r["status"] for r in rows} == {"not run", "not available"}
    covered = {r["id"] for r in rows if r["status"] == "not run"}
    assert covered == {"qwen3-4b-non-colocate", "qwen3-4b-colocate", "save-resume", "multi-node", "retool",
                       "tau-bench", "search-r1", "search-agent", "r3", "qwen3-30b-a3b"}


def test_run_runs_the_items_scenarios_and_reports_them_passed(tmp_path: Path):
    proc = agentbench(tmp_path, "checklist", "--run", "--only", "qwen3-4b-colocate,save-resume,multimodal", "--runs", "ci",
                      "--junit", "checklist.xml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "running base" in proc.stdout and "2 passed, 1 not available" in proc.stdout
    runs = list((tmp_path / "ci").glob("base-checklist-*/report.json"))
    assert len(runs) == 1  # one run of base serves both items
    suite = ElementTree.parse(tmp_path / "checklist.xml").getroot()
    assert (suite.attrib["tests"], suite.attrib["failures"], suite.attrib["skipped"]) == ("3", "0", "1")
    listed = json.loads(agentbench(tmp_path, "checklist", "--runs", "ci", "--json").stdout)
    status = {r["id"]: r["status"] for r in listed}
    assert status["qwen3-4b-colocate"] == status["save-resume"] == "passed" and status["retool"] == "not run"


def test_a_failed_gate_makes_its_item_failed_and_the_row_names_the_gate(tmp_path: Path):
    # a recipe that makes base's own gate fail: the weight_sync probe threshold at zero
    (tmp_path / "ci").mkdir()
    proc = agentbench(tmp_path, "run", "base", "--steps", "10", "--set", "gates.sync_probe_max=0", "--out",
                      "ci/base-strict", "-q")
    assert proc.returncode == 1, proc.stderr
    listed = json.loads(agentbench(tmp_path, "checklist", "--runs", "ci", "--only", "qwen3-4b-colocate",
                                   "--json").stdout)
    assert listed[0]["status"] == "failed"
    assert listed[0]["detail"] == "base: newest run ci/base-strict is failed (gates failed: weight_sync)"


def test_a_run_that_stops_before_writing_a_report_is_an_error_not_an_older_pass(tmp_path: Path):
    proc = agentbench(tmp_path, "checklist", "--run", "--only", "qwen3-4b-colocate", "--runs", "ci", "--profile",
                      "tnyi", "--json")
    assert proc.returncode == 1
    (row,) = json.loads(proc.stdout)
    assert row["status"] == "error"
    assert row["detail"].startswith("base: agentbench-npu run exited 2 before writing a report: ")
    assert "unknown profile 'tnyi'" in row["detail"]
