"""The baseline archive (compare/baselines.py) and the `baseline` gate (`run --compare-to`). Every report here is a
hand-made dict in tmp_path, and the archive's clock is frozen, so each test says which rule of the archive or the
gate broke, not which run misbehaved."""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agentbench_npu.compare import baselines
from agentbench_npu.compare.baselines import archive_dir, comparable_digest, entries, find, fingerprint, matching, save
from agentbench_npu.config import Layer, RunConfig, resolve
from agentbench_npu.errors import UserError
from agentbench_npu.gates import plugin as builtin_gates
from agentbench_npu.gates.base import GateContext, select_gates
from agentbench_npu.gates.baseline import BaselineGate

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
METRICS = ("reward_mean", "loss", "entropy", "response_length_mean", "truncated_fraction", "logprob_abs_diff_mean",
           "kl", "sync_probe_abs_diff_max")  # every metric scenarios/diff.toml compares


def config(**sections: dict[str, Any]) -> RunConfig:
    return resolve("base", [Layer(sections, "test")], {"ops": "+-", "max_operand": 9})


def config_dict(**sections: dict[str, Any]) -> dict[str, Any]:
    return config(**sections).to_dict()


def changed(cfg: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    section, key = path.split(".")
    out[section][key] = value
    return out


def steps(**changes: list[float]) -> list[dict[str, Any]]:
    """Three rows with every compared metric; `reward_mean=[...]` replaces that metric's series."""
    base = {"reward_mean": [0.25, 0.5, 0.5], "loss": [0.5, 0.25, 0.125], "entropy": [1.0, 1.0, 1.0],
            "response_length_mean": [8.0, 8.0, 8.0], "truncated_fraction": [0.0, 0.0, 0.0],
            "logprob_abs_diff_mean": [2.0 ** -20] * 3, "kl": [2.0 ** -20] * 3, "sync_probe_abs_diff_max": [0.0] * 3}
    series = {**base, **changes}
    return [{"step": s, **{m: series[m][s] for m in METRICS}} for s in range(3)]


def report(cfg: dict[str, Any] | None = None, scenario: str = "base", status: str = "passed",
           rows: list[dict[str, Any]] | None = None, device: str = "cpu") -> dict[str, Any]:
    cfg = cfg if cfg is not None else config_dict()
    return {"schema_version": 1, "scenario": scenario, "status": status, "config": {**cfg, "scenario": scenario},
            "config_digest": "c0ffee", "steps": rows if rows is not None else steps(), "gates": [],
            "environment": {"device": device, "device_name": f"{device}-board", "agentbench_npu": "0.1.0"}}


def run_dir(where: Path, data: dict[str, Any]) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "report.json").write_text(json.dumps(data), encoding="utf-8")
    return where


@pytest.fixture
def clock(monkeypatch):
    """Freeze the archive's clock; `clock(seconds)` sets it to T0 + seconds."""
    now = {"t": T0}

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001
            return now["t"] if tz is not None else now["t"].replace(tzinfo=None)

    monkeypatch.setattr(baselines, "datetime", Frozen)

    def set_to(seconds: float) -> None:
        now["t"] = T0 + timedelta(seconds=seconds)

    return set_to


def saved(tmp_path: Path, name: str, data: dict[str, Any], archive: Path) -> Path:
    return save(run_dir(tmp_path / "runs" / name, data), name, archive)


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    return text


# -- comparable_digest ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path, value", [
    ("run.device", "npu"), ("run.out", "/elsewhere/run"), ("run.threads", 4), ("run.faults", ["stale-weights"]),
    ("run.deterministic", False), ("run.compare_to", "baseline"), ("run.baselines", "/shared/baselines"),
    ("run.compare_tolerances", "tol.toml"), ("model.engine_dtype", "bfloat16"), ("cluster.executor", "ray"),
    ("cluster.train_devices", 2), ("gates.enabled", "none"), ("gates.logprob_mean", 0.5),
    ("sandbox.backend", "docker"), ("checkpoint.every", 3), ("checkpoint.save", False),
])
def test_comparable_digest_ignores_where_and_how_a_run_ran(path, value):
    cfg = config_dict()
    assert comparable_digest(changed(cfg, path, value)) == comparable_digest(cfg)


@pytest.mark.parametrize("path, value", [
    ("run.seed", 5), ("run.steps", 3), ("train.lr", 1e-3), ("task.ops", "+"), ("task.max_operand", 99),
    ("run.mode", "eval"), ("model.name", "Qwen/Qwen3-4B"), ("rollout.samples_per_prompt", 4),
])
def test_comparable_digest_changes_with_what_the_run_computed(path, value):
    cfg = config_dict()
    assert comparable_digest(changed(cfg, path, value)) != comparable_digest(cfg)


def test_comparable_digest_ignores_whole_place_sections_and_leaves_its_input_alone():
    cfg = config_dict()
    before = copy.deepcopy(cfg)
    stripped = {k: v for k, v in cfg.items() if k not in ("cluster", "gates", "sandbox", "checkpoint")}
    digest = comparable_digest(cfg)
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    assert comparable_digest(stripped) == digest
    assert cfg == before


def test_fingerprint_names_scenario_device_model_and_digests():
    data = report(config_dict(model={"name": "Qwen/Qwen3-4B"}), device="npu")
    assert fingerprint(data) == {
        "scenario": "base", "device": "npu", "device_name": "npu-board", "model": "Qwen/Qwen3-4B",
        "comparable_digest": comparable_digest(data["config"]), "config_digest": "c0ffee", "agentbench_npu": "0.1.0"}


# -- save ----------------------------------------------------------------------------------------------
def test_save_copies_the_report_and_writes_its_fingerprint(tmp_path, clock):
    run = run_dir(tmp_path / "ref", report())
    target = save(run, "cpu-ref", tmp_path / "arch")
    assert target == tmp_path / "arch" / "base" / "cpu-ref"
    assert sorted(p.name for p in target.iterdir()) == ["baseline.json", "report.json"]
    assert (target / "report.json").read_bytes() == (run / "report.json").read_bytes()
    meta = json.loads((target / "baseline.json").read_text())
    assert datetime.fromisoformat(meta.pop("saved_at")) == T0
    assert meta == {**fingerprint(report()), "name": "cpu-ref", "source": str((run / "report.json").resolve())}


def test_save_takes_a_report_json_as_well_as_a_run_dir(tmp_path, clock):
    run = run_dir(tmp_path / "ref", report())
    target = save(run / "report.json", "by-file", tmp_path / "arch")
    assert json.loads((target / "baseline.json").read_text())["scenario"] == "base"


def test_save_names_a_baseline_device_model_digest_time_by_default(tmp_path, clock):
    data = report(config_dict(model={"name": "Qwen/Qwen3-4B"}), device="npu")
    target = save(run_dir(tmp_path / "ref", data), archive=tmp_path / "arch")
    name = f"npu-Qwen3-4B-{comparable_digest(data['config'])}-20260102T030405"
    assert target == tmp_path / "arch" / "base" / name
    assert json.loads((target / "baseline.json").read_text())["name"] == name


@pytest.mark.parametrize("status", ["failed", "error", "running"])
def test_save_refuses_a_run_that_did_not_pass(tmp_path, status):
    run = run_dir(tmp_path / "ref", report(status=status))
    with pytest.raises(UserError) as exc:
        save(run, "ref", tmp_path / "arch")
    assert f"status is {status}" in one_line_error(exc) and "passed" in str(exc.value)
    assert not (tmp_path / "arch" / "base" / "ref").exists()


def test_save_refuses_a_name_already_in_the_archive_and_keeps_the_first(tmp_path, clock):
    first = save(run_dir(tmp_path / "a", report()), "ref", tmp_path / "arch")
    kept = (first / "baseline.json").read_text()
    other = run_dir(tmp_path / "b", report(config_dict(run={"seed": 7})))
    with pytest.raises(UserError) as exc:
        save(other, "ref", tmp_path / "arch")
    assert "exists" in one_line_error(exc) and "--name" in str(exc.value)
    assert (first / "baseline.json").read_text() == kept


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "-dash", "with space", "semi;colon"])
def test_save_refuses_a_name_that_is_not_a_plain_file_name(tmp_path, name):
    with pytest.raises(UserError) as exc:
        save(run_dir(tmp_path / "ref", report()), name, tmp_path / "arch")
    assert f"baseline name '{name}'" in one_line_error(exc)
    assert not any(p.name == "baseline.json" for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("second", ["search", "base"])
def test_save_refuses_a_directory_holding_two_runs(tmp_path, second):
    runs = tmp_path / "runs"
    run_dir(runs / "one", report())
    run_dir(runs / "two", report(scenario=second))
    with pytest.raises(UserError) as exc:
        save(runs, "both", tmp_path / "arch")
    assert str(runs) in one_line_error(exc)
    assert not (tmp_path / "arch").exists()


# -- entries, matching, find -----------------------------------------------------------------------------
def test_entries_lists_baselines_oldest_first_with_their_paths(tmp_path, clock):
    arch = tmp_path / "arch"
    for seconds, (name, scenario) in enumerate([("b-oldest", "base"), ("z-other", "search"), ("a-newest", "base")]):
        clock(seconds)
        saved(tmp_path, name, report(scenario=scenario), arch)
    found = entries(arch)
    assert [e["name"] for e in found] == ["b-oldest", "z-other", "a-newest"]
    assert [Path(e["path"]) for e in found] == [arch / "base" / "b-oldest", arch / "search" / "z-other",
                                                arch / "base" / "a-newest"]
    assert [e["name"] for e in entries(arch, "base")] == ["b-oldest", "a-newest"]
    assert entries(arch, "tau_bench") == []


def test_entries_of_an_archive_that_does_not_exist_is_empty(tmp_path):
    assert entries(tmp_path / "nowhere") == []


def test_entries_refuses_a_baseline_record_that_is_not_json(tmp_path):
    bad = tmp_path / "arch" / "base" / "broken"
    bad.mkdir(parents=True)
    (bad / "baseline.json").write_text("{not json")
    with pytest.raises(UserError) as exc:
        entries(tmp_path / "arch")
    assert str(bad / "baseline.json") in one_line_error(exc)


def test_entries_skips_the_temp_dir_of_a_save_that_did_not_finish(tmp_path, clock):
    arch = tmp_path / "arch"
    done = saved(tmp_path, "done", report(), arch)
    leftover = arch / "base" / ".half.tmp-x1y2"
    leftover.mkdir()
    (leftover / "report.json").write_text((done / "report.json").read_text())
    meta = json.loads((done / "baseline.json").read_text())
    (leftover / "baseline.json").write_text(json.dumps({**meta, "name": "half", "saved_at": "2027-01-01T00:00:00"}))
    assert [e["name"] for e in entries(arch)] == ["done"]
    assert matching(report(), arch)["name"] == "done"


def test_matching_picks_the_newest_baseline_of_the_scenario_with_the_same_digest(tmp_path, clock):
    arch = tmp_path / "arch"
    cfg = config_dict()
    for seconds, (name, data) in enumerate([
        ("z-old", report(cfg)), ("y-new", report(cfg)),
        ("x-other-seed", report(changed(cfg, "run.seed", 9))),  # newer, but another experiment
        ("w-other-scenario", {**report(cfg), "scenario": "search"}),  # newer, same digest, another scenario
    ]):
        clock(seconds)
        saved(tmp_path, name, data, arch)
    # an NPU candidate of the same experiment, run with the baseline gate
    candidate = report(changed(changed(changed(cfg, "run.device", "npu"), "model.engine_dtype", "bfloat16"),
                               "run.compare_to", "baseline"), device="npu")
    found = matching(candidate, arch)
    assert found is not None and found["name"] == "y-new"
    assert Path(found["path"]) == arch / "base" / "y-new"
    assert matching(report(changed(cfg, "run.seed", 9)), arch)["name"] == "x-other-seed"
    assert matching(report(changed(cfg, "run.seed", 10)), arch) is None
    assert matching(report(cfg, scenario="tau_bench"), arch) is None


def test_matching_tells_apart_two_baselines_saved_within_one_second(tmp_path, clock):
    arch = tmp_path / "arch"
    clock(0.1)
    saved(tmp_path, "zeta", report(), arch)
    clock(0.6)
    saved(tmp_path, "alpha", report(), arch)
    assert matching(report(), arch)["name"] == "alpha"


def test_find_by_name_and_by_path(tmp_path, clock):
    arch = tmp_path / "arch"
    target = saved(tmp_path, "cpu-ref", report(), arch)
    by_name = find("cpu-ref", arch)
    assert by_name["name"] == "cpu-ref" and Path(by_name["path"]) == target
    by_path = find(str(target))  # a path needs no archive
    assert by_path["name"] == "cpu-ref" and by_path["comparable_digest"] == comparable_digest(report()["config"])


def test_find_refuses_an_unknown_name_saying_how_to_list_them(tmp_path, clock):
    saved(tmp_path, "cpu-ref", report(), tmp_path / "arch")
    with pytest.raises(UserError) as exc:
        find("gpu-ref", tmp_path / "arch")
    assert "gpu-ref" in one_line_error(exc) and "baseline list" in str(exc.value)


def test_find_refuses_a_name_two_scenarios_use_and_gives_both_paths(tmp_path, clock):
    arch = tmp_path / "arch"
    a = saved(tmp_path / "a", "ref", report(), arch)
    b = saved(tmp_path / "b", "ref", report(scenario="search"), arch)
    with pytest.raises(UserError) as exc:
        find("ref", arch)
    text = one_line_error(exc)
    assert "2 scenarios" in text and str(a) in text and str(b) in text


# -- archive_dir -----------------------------------------------------------------------------------------
def test_archive_dir_is_the_argument_then_the_environment_then_dot_baselines(tmp_path, monkeypatch):
    monkeypatch.delenv("AGENTBENCH_NPU_BASELINES", raising=False)
    assert archive_dir() == Path("baselines")
    assert archive_dir("") == Path("baselines")
    monkeypatch.setenv("AGENTBENCH_NPU_BASELINES", str(tmp_path / "shared"))
    assert archive_dir() == tmp_path / "shared"
    assert archive_dir(tmp_path / "given") == tmp_path / "given"


def test_save_and_entries_use_the_same_default_archive(tmp_path, monkeypatch, clock):
    monkeypatch.delenv("AGENTBENCH_NPU_BASELINES", raising=False)
    monkeypatch.chdir(tmp_path)
    save(run_dir(tmp_path / "ref", report()), "here")
    assert (tmp_path / "baselines" / "base" / "here" / "baseline.json").is_file()
    monkeypatch.setenv("AGENTBENCH_NPU_BASELINES", str(tmp_path / "shared"))
    save(run_dir(tmp_path / "ref2", report()), "there")
    assert (tmp_path / "shared" / "base" / "there" / "baseline.json").is_file()
    assert [e["name"] for e in entries()] == ["there"]
    assert find("here", "baselines")["name"] == "here"


# -- the baseline gate -----------------------------------------------------------------------------------
def refuse_to_rerun(extra: list[str], out: Path) -> dict[str, Any]:
    raise AssertionError(f"the baseline gate must not ask for another run (asked for {extra})")


def gate_context(cfg: RunConfig, run: Path, rows: list[dict[str, Any]] | None = None) -> GateContext:
    """The gate's view of a finished candidate run of `cfg`, whose run dir is `run`."""
    run.mkdir(parents=True, exist_ok=True)
    data = report(cfg.to_dict(), status="running", rows=rows)
    return GateContext(config=cfg, report=data, thresholds={}, run_dir=run, rerun=refuse_to_rerun)


def builtin() -> dict[str, Any]:
    registered: dict[str, Any] = {}
    builtin_gates.register_gates(register=lambda gate: registered.setdefault(gate.name, gate))
    return registered


def test_baseline_gate_applies_only_when_compare_to_is_set():
    gate = BaselineGate()
    assert not gate.applies(config())
    assert gate.applies(config(run={"compare_to": "baseline"}))
    assert gate.applies(config(run={"compare_to": "some/run"}))
    assert "baseline" not in [g.name for g in select_gates(builtin(), config())]
    assert "baseline" in [g.name for g in select_gates(builtin(), config(run={"compare_to": "baseline"}))]
    with pytest.raises(UserError, match="does not apply"):
        select_gates(builtin(), config(gates={"enabled": "baseline"}))


def test_baseline_gate_passes_within_tolerance_of_a_run_dir_and_writes_comparison_json(tmp_path):
    ref = run_dir(tmp_path / "ref", report())
    cfg = config(run={"compare_to": str(ref)})
    nudged = steps(reward_mean=[0.25, 0.5, 0.5 + 0.0625])  # last-3 mean moves 0.02, within abs 0.1
    result = BaselineGate().evaluate(gate_context(cfg, tmp_path / "run", nudged))
    assert result.passed, result.detail
    assert result.name == "baseline"
    assert result.value == {"baseline": str(ref / "report.json"), "metrics_out": [],
                            "metrics_compared": len(METRICS)}
    assert result.detail == f"{len(METRICS)} metrics within tolerance of {ref / 'report.json'}"
    comparison = json.loads((tmp_path / "run" / "comparison.json").read_text())
    assert comparison["within_tolerance"] is True
    assert {m["metric"] for m in comparison["scenarios"][0]["metrics"]} == set(METRICS)


def test_baseline_gate_fails_naming_the_metric_out_of_tolerance(tmp_path):
    ref = run_dir(tmp_path / "ref", report())
    cfg = config(run={"compare_to": str(ref)})
    result = BaselineGate().evaluate(gate_context(cfg, tmp_path / "run", steps(reward_mean=[0.25, 1.0, 1.0])))
    assert not result.passed
    assert result.value["metrics_out"] == ["reward_mean"]
    assert result.detail.startswith("reward_mean: last-3 mean"), result.detail
    assert "comparison.json" in result.detail
    comparison = json.loads((tmp_path / "run" / "comparison.json").read_text())
    assert comparison["within_tolerance"] is False
    assert [m["metric"] for m in comparison["scenarios"][0]["metrics"] if m["status"] == "out"] == ["reward_mean"]


def test_baseline_gate_uses_the_run_s_tolerance_file(tmp_path):
    ref = run_dir(tmp_path / "ref", report())
    tol = tmp_path / "tight.toml"
    tol.write_text("[metrics.reward_mean]\nabs = 0.0\n")
    cfg = config(run={"compare_to": str(ref), "compare_tolerances": str(tol)})
    nudged = steps(reward_mean=[0.25, 0.5, 0.5 + 0.0625])  # within the default 0.1, not within 0
    result = BaselineGate().evaluate(gate_context(cfg, tmp_path / "run", nudged))
    assert not result.passed and result.value["metrics_out"] == ["reward_mean"], result.detail


def test_baseline_gate_compares_with_the_matching_archived_baseline(tmp_path, clock):
    arch = tmp_path / "arch"
    saved(tmp_path, "cpu-ref", report(config_dict(gates={"enabled": "none"})), arch)
    clock(1)
    saved(tmp_path, "other-seed", report(config_dict(run={"seed": 3})), arch)
    cfg = config(run={"compare_to": "baseline", "baselines": str(arch), "device": "npu"},
                 model={"engine_dtype": "bfloat16"}, gates={"enabled": "baseline"})
    result = BaselineGate().evaluate(gate_context(cfg, tmp_path / "run"))
    assert result.passed, result.detail
    assert result.value["baseline"] == str(arch / "base" / "cpu-ref" / "report.json")
    assert (tmp_path / "run" / "comparison.json").is_file()


def test_baseline_gate_fails_saying_how_to_save_one_when_none_matches(tmp_path, clock):
    arch = tmp_path / "arch"
    saved(tmp_path, "cpu-ref", report(), arch)
    cfg = config(run={"compare_to": "baseline", "baselines": str(arch), "seed": 5})
    result = BaselineGate().evaluate(gate_context(cfg, tmp_path / "run"))
    assert not result.passed
    assert comparable_digest(cfg.to_dict()) in result.detail and str(arch) in result.detail
    assert "agentbench-npu baseline save" in result.detail
    assert not (tmp_path / "run" / "comparison.json").exists()


def test_baseline_gate_fails_when_the_compare_to_run_is_of_another_scenario(tmp_path):
    other = run_dir(tmp_path / "other", report(scenario="search"))
    result = BaselineGate().evaluate(gate_context(config(run={"compare_to": str(other)}), tmp_path / "run"))
    assert not result.passed and "holds no run of scenario 'base'" in result.detail


def test_baseline_gate_check_refuses_a_compare_to_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(UserError) as exc:
        BaselineGate().check(config(run={"compare_to": str(missing)}))
    assert f"'{missing}' does not exist" in one_line_error(exc) and "baseline" in str(exc.value)


def test_baseline_gate_check_accepts_baseline_and_an_existing_run(tmp_path):
    ref = run_dir(tmp_path / "ref", report())
    BaselineGate().check(config(run={"compare_to": "baseline", "baselines": str(tmp_path / "empty")}))
    BaselineGate().check(config(run={"compare_to": str(ref)}))
    BaselineGate().check(config(run={"compare_to": str(ref / "report.json")}))


@pytest.mark.parametrize("text", ["[metrics.reward_mean]\nabs = -1\n", "[metrics.reward_mean]\nslack = 1\n",
                                  "last_k = 0\n", "not toml ==\n", None])
def test_baseline_gate_check_refuses_a_bad_tolerance_file(tmp_path, text):
    tol = tmp_path / "tol.toml"
    if text is not None:
        tol.write_text(text)
    ref = run_dir(tmp_path / "ref", report())
    with pytest.raises(UserError) as exc:
        BaselineGate().check(config(run={"compare_to": str(ref), "compare_tolerances": str(tol)}))
    assert str(tol) in one_line_error(exc)


def test_baseline_gate_check_refuses_a_compare_to_dir_holding_no_report(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no report.json"):
        BaselineGate().check(config(run={"compare_to": str(tmp_path / "empty")}))


def test_baseline_gate_fails_when_nothing_could_be_compared(tmp_path):
    ref = run_dir(tmp_path / "ref", report())
    result = BaselineGate().evaluate(gate_context(config(run={"compare_to": str(ref)}), tmp_path / "run", []))
    assert not result.passed
    assert result.detail.startswith(f"nothing compared with {ref / 'report.json'}: no step to compare")
