"""The checklist: every RFC item mapped, and an item's status decided honestly from the newest runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from agentbench_npu.checklist import (
    GLOBAL_GATES,
    Item,
    junit_xml,
    latest_runs,
    load_items,
    select,
    status_of,
)
from agentbench_npu.errors import UserError
from agentbench_npu.gates import plugin as builtin_gates
from agentbench_npu.plugins import load_plugins

RFC = Path(__file__).resolve().parents[3] / "shared" / "ascend-rfc-279.md"


def gate_plugins() -> dict[str, Any]:
    registered: dict[str, Any] = {}
    builtin_gates.register_gates(register=lambda gate: registered.setdefault(gate.name, gate))
    return registered


def report(scenario: str = "base", status: str = "passed", steps: int = 10, started: str = "2026-11-28T10:00:00",
           gates: dict[str, bool] | None = None, **run: Any) -> dict[str, Any]:
    gates = {name: True for name in GLOBAL_GATES} if gates is None else gates
    return {"schema_version": 1, "scenario": scenario, "status": status, "started_at": started, "error": None,
            "config": {"run": {"steps": steps, **run}, "checkpoint": {"save": True}},
            "steps": [{"step": i} for i in range(steps)],
            "gates": [{"name": n, "passed": p} for n, p in gates.items()]}


def write(runs: Path, name: str, data: dict[str, Any]) -> None:
    (runs / name).mkdir(parents=True)
    (runs / name / "report.json").write_text(json.dumps(data))


ITEM = Item("colocate", "Core", "Qwen3-4B colocate", "≥10 steps", ("base",), min_steps=10)


def judge(item: Item, runs: Path, installed=("base", "retool")):
    return status_of(item, set(installed), latest_runs(runs), gate_plugins())


def test_every_item_of_the_rfc_checklist_is_listed_once():
    items = load_items()
    assert len({i.id for i in items}) == len(items) == 23
    if RFC.is_file():  # the RFC's own list: every "[ ] Item" line is an item here
        rows = [line[4:] for line in RFC.read_text().splitlines() if line.startswith("[ ] ")]
        assert len(rows) == len(items)
        for row, item in zip(rows, items):
            assert row.startswith(item.item.split(" (")[0].split(" —")[0]), (row, item.item)


def test_every_scenario_the_checklist_names_is_registered_by_this_installation():
    named = {s for i in load_items() for s in i.scenarios}
    assert named <= set(load_plugins().items("scenario")), named
    assert all(i.needs for i in load_items() if not i.scenarios)  # an uncovered item says what it waits for


def test_a_passed_run_with_every_applicable_gate_passes_its_item(tmp_path):
    write(tmp_path, "a", report())
    result = judge(ITEM, tmp_path)
    assert result.status == "passed", result.detail
    assert result.runs[0]["run"] == str(tmp_path / "a")


def test_the_newest_run_decides(tmp_path):
    write(tmp_path, "old", report(status="failed", started="2026-11-28T09:00:00"))
    write(tmp_path, "new", report(started="2026-11-28T11:00:00"))
    assert judge(ITEM, tmp_path).status == "passed"
    write(tmp_path, "newer", report(status="failed", started="2026-11-28T12:00:00"))
    result = judge(ITEM, tmp_path)
    assert result.status == "failed" and "newer" in result.detail


def test_a_run_without_its_gates_or_with_too_few_steps_is_unverified_never_passed(tmp_path):
    write(tmp_path, "a", report(gates={}))
    result = judge(ITEM, tmp_path)
    assert result.status == "unverified" and "did not evaluate logprob_alignment" in result.detail
    write(tmp_path, "b", report(steps=3, started="2026-11-28T11:00:00"))
    result = judge(ITEM, tmp_path)
    assert result.status == "unverified" and "ran 3 step(s); the item asks for at least 10" in result.detail


def test_a_gate_that_does_not_apply_to_the_run_is_not_asked_for(tmp_path):
    # an eval run has no checkpoint to continue: its item passes on the gates that apply
    gates = {name: True for name in GLOBAL_GATES if name != "checkpoint_continuity"}
    write(tmp_path, "a", report(gates=gates, mode="eval"))
    assert judge(ITEM, tmp_path).status == "passed"


def test_an_item_s_own_gate_must_be_there_and_pass(tmp_path):
    item = Item("save", "Core", "Save / resume", "", ("base",), gates=("checkpoint_continuity",))
    write(tmp_path, "a", report(gates={**{g: True for g in GLOBAL_GATES}, "checkpoint_continuity": False},
                                status="failed"))
    result = judge(item, tmp_path)
    assert result.status == "failed"
    assert "checkpoint_continuity failed" in result.detail or "is failed" in result.detail


@pytest.mark.parametrize("item, installed, status, says", [
    (Item("x", "S", "X", "", ()), ("base",), "not available", "nothing covers it yet"),
    (Item("x", "S", "X", "", (), needs="a VLM path"), ("base",), "not available", "waits for a VLM path"),
    (Item("x", "S", "X", "", ("geo3k",)), ("base",), "not installed", "scenario 'geo3k' is not installed"),
    (Item("x", "S", "X", "", ("retool",)), ("base", "retool"), "not run", "no run of retool yet"),
])
def test_items_nothing_has_run_for_are_never_passed(tmp_path, item, installed, status, says):
    write(tmp_path, "a", report())
    result = judge(item, tmp_path, installed)
    assert result.status == status and says in result.detail


def test_unreadable_reports_are_skipped(tmp_path):
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "report.json").write_text("{not json")
    write(tmp_path, "a", report())
    assert set(latest_runs(tmp_path)) == {"base"}


def test_only_selects_items_by_id_and_names_an_unknown_one():
    items = load_items()
    assert [i.id for i in select(items, "retool, tau-bench")] == ["retool", "tau-bench"]
    with pytest.raises(UserError, match="--only: unknown checklist item 'nope'; items: image, "):
        select(items, "retool,nope")


def test_junit_passes_passed_items_fails_failed_ones_and_skips_the_rest(tmp_path):
    write(tmp_path, "a", report())
    write(tmp_path, "b", report(scenario="retool", status="failed"))
    items = [ITEM, Item("r", "Agentic", "ReTool", "", ("retool",)), Item("n", "Core", "R3", "", (), needs="MoE")]
    statuses = [status_of(i, {"base", "retool"}, latest_runs(tmp_path), gate_plugins()) for i in items]
    suite = ElementTree.fromstring(re.sub(r"^<\?xml[^>]*\?>", "", junit_xml(statuses)))
    assert suite.attrib == {"name": "agentbench-npu checklist", "tests": "3", "failures": "1", "skipped": "1"}
    cases = {c.attrib["name"]: [child.tag for child in c] for c in suite}
    assert cases == {"colocate: Qwen3-4B colocate": [], "r: ReTool": ["failure"], "n: R3": ["skipped"]}


def resolved_report(*layers: dict[str, Any], gates: tuple[str, ...]) -> dict[str, Any]:
    """A report whose config is what a real run records: the resolved config, unset thresholds as null."""
    from agentbench_npu.config import resolve
    from agentbench_npu.recipes import Layer

    recipe = load_plugins().get("scenario", "base").obj.recipe()
    config = resolve("base", [recipe, *(Layer(v, "test") for v in layers)], recipe.values["task"]).to_dict()
    data = report(gates={g: True for g in gates})
    data["config"] = config
    data["steps"] = [{"step": i} for i in range(config["run"]["steps"])]
    return data


def test_a_real_eval_run_s_config_is_read_and_only_its_applicable_gates_are_asked_for(tmp_path):
    write(tmp_path, "a", resolved_report({"run": {"mode": "eval"}},
                                         gates=("logprob_alignment", "weight_sync", "reproducibility")))
    assert judge(ITEM, tmp_path).status == "passed"


def test_an_item_s_own_gate_is_asked_for_even_where_it_would_not_apply(tmp_path):
    save_resume = Item("save", "Core", "Save / resume", "", ("base",), gates=("checkpoint_continuity",))
    write(tmp_path, "a", resolved_report({"checkpoint": {"save": False}},
                                         gates=("logprob_alignment", "weight_sync", "reproducibility")))
    result = judge(save_resume, tmp_path)
    assert result.status == "unverified" and "did not evaluate checkpoint_continuity" in result.detail
