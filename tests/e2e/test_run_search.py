"""`agentbench-npu run search-r1` and `run search-agent` end to end, in fresh processes, as a user runs them.

The default runs (CPU, the tiny model, the shipped knowledge base behind a BM25 server the runner starts,
every gate) are the acceptance tests of the checklist items "Search-R1" and "Search Agent": the policy
searches a real server, reads what it returns and earns reward only by answering from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentbench_npu_search_r1.kb import shipped_paths

from tests.support.servers import cli_server

pytestmark = pytest.mark.slow

GATES = ["logprob_alignment", "weight_sync", "reproducibility", "checkpoint_continuity"]


def agentbench(cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbench_npu", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def passed_report(run_dir: Path, proc: subprocess.CompletedProcess) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "passed", report["error"]
    return report


@pytest.fixture(scope="module", params=["search-r1", "search-agent"])
def default_run(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, subprocess.CompletedProcess]:
    """`agentbench-npu run SCENARIO --out run`, exactly the embedded default."""
    cwd = tmp_path_factory.mktemp(request.param)
    # a few minutes on two idle cores; much longer on a loaded machine, hence the generous timeout
    proc = agentbench(cwd, "run", request.param, "--out", "run", "-q", timeout=2400)
    return request.param, cwd / "run", proc


def test_default_run_exits_0_with_every_gate_passed(default_run):
    scenario, run_dir, proc = default_run
    report = passed_report(run_dir, proc)
    assert report["scenario"] == scenario
    assert report["checklist_item"] == {"search-r1": "Search-R1", "search-agent": "Search Agent"}[scenario]
    assert [g["name"] for g in report["gates"]] == GATES
    assert all(g["passed"] for g in report["gates"]), report["gates"]


def test_the_runner_started_a_retrieval_server_over_the_shipped_corpus(default_run):
    _, run_dir, proc = default_run
    search = passed_report(run_dir, proc)["environment"]["services"]["search"]
    assert search["external"] is False and search["retriever"] == "bm25"
    assert search["corpus"] == str(shipped_paths()[0]) and search["documents"] == 480
    with pytest.raises(httpx.TransportError):  # and stopped it with the run
        httpx.get(f"{search['url']}/health", timeout=2.0)


def test_reward_is_above_zero_and_the_curve_is_in_the_report(default_run):
    _, run_dir, proc = default_run
    steps = passed_report(run_dir, proc)["steps"]
    curve = [s["reward_mean"] for s in steps]
    assert len(curve) == 10 and sum(curve) / len(curve) > 0, curve
    # reward is exact match only: every rewarded episode answered correctly
    assert all(s["accuracy"] == pytest.approx(s["reward_mean"]) for s in steps)


def test_the_policy_searches_in_every_step_and_reads_the_results(default_run):
    scenario, run_dir, proc = default_run
    steps = passed_report(run_dir, proc)["steps"]
    rate = "search_rate" if scenario == "search-r1" else "tool_call_rate"
    assert all(s[rate] > 0 for s in steps), [s[rate] for s in steps]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    shown = "<information>" if scenario == "search-r1" else "<tool_response>"
    retrieved = [r for r in rows if shown in r["response"]]
    # a malformed tool call is answered with an error instead of documents
    with_documents = [r for r in retrieved if 'Doc 1(Title: "' in r["response"]]
    assert len(with_documents) >= len(retrieved) / 2 > 0, (len(with_documents), len(retrieved))
    rewarded = [r for r in rows if r["reward"] > 0]
    assert rewarded, "no episode answered correctly"


def test_the_report_carries_the_scenarios_action_rates(default_run):
    """Search-R1: invalid turns, and episodes with no valid tag at all; the search agent: malformed tool calls."""
    scenario, run_dir, proc = default_run
    rates = {"search-r1": ("invalid_action_rate", "no_valid_tag_rate"), "search-agent": ("tool_error_rate",)}
    for step in passed_report(run_dir, proc)["steps"]:
        assert all(0.0 <= step[name] <= 1.0 for name in rates[scenario]), step


# -- an external server, the dense retriever ------------------------------------------------------------
def test_search_r1_uses_an_external_server_given_by_url(cli, tmp_path):
    with cli_server("search-server", "--corpus", str(shipped_paths()[0])) as (url, server):
        proc = cli("run", "search-r1", "--steps", "1", "--gates", "none", "--out", "run", "-q",
                   "--set", f"task.search_url={url}", "--set", "warm_start.steps=0",
                   "--set", "rollout.prompts_per_step=2", timeout=1200)
        report = passed_report(tmp_path / "run", proc)
        assert report["environment"]["services"]["search"]["external"] is True
        assert report["environment"]["services"]["search"]["url"] == url
        assert server.poll() is None, "the runner must not stop a server it did not start"


def test_search_agent_runs_over_the_dense_retriever(cli, tmp_path):
    proc = cli("run", "search-agent", "--steps", "1", "--gates", "none", "--out", "run", "-q",
               "--set", "task.retriever=dense", "--set", "warm_start.steps=0",
               "--set", "rollout.prompts_per_step=2", timeout=1200)
    report = passed_report(tmp_path / "run", proc)
    assert report["environment"]["services"]["search"]["retriever"] == "dense"


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, named", [
    ("task.corpus=/nonexistent/corpus.jsonl", "task.corpus"),
    ("task.qa=/nonexistent/qa.jsonl", "task.qa"),
    ("task.search_url=http://127.0.0.1:9", "task.search_url"),
    ("task.retriever=sparse", "task.retriever"),
])
def test_bad_search_input_is_one_line_exit_2_before_the_run_dir_exists(cli, tmp_path, setting, named):
    proc = cli("run", "search-r1", "--set", setting, "--out", "never", "-q", timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert not (tmp_path / "never").exists()
