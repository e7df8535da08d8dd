"""`agentbench-npu diff` compares two runs metric by metric. Each test writes hand-made report.json files (or
builds step rows), with values that are exact in binary floating point, so each sits plainly on one side of a
tolerance, or exactly on it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from agentbench_npu.compare.commands import _recipe_diff
from agentbench_npu.compare.diff import (
    DiffResult,
    Tolerance,
    compare_metric,
    compare_reports,
    diff,
    load_reports,
    read_tolerance_file,
    to_markdown,
    tolerances_for,
)
from agentbench_npu.config import resolve
from agentbench_npu.errors import UserError
from agentbench_npu.recipes import Layer, split_profiles

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
EPS = 2.0 ** -20  # a nudge past a limit that floating point keeps


# -- building reports ----------------------------------------------------------------------------------
def steps_of(**series: list[Any]) -> list[dict[str, Any]]:
    """Rows from per-metric series: steps_of(reward_mean=[0, 0.5]) → [{step: 0, reward_mean: 0}, ...]."""
    count = max(len(v) for v in series.values())
    return [{"step": s, **{k: v[s] for k, v in series.items() if s < len(v)}} for s in range(count)]


def report(scenario: str = "base", steps: list[dict[str, Any]] | None = None, gates: dict[str, bool] | None = None,
           status: str = "passed", **extra: Any) -> dict[str, Any]:
    return {"schema_version": 1, "scenario": scenario, "status": status,
            "steps": steps if steps is not None else steps_of(reward_mean=[0.25, 0.5, 0.5, 0.5]),
            "gates": [{"name": n, "passed": p, "value": 0.0, "threshold": 0.0, "detail": ""}
                      for n, p in (gates or {}).items()], **extra}


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def tol_file(tmp_path: Path, text: str, name: str = "tol.toml") -> Path:
    return write(tmp_path / name, text)


def rows(values: list[float | None], name: str = "m") -> dict[int, dict[str, Any]]:
    """Step rows; None leaves the metric out of that step (never recorded), NULL records a JSON null."""
    return {s: {"step": s, **({} if v is None else {name: None if v is NULL else v})} for s, v in enumerate(values)}


NULL = object()  # report.json writes a non-finite number as null


def compare(base: list[Any], cand: list[Any], tol: Tolerance, last_k: int = 3):
    steps = sorted(set(range(len(base))) & set(range(len(cand))))
    return compare_metric("m", tol, steps, rows(base), rows(cand), last_k)


def metric(result: DiffResult, name: str, scenario: str = "base"):
    s = next(s for s in result.scenarios if s.scenario == scenario)
    return next(m for m in s.metrics if m.metric == name)


def only_reward(tmp_path: Path, extra: str = "") -> Path:
    """A tolerance file over the defaults that leaves reward_mean as the metric under test."""
    return tol_file(tmp_path, "[metrics.reward_mean]\nabs = 0.25\n" + extra)


# -- the last-K mean ------------------------------------------------------------------------------------
def test_last_k_mean_exactly_at_abs_limit_is_within():
    m = compare([0.0, 0.0, 0.5, 0.5, 0.5], [9.0, 9.0, 0.75, 0.75, 0.75], Tolerance(abs=0.25))
    assert m.status == "ok", m.detail
    assert (m.baseline, m.candidate, m.delta, m.allowed) == (0.5, 0.75, 0.25, 0.25)


def test_last_k_mean_just_past_abs_limit_is_out():
    m = compare([0.0, 0.0, 0.5, 0.5, 0.5], [0.0, 0.0, 0.75 + EPS, 0.75 + EPS, 0.75 + EPS], Tolerance(abs=0.25))
    assert m.status == "out"
    assert "last-3 mean" in m.detail and "allowed ±0.25" in m.detail


@pytest.mark.parametrize("delta, status", [(-0.25, "ok"), (-0.25 - EPS, "out"), (0.25 + EPS, "out")])
def test_a_drop_counts_like_a_rise(delta, status):
    assert compare([1.0] * 3, [1.0 + delta] * 3, Tolerance(abs=0.25)).status == status


@pytest.mark.parametrize("baseline, candidate, status", [
    (2.0, 2.25, "ok"), (2.0, 2.25 + EPS, "out"), (-2.0, -1.75, "ok"), (-2.0, -2.25 - EPS, "out"),
])
def test_rel_scales_with_the_magnitude_of_the_baseline_mean(baseline, candidate, status):
    m = compare([baseline] * 3, [candidate] * 3, Tolerance(rel=0.125))
    assert m.allowed == 0.25
    assert m.status == status


def test_abs_and_rel_add_up():
    tol = Tolerance(abs=0.125, rel=0.0625)
    assert compare([2.0] * 3, [2.25] * 3, tol).status == "ok"
    assert compare([2.0] * 3, [2.25 + EPS] * 3, tol).status == "out"


def test_a_zero_tolerance_admits_only_equal_means():
    assert compare([0.5] * 3, [0.5] * 3, Tolerance()).status == "ok"
    assert compare([0.5] * 3, [0.5 + EPS] * 3, Tolerance()).status == "out"


@pytest.mark.parametrize("last_k, status", [(1, "ok"), (2, "ok"), (3, "out")])
def test_only_the_last_k_steps_make_the_mean(last_k, status):
    # the candidate differs by 0.75 at step 0 only: the mean of the last 3 moves by 0.25 + ..., of the last 2 not
    m = compare([0.0, 0.0, 0.0], [0.75 + 3 * EPS, 0.0, 0.0], Tolerance(abs=0.25), last_k=last_k)
    assert m.status == status


def test_last_k_beyond_the_run_uses_every_step():
    m = compare([0.0, 1.0], [0.0, 1.5], Tolerance(abs=0.25), last_k=10)
    assert (m.baseline, m.candidate, m.status) == (0.5, 0.75, "ok")


# -- single steps ---------------------------------------------------------------------------------------
def test_a_spike_past_max_gap_is_out_and_names_its_step_though_the_mean_is_within():
    m = compare([0.0] * 6, [0.0, 0.0, 0.5, 0.0, 0.0, 0.0], Tolerance(abs=1.0, max_gap=0.25))
    assert m.status == "out"
    assert m.first_out_step == 2
    assert (m.max_gap, m.max_gap_step) == (0.5, 2)
    assert "step 2" in m.detail and "max_gap 0.25" in m.detail


def test_without_max_gap_the_spike_is_only_reported():
    m = compare([0.0] * 6, [0.0, 0.0, 0.5, 0.0, 0.0, 0.0], Tolerance(abs=1.0))
    assert m.status == "ok"
    assert m.first_out_step is None
    assert (m.max_gap, m.max_gap_step) == (0.5, 2)
    assert m.detail == "largest gap 0.5 at step 2"


def test_first_out_step_is_the_first_step_past_max_gap_not_the_largest():
    m = compare([0.0] * 6, [0.0, 0.25, 0.5, 1.0, 0.0, 0.0], Tolerance(abs=10.0, max_gap=0.25))
    assert m.first_out_step == 2  # step 1's gap is exactly max_gap: within
    assert m.max_gap_step == 3


def test_a_gap_exactly_at_max_gap_is_within():
    m = compare([0.0] * 4, [0.25, 0.25, 0.0, 0.0], Tolerance(abs=1.0, max_gap=0.25))
    assert (m.status, m.first_out_step) == ("ok", None)


# -- NaN and missing values -----------------------------------------------------------------------------
def test_nan_in_the_candidates_last_k_is_out():
    m = compare([0.5] * 4, [0.5, 0.5, 0.5, math.nan], Tolerance(abs=1e9))
    assert m.status == "out"
    assert m.max_gap_step == 3


def test_nan_at_an_earlier_step_is_out_for_a_metric_with_max_gap():
    m = compare([0.5] * 6, [0.5, math.nan, 0.5, 0.5, 0.5, 0.5], Tolerance(abs=1e9, max_gap=1e9))
    assert (m.status, m.first_out_step, m.max_gap_step) == ("out", 1, 1)


def test_a_null_in_the_report_is_a_non_finite_number_and_out_of_tolerance():
    m = compare([0.5] * 4, [0.5, 0.5, 0.5, NULL], Tolerance(abs=1e9))
    assert m.status == "out"
    assert m.max_gap_step == 3


@pytest.mark.parametrize("side", ["baseline", "candidate"])
def test_a_metric_one_side_never_recorded_is_missing(side):
    have, lack = [0.5] * 3, [None] * 3
    m = compare(*((lack, have) if side == "baseline" else (have, lack)), Tolerance(abs=0.0))
    assert m.status == "missing"
    assert m.detail == f"not recorded by the {side}"
    assert (m.baseline, m.candidate, m.delta) == (None, None, None)


def test_steps_where_one_side_lacks_the_metric_are_left_out_of_the_mean():
    m = compare([0.5, 0.5, 9.0], [0.5, 0.5, None], Tolerance(abs=0.0))
    assert (m.baseline, m.candidate, m.status) == (0.5, 0.5, "ok")


def test_no_common_step_with_the_metric_is_missing():
    m = compare([0.5, None], [None, 0.5], Tolerance(abs=1.0))
    assert m.status == "missing" and "no step" in m.detail


def test_booleans_are_not_numbers_to_compare():
    m = compare([True] * 3, [False] * 3, Tolerance(abs=0.0))
    assert m.status == "missing"


def test_a_missing_metric_does_not_fail_the_diff(tmp_path):
    base = write(tmp_path / "a.json", report(steps=steps_of(reward_mean=[0.5] * 3, accuracy=[0.5] * 3)))
    cand = write(tmp_path / "b.json", report(steps=steps_of(reward_mean=[0.5] * 3)))
    result = diff(base, cand, only_reward(tmp_path, "[metrics.accuracy]\nabs = 0.0\n"))
    m = metric(result, "accuracy")
    assert m.status == "missing" and "candidate" in m.detail
    assert result.within
    assert "| accuracy | missing |" in to_markdown(result)


# -- scenarios: steps, status, gates --------------------------------------------------------------------
def test_different_step_counts_compare_the_common_steps_and_say_so(tmp_path):
    base = write(tmp_path / "a.json", report(steps=steps_of(reward_mean=[0.5, 0.5, 0.5, 5.0, 5.0])))
    cand = write(tmp_path / "b.json", report(steps=steps_of(reward_mean=[0.5, 0.5, 0.5])))
    s = diff(base, cand, only_reward(tmp_path)).scenarios[0]
    assert s.steps_compared == [0, 1, 2]
    assert s.notes == ["baseline has 5 steps, candidate 3: compared the 3 both have"]
    assert metric(DiffResult([s], [], []), "reward_mean").status == "ok"  # steps 3, 4 are not in the mean
    assert s.within


def test_same_step_count_but_other_steps_is_noted(tmp_path):
    a = report(steps=[{"step": 0, "reward_mean": 0.5}, {"step": 1, "reward_mean": 0.5}])
    b = report(steps=[{"step": 1, "reward_mean": 0.5}, {"step": 2, "reward_mean": 0.5}])
    s = compare_reports("base", ("a", a), ("b", b), 3, {"reward_mean": Tolerance()})
    assert s.steps_compared == [1]
    assert len(s.notes) == 1 and "compared the 1 both have" in s.notes[0]


def test_no_common_step_is_noted_and_compares_no_metric():
    a, b = report(steps=steps_of(reward_mean=[0.5])), report(steps=[{"step": 7, "reward_mean": 0.5}])
    s = compare_reports("base", ("a", a), ("b", b), 3, {"reward_mean": Tolerance()})
    assert "no step to compare: nothing was verified" in s.notes
    assert s.metrics == [] and not s.within  # nothing compared is never within tolerance


def test_equal_step_counts_add_no_note():
    s = compare_reports("base", ("a", report()), ("b", report()), 3, {"reward_mean": Tolerance()})
    assert s.notes == []
    assert [m.status for m in s.metrics] == ["ok"]


def test_a_run_that_did_not_pass_is_noted():
    s = compare_reports("base", ("a", report()), ("b", report(status="failed")), 3, {})
    assert s.notes == ["the candidate run's status is failed"]


def test_a_gate_that_passed_and_now_fails_regressed_and_fails_the_scenario():
    a = report(gates={"weight_sync": True, "logprob_alignment": True})
    b = report(gates={"weight_sync": False, "logprob_alignment": True})
    s = compare_reports("base", ("a", a), ("b", b), 3, {"reward_mean": Tolerance()})
    assert s.gates == [
        {"gate": "logprob_alignment", "baseline": True, "candidate": True, "change": "same"},
        {"gate": "weight_sync", "baseline": True, "candidate": False, "change": "regressed"},
    ]
    assert [m.status for m in s.metrics] == ["ok"]
    assert not s.within
    result = DiffResult([s], [], [])
    assert not result.within
    assert "- gate `weight_sync`: regressed" in to_markdown(result)
    assert "logprob_alignment" not in to_markdown(result)


def test_a_gate_that_failed_and_now_passes_is_fixed_and_does_not_fail():
    s = compare_reports("base", ("a", report(gates={"weight_sync": False})),
                        ("b", report(gates={"weight_sync": True})), 3, {"reward_mean": Tolerance()})
    assert s.gates[0]["change"] == "fixed"
    assert s.within


def test_a_gate_on_one_side_only_is_said_and_does_not_fail():
    s = compare_reports("base", ("a", report(gates={"reproducibility": True})),
                        ("b", report(gates={"weight_sync": False})), 3, {"reward_mean": Tolerance()})
    assert {g["gate"]: g["change"] for g in s.gates} == {"reproducibility": "only in baseline",
                                                          "weight_sync": "only in candidate"}
    assert s.within


def test_a_gate_failing_on_both_sides_is_the_same():
    s = compare_reports("base", ("a", report(gates={"weight_sync": False})),
                        ("b", report(gates={"weight_sync": False})), 3, {"reward_mean": Tolerance()})
    assert s.gates[0]["change"] == "same" and s.within


def test_a_scenario_only_in_the_baseline_fails_the_diff(tmp_path):
    write(tmp_path / "A" / "r1" / "report.json", report("base"))
    write(tmp_path / "A" / "r2" / "report.json", report("retool"))
    write(tmp_path / "B" / "r1" / "report.json", report("base"))
    result = diff(tmp_path / "A", tmp_path / "B", only_reward(tmp_path))
    assert [s.scenario for s in result.scenarios] == ["base"]
    assert result.scenarios[0].within
    assert (result.only_in_baseline, result.only_in_candidate) == (["retool"], [])
    assert not result.within
    md = to_markdown(result)
    assert md.startswith("# agentbench-npu diff: OUT OF TOLERANCE: 1 of 2 scenario(s)\n")
    assert "- scenario `retool`: in the baseline only, the candidate did not run it" in md


def test_a_scenario_only_in_the_candidate_is_said_and_does_not_fail(tmp_path):
    write(tmp_path / "A" / "r1" / "report.json", report("base"))
    write(tmp_path / "B" / "r1" / "report.json", report("base"))
    write(tmp_path / "B" / "r2" / "report.json", report("retool"))
    result = diff(tmp_path / "A", tmp_path / "B", only_reward(tmp_path))
    assert (result.only_in_baseline, result.only_in_candidate) == ([], ["retool"])
    assert result.within
    assert "- scenario `retool`: in the candidate only, no baseline to compare with" in to_markdown(result)


# -- reading reports --------------------------------------------------------------------------------------
def test_a_directory_of_run_dirs_pairs_reports_by_scenario(tmp_path):
    # run dirs named unlike their scenarios, and sorted in a different order on the two sides
    a_base = write(tmp_path / "A" / "1" / "report.json", report("base", steps_of(reward_mean=[0.5] * 3)))
    a_ret = write(tmp_path / "A" / "2" / "report.json", report("retool", steps_of(reward_mean=[0.0] * 3)))
    b_ret = write(tmp_path / "B" / "1" / "report.json", report("retool", steps_of(reward_mean=[0.0] * 3)))
    b_base = write(tmp_path / "B" / "2" / "report.json", report("base", steps_of(reward_mean=[0.5] * 3)))
    result = diff(tmp_path / "A", tmp_path / "B", tol_file(tmp_path, "[metrics.reward_mean]\nabs = 0.0\n"))
    assert [(s.scenario, s.baseline, s.candidate) for s in result.scenarios] == [
        ("base", str(a_base), str(b_base)), ("retool", str(a_ret), str(b_ret))]
    assert result.within


@pytest.mark.parametrize("form", ["file", "run dir", "parent dir"])
def test_a_report_a_run_dir_and_a_directory_of_run_dirs_are_all_accepted(tmp_path, form):
    file = write(tmp_path / "runs" / "r" / "report.json", report("base"))
    given = {"file": file, "run dir": file.parent, "parent dir": file.parent.parent}[form]
    assert load_reports(given) == {"base": (str(file), report("base"))}


def test_a_run_dir_own_report_wins_over_nested_run_dirs(tmp_path):
    own = write(tmp_path / "r" / "report.json", report("base"))
    write(tmp_path / "r" / "gates" / "report.json", report("base"))  # e.g. a gate's second run inside
    assert list(load_reports(tmp_path / "r").values())[0][0] == str(own)


def one_line_error(path: Path, *needles: str) -> str:
    with pytest.raises(UserError) as info:
        load_reports(path)
    text = str(info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


def test_two_reports_of_one_scenario_in_one_directory_are_refused_naming_both(tmp_path):
    first = write(tmp_path / "A" / "r1" / "report.json", report("base"))
    second = write(tmp_path / "A" / "r2" / "report.json", report("base"))
    one_line_error(tmp_path / "A", str(first), str(second), "'base'")


def test_a_file_that_is_not_json_is_refused_naming_it(tmp_path):
    bad = write(tmp_path / "notes.txt", "step,reward\n0,0.5\n")
    one_line_error(bad, str(bad), "not a report.json")


def test_a_broken_report_inside_a_directory_is_refused_naming_that_file(tmp_path):
    write(tmp_path / "A" / "r1" / "report.json", report("base"))
    bad = write(tmp_path / "A" / "r2" / "report.json", '{"schema_version": 1, "scenario": "x", "steps": [')
    one_line_error(tmp_path / "A", str(bad))


@pytest.mark.parametrize("data", [
    {"schema_version": 1, "steps": []}, {"schema_version": 1, "scenario": "base"},
    {"schema_version": 1, "scenario": 3, "steps": []}, {"schema_version": 1, "scenario": "base", "steps": {}},
    [1, 2, 3], "a string",
], ids=["no scenario", "no steps", "scenario not text", "steps not a list", "a list", "a string"])
def test_json_that_is_not_a_report_is_refused_naming_it(tmp_path, data):
    bad = write(tmp_path / "x.json", json.dumps(data))
    one_line_error(bad, str(bad), "not an agentbench-npu report")


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_another_schema_version_is_refused_naming_the_file_and_version(tmp_path, version):
    data = report()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    bad = write(tmp_path / "report.json", data)
    one_line_error(bad, str(bad), f"schema_version {version!r}")


def test_a_missing_path_is_refused_naming_it(tmp_path):
    one_line_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "does not exist")


def test_a_directory_without_reports_is_refused_naming_it(tmp_path):
    (tmp_path / "empty" / "run").mkdir(parents=True)
    one_line_error(tmp_path / "empty", str(tmp_path / "empty"), "no report.json")


def test_diff_refuses_a_bad_candidate_too(tmp_path):
    base = write(tmp_path / "a.json", report())
    bad = write(tmp_path / "b.json", "nope")
    with pytest.raises(UserError, match="b.json"):
        diff(base, bad)


@pytest.mark.parametrize("steps", [[{"reward_mean": 0.5}], [1, 2]], ids=["row without step", "rows not objects"])
def test_step_rows_that_are_not_rows_are_refused_naming_the_file(tmp_path, steps):
    base = write(tmp_path / "a.json", report())
    bad = write(tmp_path / "b.json", report(steps=steps))
    with pytest.raises(UserError, match="b.json"):
        diff(base, bad)


# -- tolerances: the layers -------------------------------------------------------------------------------
def shipped_defaults() -> dict[str, Any]:
    return tomllib.loads((REPO / "scenarios" / "diff.toml").read_text(encoding="utf-8"))


def test_defaults_are_scenarios_diff_toml():
    shipped = shipped_defaults()
    last_k, tols = tolerances_for("base", None, {})
    assert last_k == shipped["last_k"] == 3
    assert tols == {name: Tolerance(**{k: float(v) for k, v in entry.items()})
                    for name, entry in shipped["metrics"].items()}
    assert tols["reward_mean"] == Tolerance(abs=0.1)
    assert tols["logprob_abs_diff_mean"] == Tolerance(abs=0.01, max_gap=0.02)
    assert tols["entropy"] == Tolerance(rel=0.2)


def test_each_layer_overrides_the_one_before():
    recipe = {"last_k": 4, "metrics": {"reward_mean": {"abs": 0.5}, "accuracy": {"abs": 0.3},
                                       "pass_rate": {"rel": 0.1}}}
    file = {"last_k": 5, "metrics": {"accuracy": {"abs": 0.2}, "loss": {"abs": 0.7}},
            "scenarios": {"base": {"last_k": 6, "metrics": {"loss": {"abs": 0.9}}},
                          "retool": {"metrics": {"accuracy": {"abs": 0.05}}}}}
    k, tols = tolerances_for("base", recipe, file)
    assert k == 6
    assert tols["reward_mean"] == Tolerance(abs=0.5)  # recipe over defaults
    assert tols["pass_rate"] == Tolerance(rel=0.1)  # a recipe's own metric
    assert tols["accuracy"] == Tolerance(abs=0.2)  # file top level over recipe
    assert tols["loss"] == Tolerance(abs=0.9)  # [scenarios.base] over file top level
    assert tols["entropy"] == Tolerance(rel=0.2)  # untouched default
    k, tols = tolerances_for("retool", recipe, file)
    assert k == 5  # the file's top level: [scenarios.base] is for base only
    assert tols["accuracy"] == Tolerance(abs=0.05)
    assert tols["loss"] == Tolerance(abs=0.7)


@pytest.mark.parametrize("recipe, top, scenario, expected", [
    (None, None, None, 3), ({"last_k": 4}, None, None, 4), ({"last_k": 4}, 5, None, 5), ({"last_k": 4}, 5, 6, 6),
    (None, None, 1, 1), ({"last_k": 4}, None, 2, 2),
])
def test_last_k_layers_like_the_tolerances(recipe, top, scenario, expected):
    file: dict[str, Any] = {} if top is None else {"last_k": top}
    if scenario is not None:
        file["scenarios"] = {"base": {"last_k": scenario}, "other": {"last_k": 99}}
    assert tolerances_for("base", recipe, file)[0] == expected


def test_a_layer_that_sets_one_key_keeps_the_others():
    _, tols = tolerances_for("base", None, {"metrics": {"logprob_abs_diff_mean": {"abs": 1e-6}}})
    assert tols["logprob_abs_diff_mean"] == Tolerance(abs=1e-6, max_gap=0.02)


def test_diff_applies_the_recipe_then_the_file_then_its_scenario_table(tmp_path):
    for side, value in (("A", 0.5), ("B", 1.0)):
        write(tmp_path / side / "r1" / "report.json", report("base", steps_of(reward_mean=[value] * 3)))
        write(tmp_path / side / "r2" / "report.json", report("retool", steps_of(reward_mean=[value] * 3)))
    asked = []

    def recipe_diff(name: str) -> dict[str, Any]:
        asked.append(name)
        return {"metrics": {"reward_mean": {"abs": 0.5}}}  # within for both, Δ 0.5

    result = diff(tmp_path / "A", tmp_path / "B", recipe_diff=recipe_diff)
    assert sorted(asked) == ["base", "retool"]
    assert result.within and metric(result, "reward_mean").allowed == 0.5
    file = tol_file(tmp_path, "[scenarios.retool.metrics.reward_mean]\nabs = 0.25\n")
    result = diff(tmp_path / "A", tmp_path / "B", file, recipe_diff=recipe_diff)
    assert metric(result, "reward_mean", "base").status == "ok"
    assert metric(result, "reward_mean", "retool").status == "out"
    assert not result.within
    result = diff(tmp_path / "A", tmp_path / "B", tol_file(tmp_path, "[metrics.reward_mean]\nabs = 0.25\n"),
                  recipe_diff=recipe_diff)
    assert [metric(result, "reward_mean", s).status for s in ("base", "retool")] == ["out", "out"]


def test_last_k_given_to_diff_overrides_every_layer(tmp_path):
    base = write(tmp_path / "a.json", report(steps=steps_of(reward_mean=[0.0, 0.0, 0.0])))
    cand = write(tmp_path / "b.json", report(steps=steps_of(reward_mean=[3.0, 0.0, 0.0])))
    file = tol_file(tmp_path, "last_k = 3\n[metrics.reward_mean]\nabs = 0.5\n[scenarios.base]\nlast_k = 3\n")
    assert not diff(base, cand, file).within
    result = diff(base, cand, file, last_k=2)
    assert result.scenarios[0].last_k == 2
    assert result.within


def test_read_tolerance_file_without_a_file_is_empty():
    assert read_tolerance_file(None) == {}


# -- tolerances: errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needles", [
    ("[metrics.loss]\nabsolute = 0.1\n", ["metrics.loss.absolute", "abs, rel, max_gap"]),
    ("[metrics.loss]\nabs = -0.1\n", ["metrics.loss.abs", ">= 0", "-0.1"]),
    ("[metrics.loss]\nmax_gap = -1\n", ["metrics.loss.max_gap"]),
    ("[metrics.loss]\nrel = nan\n", ["metrics.loss.rel"]),
    ("[metrics.loss]\nabs = true\n", ["metrics.loss.abs"]),
    ("[metrics.loss]\nabs = \"0.1\"\n", ["metrics.loss.abs"]),
    ("[metrics]\nloss = 0.1\n", ["metrics.loss must be a table"]),
    ("last_k = 0\n", ["last_k", ">= 1"]),
    ("last_k = -2\n", ["last_k"]),
    ("last_k = 2.5\n", ["last_k"]),
    ("last_k = \"3\"\n", ["last_k"]),
    ("last_k = true\n", ["last_k"]),
    ("lastk = 3\n", ["unknown key 'lastk'"]),
    ("[metric.loss]\nabs = 0.1\n", ["unknown key 'metric'"]),
    ("[scenarios.base]\nlast_k = 0\n", ["[scenarios.base]", "last_k"]),
    ("[scenarios.base.metrics.kl]\ngap = 1\n", ["[scenarios.base]", "metrics.kl.gap"]),
    ("[scenarios.base]\ntolerance = 1\n", ["[scenarios.base]", "unknown key 'tolerance'"]),
    ("last_k = = 3\n", []),
    ("[metrics.loss\nabs = 0.1\n", []),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_tolerance_file_is_one_line_naming_the_file_and_key(tmp_path, text, needles):
    path = tol_file(tmp_path, text)
    with pytest.raises(UserError) as info:
        read_tolerance_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_a_bad_tolerance_file_stops_diff_before_comparing(tmp_path):
    base = write(tmp_path / "a.json", report())
    with pytest.raises(UserError, match="metrics.loss.abs"):
        diff(base, base, tol_file(tmp_path, "[metrics.loss]\nabs = -1\n"))


def test_a_missing_tolerance_file_is_refused_naming_it(tmp_path):
    with pytest.raises(UserError, match="nowhere.toml"):
        read_tolerance_file(tmp_path / "nowhere.toml")


@pytest.mark.parametrize("text", ["metrics = 1\n", "scenarios = 1\n", "[scenarios]\nbase = 1\n",
                                  "[scenarios.base]\nmetrics = 2\n"])
def test_tables_that_are_not_tables_are_refused_naming_the_file(tmp_path, text):
    path = tol_file(tmp_path, text)
    with pytest.raises(UserError, match=str(path)):
        read_tolerance_file(path)


def test_a_bad_recipe_diff_table_is_refused_naming_the_scenario():
    with pytest.raises(UserError, match=r"scenario 'base' recipe \[diff\]: metrics.kl.abs"):
        tolerances_for("base", {"metrics": {"kl": {"abs": -1}}}, {})
    with pytest.raises(UserError, match=r"scenario 'base' recipe \[diff\]: unknown key 'tolerances'"):
        tolerances_for("base", {"tolerances": {}}, {})


def test_the_recipe_diff_of_a_scenario_not_installed_is_none():
    class Plugins:
        def get(self, kind: str, name: str) -> Any:
            raise KeyError(name)

    assert _recipe_diff(Plugins(), "nope") is None


def test_the_recipe_diff_is_the_recipes_diff_table():
    class Recipe:
        def recipe(self) -> Layer:
            return Layer({"run": {"steps": 2}, "diff": {"last_k": 7}}, "x")

    class Entry:
        obj = Recipe()

    class Plugins:
        def get(self, kind: str, name: str) -> Any:
            assert (kind, name) == ("scenario", "mine")
            return Entry()

    assert _recipe_diff(Plugins(), "mine") == {"last_k": 7}


# -- output -------------------------------------------------------------------------------------------------
def two_scenarios(tmp_path: Path) -> DiffResult:
    write(tmp_path / "A" / "1" / "report.json", report("base", steps_of(reward_mean=[0.5] * 4, kl=[0.0] * 4),
                                                      {"weight_sync": True}))
    write(tmp_path / "A" / "2" / "report.json", report("retool", steps_of(reward_mean=[0.5] * 3)))
    write(tmp_path / "B" / "1" / "report.json", report("base", steps_of(reward_mean=[0.75] * 3,
                                                                        kl=[0.0, 0.5, 0.0]),
                                                      {"weight_sync": False}, status="failed"))
    write(tmp_path / "B" / "2" / "report.json", report("retool", steps_of(reward_mean=[0.5] * 3)))
    file = tol_file(tmp_path, "[metrics.reward_mean]\nabs = 0.125\n[metrics.kl]\nabs = 1.0\nmax_gap = 0.25\n")
    return diff(tmp_path / "A", tmp_path / "B", file)


def test_to_dict_is_json_with_within_tolerance_flags(tmp_path):
    result = two_scenarios(tmp_path)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["schema_version"] == 1
    assert data["within_tolerance"] is False
    assert [(s["scenario"], s["within_tolerance"]) for s in data["scenarios"]] == [("base", False), ("retool", True)]
    assert (data["only_in_baseline"], data["only_in_candidate"]) == ([], [])
    base = data["scenarios"][0]
    assert set(base) == {"scenario", "baseline", "candidate", "steps_compared", "last_k", "notes", "metrics", "gates",
                         "within_tolerance"}
    assert base["baseline"] == str(tmp_path / "A" / "1" / "report.json")
    assert base["steps_compared"] == [0, 1, 2] and base["last_k"] == 3
    assert base["notes"] == ["baseline has 4 steps, candidate 3: compared the 3 both have",
                             "the candidate run's status is failed"]
    assert base["gates"] == [{"gate": "weight_sync", "baseline": True, "candidate": False, "change": "regressed"}]
    by_name = {m["metric"]: m for m in base["metrics"]}
    assert set(by_name["kl"]) == {"metric", "status", "baseline", "candidate", "delta", "allowed", "max_gap",
                                  "max_gap_step", "first_out_step", "detail"}
    assert {k: by_name["reward_mean"][k] for k in ("status", "baseline", "candidate", "delta", "allowed")} == {
        "status": "out", "baseline": 0.5, "candidate": 0.75, "delta": 0.25, "allowed": 0.125}
    assert {k: by_name["kl"][k] for k in ("status", "max_gap", "max_gap_step", "first_out_step")} == {
        "status": "out", "max_gap": 0.5, "max_gap_step": 1, "first_out_step": 1}
    assert by_name["loss"]["status"] == "missing"


def test_to_markdown_says_what_moved(tmp_path):
    md = to_markdown(two_scenarios(tmp_path))
    assert md.startswith("# agentbench-npu diff: OUT OF TOLERANCE: 1 of 2 scenario(s)\n")
    assert md.endswith("\n") and not md.endswith("\n\n")
    assert "## base: OUT OF TOLERANCE" in md
    assert "## retool: within tolerance" in md
    assert f"baseline `{tmp_path / 'A' / '1' / 'report.json'}`, candidate `{tmp_path / 'B' / '1' / 'report.json'}`; " \
           "steps 3, mean of the last 3" in md
    assert "- baseline has 4 steps, candidate 3: compared the 3 both have" in md
    assert "- the candidate run's status is failed" in md
    assert "| metric | status | baseline | candidate | Δ | allowed | largest gap @ step | detail |" in md
    assert "| reward_mean | out | 0.5 | 0.75 | +0.25 | ±0.125 | 0.25 @ 0 |" in md
    assert "| kl | out | 0 | 0.1667 | +0.167 | ±1 | 0.5 @ 1 | step 1: 0 → 0.5 (gap 0.5 > max_gap 0.25) |" in md
    assert "| loss | missing | — | — | — | — | — | not recorded by the baseline |" in md
    assert "- gate `weight_sync`: regressed" in md


def test_to_markdown_of_a_clean_diff(tmp_path):
    base = write(tmp_path / "a.json", report())
    md = to_markdown(diff(base, base, only_reward(tmp_path)))
    assert md.startswith("# agentbench-npu diff: within tolerance\n")
    assert "| reward_mean | ok | 0.5 | 0.5 | +0 | ±0.25 | 0 @ 0 | largest gap 0 at step 0 |" in md
    assert "- gate" not in md and "- scenario" not in md


# -- the recipe's [diff] is not a run setting ---------------------------------------------------------------
def test_split_profiles_drops_the_diff_table_from_the_run_settings():
    values = {"run": {"steps": 3}, "diff": {"last_k": 2, "metrics": {"accuracy": {"abs": 0.1}}},
              "profiles": {"tiny": {"warm_start": {"steps": 1}}}}
    layer = Layer(values, "scenarios/mine.toml")
    own, profiles = split_profiles(layer)
    assert own.values == {"run": {"steps": 3}}
    assert own.source == "scenarios/mine.toml"
    assert set(profiles) == {"tiny"}
    assert "diff" in layer.values  # the recipe itself keeps it, for diff to read
    resolve("base", [own], {})  # and the run settings resolve: a [diff] section would be refused
    with pytest.raises(UserError, match="unknown section 'diff'"):
        resolve("base", [Layer({"diff": {"last_k": 2}}, "x")], {})



def test_a_diff_that_compared_nothing_is_not_within_tolerance():
    empty = compare_reports("base", ("a", report()), ("b", report(steps=[])), 3, {"reward_mean": Tolerance()})
    assert not empty.within and "no step to compare: nothing was verified" in empty.notes
    unrecorded = compare_reports("base", ("a", report()), ("b", report()), 3, {"not_a_metric": Tolerance()})
    assert [m.status for m in unrecorded.metrics] == ["missing"] and not unrecorded.within
