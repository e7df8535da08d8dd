"""Acceptance gates judge a finished run from its step rows: log-prob alignment, weight sync,
reproducibility in a second process and checkpoint continuity across a resume. Each test builds the
rows by hand, so a failure says which rule of which gate broke, not which model misbehaved."""

from __future__ import annotations

import json
import math
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from agentbench_npu.config import Layer, RunConfig, resolve
from agentbench_npu.errors import UserError
from agentbench_npu.gates import plugin as builtin_gates
from agentbench_npu.gates.base import (
    GateContext,
    GateRunError,
    evaluate_gates,
    select_gates,
    thresholds_for,
)
from agentbench_npu.gates.continuity import CheckpointContinuityGate
from agentbench_npu.gates.faults import FAULTS
from agentbench_npu.gates.logprob import LogprobAlignmentGate
from agentbench_npu.gates.reproducibility import ReproducibilityGate, compare_steps
from agentbench_npu.gates.weight_sync import WeightSyncGate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Round numbers, so that each test's values sit plainly on one side of a bound.
THRESHOLDS = {
    "logprob_mean": 0.01, "logprob_max": 0.1, "logprob_kl": 0.001, "spike_factor": 5.0, "spike_floor": 2e-3,
    "sync_probe_max": 0.01, "repro_tolerance": 0.0, "continuity_tolerance": 0.0,
}
WORST_TOKEN = {"task_id": "add-7", "sample": 3, "response_position": 5, "abs_diff": 0.5,
               "train_logprob": -1.0, "rollout_logprob": -1.5}


def config(**sections: dict[str, Any]) -> RunConfig:
    return resolve("base", [Layer(sections, "test")], {})


def row(step: int, **changes: Any) -> dict[str, Any]:
    """A healthy step row: aligned log-probs, a verified sync, and per-step digests and losses."""
    healthy = {
        "step": step, "logprob_abs_diff_mean": 1e-4, "logprob_abs_diff_max": 1e-3, "kl": 1e-6,
        "logprob_worst_token": dict(WORST_TOKEN, abs_diff=1e-3),
        "weights_checksum_match": True, "weights_checksum": f"w{step}", "trainer_weights_checksum": f"w{step}",
        "weight_version": step + 1, "sync_probe_abs_diff_max": 1e-4, "weight_sync_seconds": 0.01,
        "tokens_digest": f"tok{step}", "reward_mean": 0.25 + step / 10, "loss": 1.0 / (step + 1),
    }
    return {**healthy, **changes}


def rows(count: int, **changes_at: dict[str, Any]) -> list[dict[str, Any]]:
    """`count` healthy rows; `at2={"loss": 9.0}` changes step 2."""
    return [row(step, **changes_at.get(f"at{step}", {})) for step in range(count)]


def with_means(*means: float) -> list[dict[str, Any]]:
    """Healthy rows whose per-step mean |Δlogp| are `means`."""
    return [row(step, logprob_abs_diff_mean=m, logprob_abs_diff_max=max(m, 1e-3)) for step, m in enumerate(means)]


class Rerun:
    """Stands in for the second process: records what it was asked for, returns a prepared report, and
    (like a real run with checkpoint.save on) writes its final checkpoint's state.json under `out`."""

    def __init__(self, steps: list[dict[str, Any]], final_state: dict[str, Any] | None = None,
                 final_step: int | None = None) -> None:
        self.steps, self.final_state, self.final_step = steps, final_state, final_step
        self.calls: list[tuple[list[str], Path]] = []

    def __call__(self, extra: list[str], out: Path) -> dict[str, Any]:
        self.calls.append((list(extra), out))
        if self.final_state is not None:
            write_state(out, self.final_step, self.final_state)
        return {"run_dir": str(out), "steps": self.steps}


def refuse_to_rerun(extra: list[str], out: Path) -> dict[str, Any]:
    raise AssertionError(f"this gate must not ask for another run (asked for {extra})")


def write_state(run_dir: Path, step: int, state: dict[str, Any]) -> None:
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({"step": step, **state}))


def context(steps: list[dict[str, Any]], cfg: RunConfig | None = None, run_dir: Path = Path("/nonexistent/run"),
            rerun: Any = refuse_to_rerun, **thresholds: float) -> GateContext:
    cfg = cfg if cfg is not None else config(run={"steps": len(steps)})
    return GateContext(config=cfg, report={"steps": steps}, thresholds={**THRESHOLDS, **thresholds},
                       run_dir=run_dir, rerun=rerun)


def builtin() -> dict[str, Any]:
    """The built-in gates by name, in the order their plugin registers them."""
    registered: dict[str, Any] = {}
    builtin_gates.register_gates(register=lambda gate: registered.setdefault(gate.name, gate))
    return registered


def gates_table(name: str) -> dict[str, float]:
    text = resources.files("agentbench_npu.scenarios").joinpath("gates.toml").read_text()
    return {k: float(v) for k, v in tomllib.loads(text)[name].items()}


# -- logprob_alignment -----------------------------------------------------------------------------
def test_logprob_alignment_passes_when_every_step_is_within_its_bounds():
    result = LogprobAlignmentGate().evaluate(context(with_means(1e-4, 3e-4, 2e-4)))
    assert result.passed, result.detail
    assert result.name == "logprob_alignment"
    assert "3 steps within bounds" in result.detail and "at step 1" in result.detail


def test_logprob_alignment_reports_the_worst_step_of_each_measure_against_its_threshold():
    steps = [row(0, logprob_abs_diff_mean=2e-4, logprob_abs_diff_max=1e-3, kl=1e-6),
             row(1, logprob_abs_diff_mean=1e-4, logprob_abs_diff_max=5e-2, kl=3e-6)]
    result = LogprobAlignmentGate().evaluate(context(steps))
    assert result.value == {"mean": 2e-4, "max": 5e-2, "kl": 3e-6}
    assert result.threshold["mean"] == 0.01 and result.threshold["max"] == 0.1 and result.threshold["kl"] == 0.001


def test_logprob_alignment_fails_on_a_step_mean_above_logprob_mean_and_names_the_worst_token():
    steps = rows(3, at1={"logprob_abs_diff_mean": 0.05, "logprob_worst_token": WORST_TOKEN})
    result = LogprobAlignmentGate().evaluate(context(steps))
    assert not result.passed
    assert result.detail.startswith("step 1: mean |Δlogp| 0.05 > 0.01"), result.detail
    assert "task add-7 sample 3 response position 5" in result.detail


def test_logprob_alignment_fails_on_one_token_above_logprob_max_even_when_the_mean_is_fine():
    steps = rows(3, at2={"logprob_abs_diff_max": 0.5, "logprob_worst_token": WORST_TOKEN})
    result = LogprobAlignmentGate().evaluate(context(steps))
    assert not result.passed
    assert result.detail.startswith("step 2: a token's |Δlogp| 0.5 > 0.1"), result.detail
    assert "task add-7 sample 3 response position 5" in result.detail


def test_logprob_alignment_fails_when_no_step_compared_a_single_token():
    # every trajectory excluded from training (a chat template that re-renders history differently, say)
    result = LogprobAlignmentGate().evaluate(context(rows(2, at0={"trainable_tokens": 0}, at1={"trainable_tokens": 0})))
    assert not result.passed and result.detail.startswith("no step had a sampled token to compare")
    some = LogprobAlignmentGate().evaluate(context(rows(2, at0={"trainable_tokens": 0}, at1={"trainable_tokens": 5})))
    assert some.passed, some.detail


def test_logprob_alignment_fails_on_a_k3_kl_above_logprob_kl():
    result = LogprobAlignmentGate().evaluate(context(rows(3, at0={"kl": 0.01})))
    assert not result.passed
    assert result.detail.startswith("step 0: k3 KL 0.01 > 0.001"), result.detail


def test_logprob_alignment_names_the_first_failing_step_and_counts_the_rest():
    steps = rows(5, at2={"logprob_abs_diff_mean": 0.05}, at4={"kl": 0.01})
    result = LogprobAlignmentGate().evaluate(context(steps))
    assert not result.passed
    assert result.detail.startswith("step 2:") and result.detail.endswith("(+1 more)"), result.detail


def test_logprob_alignment_fails_a_step_whose_mean_spikes_above_the_running_median_and_the_floor():
    # 5e-3 is within logprob_mean (0.01) but 50x the median of the three steps before it
    result = LogprobAlignmentGate().evaluate(context(with_means(1e-4, 1e-4, 1e-4, 5e-3)))
    assert not result.passed
    assert result.detail.startswith("step 3: spike"), result.detail
    assert "50.0x the running median" in result.detail


def test_logprob_alignment_takes_the_median_not_the_mean_of_earlier_steps():
    # one large earlier step (9e-3) would lift a running mean to 3e-3 and hide the spike at step 3
    result = LogprobAlignmentGate().evaluate(context(with_means(1e-4, 9e-3, 1e-4, 5e-3)))
    assert not result.passed
    assert result.detail.startswith("step 3: spike"), result.detail


def test_logprob_alignment_ignores_a_jump_that_stays_under_the_spike_floor():
    # 1.5e-3 is 15x the median, but below spike_floor (2e-3): too small to matter
    result = LogprobAlignmentGate().evaluate(context(with_means(1e-4, 1e-4, 1e-4, 1.5e-3)))
    assert result.passed, result.detail


def test_logprob_alignment_judges_no_spike_before_three_earlier_steps():
    result = LogprobAlignmentGate().evaluate(context(with_means(1e-4, 1e-4, 5e-3)))
    assert result.passed, result.detail


def test_logprob_alignment_fails_a_step_whose_mean_is_nan():
    # a NaN log-prob (a diverged or broken kernel) is the most misaligned a step can be
    result = LogprobAlignmentGate().evaluate(context(rows(3, at1={"logprob_abs_diff_mean": math.nan})))
    assert not result.passed, result.detail
    assert result.detail.startswith("step 1:"), result.detail


# -- weight_sync -----------------------------------------------------------------------------------
def test_weight_sync_passes_when_every_checksum_matches_and_the_probe_agrees():
    result = WeightSyncGate().evaluate(context(rows(3)))
    assert result.passed, result.detail
    assert result.detail.startswith("3 syncs verified")
    assert result.value["checksum_mismatches"] == 0 and result.threshold == {"checksum_mismatches": 0,
                                                                             "probe_max": 0.01}


def test_weight_sync_fails_on_a_checksum_mismatch_naming_the_step_and_both_checksums():
    steps = rows(3, at1={"weights_checksum_match": False, "weights_checksum": "e0e0", "trainer_weights_checksum": "7a7a"})
    result = WeightSyncGate().evaluate(context(steps))
    assert not result.passed
    assert result.value["checksum_mismatches"] == 1
    assert result.detail.startswith("step 1: engine checksum e0e0 != trainer 7a7a"), result.detail
    assert "version 2" in result.detail


def test_weight_sync_fails_when_the_probe_differs_by_more_than_sync_probe_max():
    result = WeightSyncGate().evaluate(context(rows(3, at2={"sync_probe_abs_diff_max": 0.5})))
    assert not result.passed
    assert result.value["probe_max"] == 0.5
    assert result.detail.startswith("step 2: probe |engine - trainer| log-prob max 0.5 > 0.01"), result.detail


def test_weight_sync_fails_when_the_probe_difference_is_nan():
    result = WeightSyncGate().evaluate(context(rows(3, at2={"sync_probe_abs_diff_max": math.nan})))
    assert not result.passed, result.detail


def test_weight_sync_reports_the_mean_and_max_seconds_a_sync_took():
    steps = [row(0, weight_sync_seconds=0.1), row(1, weight_sync_seconds=0.2), row(2, weight_sync_seconds=0.3)]
    result = WeightSyncGate().evaluate(context(steps))
    assert result.value["seconds_mean"] == pytest.approx(0.2)
    assert result.value["seconds_max"] == 0.3
    assert "200.0 ms mean" in result.detail


# -- reproducibility -------------------------------------------------------------------------------
def test_reproducibility_asks_for_a_second_run_of_repro_steps_without_checkpoints(tmp_path):
    rerun = Rerun(rows(2))
    ReproducibilityGate().evaluate(context(rows(5), config(run={"steps": 5}), tmp_path, rerun))
    assert rerun.calls == [(["--steps", "2", "--set", "checkpoint.save=false"], tmp_path / "gates" / "reproducibility")]


def test_reproducibility_runs_no_more_steps_than_the_run_had(tmp_path):
    rerun = Rerun(rows(3))
    cfg = config(run={"steps": 3}, gates={"repro_steps": 8})
    result = ReproducibilityGate().evaluate(context(rows(3), cfg, tmp_path, rerun))
    assert rerun.calls[0][0][:2] == ["--steps", "3"]
    assert result.threshold["steps"] == 3


def test_reproducibility_passes_bitwise_when_the_second_run_is_identical(tmp_path):
    result = ReproducibilityGate().evaluate(context(rows(4), config(run={"steps": 4}), tmp_path, Rerun(rows(2))))
    assert result.passed, result.detail
    assert "bitwise" in result.detail and result.value == {"mismatches": 0}


def test_reproducibility_compares_only_the_steps_the_second_run_made(tmp_path):
    first = rows(4, at3={"loss": 123.0})  # step 3 is beyond repro_steps = 2
    result = ReproducibilityGate().evaluate(context(first, config(run={"steps": 4}), tmp_path, Rerun(rows(2))))
    assert result.passed, result.detail


def test_reproducibility_fails_on_different_tokens_at_tolerance_zero(tmp_path):
    second = rows(2, at1={"tokens_digest": "other"})
    result = ReproducibilityGate().evaluate(context(rows(2), config(run={"steps": 2}), tmp_path, Rerun(second)))
    assert not result.passed
    assert result.detail == "step 1: tokens_digest 'tok1' vs 'other'"


def test_reproducibility_tolerates_different_tokens_when_the_tolerance_is_above_zero(tmp_path):
    second = rows(2, at1={"tokens_digest": "other", "loss": 0.5 * (1 + 1e-4)})
    result = ReproducibilityGate().evaluate(
        context(rows(2), config(run={"steps": 2}), tmp_path, Rerun(second), repro_tolerance=1e-3))
    assert result.passed, result.detail
    assert "within 0.001" in result.detail


def test_reproducibility_fails_on_a_relative_gap_above_the_tolerance(tmp_path):
    second = rows(2, at1={"tokens_digest": "other", "loss": 0.5 * 1.01})
    result = ReproducibilityGate().evaluate(
        context(rows(2), config(run={"steps": 2}), tmp_path, Rerun(second), repro_tolerance=1e-3))
    assert not result.passed
    assert result.detail.startswith("step 1: loss 0.5 vs 0.505"), result.detail
    assert result.threshold == {"relative_tolerance": 1e-3, "steps": 2}


def test_reproducibility_reports_a_second_run_with_fewer_steps(tmp_path):
    result = ReproducibilityGate().evaluate(context(rows(2), config(run={"steps": 2}), tmp_path, Rerun(rows(1))))
    assert not result.passed
    assert result.detail == "2 steps vs 1 in the second run (missing there: [1])"


def test_compare_steps_finds_nothing_between_identical_runs():
    assert compare_steps(rows(3), rows(3), 0.0) == []


def test_compare_steps_lists_every_difference_with_its_step_and_key():
    second = rows(2, at0={"reward_mean": 0.5}, at1={"weights_checksum": "zz"})
    assert compare_steps(rows(2), second, 0.0) == [
        "step 0: reward_mean 0.25 vs 0.5 (relative gap 0.5)",
        "step 1: weights_checksum 'w1' vs 'zz'",
    ]

def test_compare_steps_compares_only_the_keys_it_is_given():
    second = rows(1, at0={"loss": 9.0, "tokens_digest": "other"})
    assert compare_steps(rows(1), second, 0.0, keys=("reward_mean",)) == []


def test_compare_steps_reports_a_nan_loss_against_a_finite_one():
    assert compare_steps(rows(1), rows(1, at0={"loss": math.nan}), 1e-3) != []


# -- checkpoint_continuity -------------------------------------------------------------------------
@pytest.mark.parametrize("steps, split, expected", [
    (10, 0, 5), (7, 0, 3), (2, 0, 1), (3, 0, 1),  # 0: half the steps, at least 1
    (10, 3, 3),  # gates.continuity_split honoured
    (10, 10, 9), (10, 50, 9),  # at most steps - 1, so that something is left to resume
])
def test_continuity_splits_at_half_the_steps_or_at_continuity_split_within_1_to_steps_minus_1(steps, split, expected):
    cfg = config(run={"steps": steps}, gates={"continuity_split": split})
    assert CheckpointContinuityGate().split_step(cfg) == expected


def test_continuity_checkpoint_lives_under_the_run_dir_named_by_the_split_step(tmp_path):
    cfg = config(run={"steps": 10})
    assert CheckpointContinuityGate().checkpoint_dir(tmp_path, cfg) == \
        tmp_path / "gates" / "checkpoint_continuity" / "step-000005"


def test_continuity_applies_only_with_two_steps_or_more_and_checkpoints_saved():
    gate = CheckpointContinuityGate()
    assert gate.applies(config(run={"steps": 2}))
    assert not gate.applies(config(run={"steps": 1}))
    assert not gate.applies(config(run={"steps": 4}, checkpoint={"save": False}))


FINAL = {"weights_checksum": "w-final", "optimizer_checksum": "o-final"}


def continuity(tmp_path: Path, resumed_steps: list[dict[str, Any]], resumed_final: dict[str, Any] = FINAL,
               steps: int = 4) -> tuple[Any, Rerun]:
    """The uninterrupted run (4 steps, final checkpoint FINAL) judged against a resumed one."""
    run_dir = tmp_path / "run"
    write_state(run_dir, steps, FINAL)
    rerun = Rerun(resumed_steps, resumed_final, final_step=steps)
    result = CheckpointContinuityGate().evaluate(context(rows(steps), config(run={"steps": steps}), run_dir, rerun))
    return result, rerun


def test_continuity_resumes_from_its_split_checkpoint_and_runs_to_the_last_step(tmp_path):
    _, rerun = continuity(tmp_path, rows(4))
    gate_dir = tmp_path / "run" / "gates" / "checkpoint_continuity"
    assert rerun.calls == [(["--resume", str(gate_dir / "step-000002"), "--steps", "4"], gate_dir / "resumed")]


def test_continuity_passes_when_the_resumed_tail_and_final_checkpoint_equal_the_uninterrupted_run(tmp_path):
    result, _ = continuity(tmp_path, rows(4))
    assert result.passed, result.detail
    assert result.detail.startswith("saved at step 2, resumed in a new process: steps 2-3")
    assert result.threshold == {"relative_tolerance": 0.0, "split_step": 2}


def test_continuity_judges_only_the_steps_after_the_split(tmp_path):
    # steps before the split were carried over from the checkpoint's run, not recomputed
    result, _ = continuity(tmp_path, rows(4, at1={"loss": 123.0}))
    assert result.passed, result.detail


def test_continuity_fails_when_a_resumed_step_differs(tmp_path):
    result, _ = continuity(tmp_path, rows(4, at3={"loss": 123.0}))
    assert not result.passed
    assert result.detail.startswith("step 3: loss"), result.detail


def test_continuity_fails_when_the_final_optimizer_state_differs(tmp_path):
    result, _ = continuity(tmp_path, rows(4), {**FINAL, "optimizer_checksum": "o-other"})
    assert not result.passed
    assert result.detail.startswith("final checkpoint: optimizer_checksum o-final (uninterrupted) vs o-other (resumed)"), \
        result.detail


def test_continuity_fails_when_the_final_weights_differ(tmp_path):
    result, _ = continuity(tmp_path, rows(4), {**FINAL, "weights_checksum": "w-other"})
    assert not result.passed
    assert result.detail.startswith("final checkpoint: weights_checksum"), result.detail


def test_continuity_fails_when_the_resumed_run_left_no_final_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    rerun = Rerun(rows(4))  # a report, but no checkpoints/step-000004/state.json under its run_dir
    result = CheckpointContinuityGate().evaluate(context(rows(4), config(run={"steps": 4}), run_dir, rerun))
    assert not result.passed, "no final checkpoint on either side, yet the gate says the states are identical"


# -- thresholds ------------------------------------------------------------------------------------
def test_thresholds_on_cpu_in_float32_come_from_the_cpu_float32_table():
    assert thresholds_for("cpu", config(model={"dtype": "float32"})) == gates_table("cpu-float32")


def test_thresholds_follow_the_lower_precision_of_trainer_and_engine():
    cfg = config(model={"dtype": "float32", "engine_dtype": "bfloat16"})
    assert thresholds_for("cuda", cfg) == gates_table("default")
    assert thresholds_for("cpu", cfg) == gates_table("default")


def test_thresholds_in_float32_on_an_accelerator_come_from_the_float32_table():
    assert thresholds_for("cuda", config(model={"dtype": "float32"})) == gates_table("float32")
    assert thresholds_for("npu", config(model={"dtype": "float32"})) == gates_table("float32")


def test_a_gates_override_wins_over_the_table_for_that_key_only():
    values = thresholds_for("cuda", config(model={"engine_dtype": "bfloat16"}, gates={"logprob_mean": 0.05}))
    assert values == {**gates_table("default"), "logprob_mean": 0.05}


def test_a_gates_override_of_zero_is_honoured():
    values = thresholds_for("cuda", config(model={"engine_dtype": "bfloat16"}, gates={"repro_tolerance": 0.0}))
    assert values["repro_tolerance"] == 0.0


# -- selecting and evaluating ----------------------------------------------------------------------
def test_all_selects_every_applicable_gate_in_registration_order():
    chosen = select_gates(builtin(), config(run={"steps": 4}))
    assert [g.name for g in chosen] == ["logprob_alignment", "weight_sync", "reproducibility", "checkpoint_continuity"]


def test_all_leaves_out_the_gates_that_do_not_apply():
    assert [g.name for g in select_gates(builtin(), config(run={"steps": 1}))] == \
        ["logprob_alignment", "weight_sync", "reproducibility"]
    assert "checkpoint_continuity" not in [g.name for g in select_gates(
        builtin(), config(run={"steps": 4}, checkpoint={"save": False}))]


@pytest.mark.parametrize("spec", ["none", "", "  none "])
def test_none_selects_no_gate(spec):
    assert select_gates(builtin(), config(gates={"enabled": spec})) == []


def test_a_comma_list_selects_the_named_gates():
    chosen = select_gates(builtin(), config(gates={"enabled": "weight_sync, reproducibility"}))
    assert [g.name for g in chosen] == ["weight_sync", "reproducibility"]


def test_an_unknown_gate_name_is_a_user_error_with_a_suggestion():
    with pytest.raises(UserError) as info:
        select_gates(builtin(), config(gates={"enabled": "logprob_alignment,weight_synk"}))
    message = str(info.value)
    assert "unknown gate 'weight_synk'" in message and "did you mean: weight_sync" in message
    assert "all / none" in message


def test_naming_a_gate_that_does_not_apply_is_a_user_error_saying_what_it_needs():
    with pytest.raises(UserError) as info:
        select_gates(builtin(), config(run={"steps": 1}, gates={"enabled": "checkpoint_continuity"}))
    assert str(info.value) == ("gate 'checkpoint_continuity' does not apply to this run: "
                               "a training run (--mode train) of at least two steps with checkpoint.save = true")


def test_an_eval_run_has_no_continuity_gate_and_a_gold_run_no_logprob_gate():
    eval_run = [g.name for g in select_gates(builtin(), config(run={"steps": 3, "mode": "eval"}))]
    assert "checkpoint_continuity" not in eval_run and "logprob_alignment" in eval_run
    gold = [g.name for g in select_gates(builtin(), config(run={"steps": 3, "mode": "eval", "policy": "gold"}))]
    assert "logprob_alignment" not in gold and {"weight_sync", "reproducibility"} <= set(gold)
    ranks = [g.name for g in select_gates(builtin(), config(run={"steps": 3, "mode": "eval"},
                                                             cluster={"executor": "ray", "train_devices": 2}))]
    assert "ranks" not in ranks  # an eval run has no training step whose ranks could diverge


def test_a_gate_whose_second_run_fails_is_a_failed_result_and_later_gates_still_run():
    def broken(extra: list[str], out: Path) -> dict[str, Any]:
        raise GateRunError("the second run (--steps 2) exited 1: out of memory")

    announced: list[str] = []
    gates = [ReproducibilityGate(), WeightSyncGate()]
    results = evaluate_gates(gates, lambda gate: context(rows(2), rerun=broken), on_gate=announced.append)
    assert announced == ["reproducibility", "weight_sync"]
    failed, later = results
    assert (failed.name, failed.passed, failed.value, failed.threshold) == ("reproducibility", False, None, None)
    assert failed.detail == "could not evaluate: the second run (--steps 2) exited 1: out of memory"
    assert later.name == "weight_sync" and later.passed


def test_an_error_that_is_not_a_failed_run_is_not_hidden_as_a_gate_result():
    def buggy(extra: list[str], out: Path) -> dict[str, Any]:
        raise KeyError("steps")

    with pytest.raises(KeyError):
        evaluate_gates([ReproducibilityGate()], lambda gate: context(rows(2), rerun=buggy))


# -- faults ----------------------------------------------------------------------------------------
def test_fault_names_are_unique():
    names = [f.name for f in FAULTS]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_each_fault_describes_itself_and_names_existing_gates(fault):
    gates = set(builtin())
    assert fault.description.strip()
    assert fault.caught_by in gates
    assert set(fault.also_affects) <= gates, fault.also_affects
    assert fault.caught_by not in fault.also_affects


def fault(name: str):
    return next(f for f in FAULTS if f.name == name)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_logprob_temperature_cannot_bite_when_temperature_leaves_log_probs_unchanged(temperature):
    reason = fault("logprob-temperature").cannot_bite(config(rollout={"temperature": temperature}))
    assert reason is not None and "rollout.temperature" in reason


def test_logprob_temperature_can_bite_at_temperature_0_8():
    assert fault("logprob-temperature").cannot_bite(config(rollout={"temperature": 0.8})) is None


def test_skip_rng_restore_cannot_bite_with_one_minibatch():
    reason = fault("skip-rng-restore").cannot_bite(config(train={"num_minibatches": 1}))
    assert reason is not None and "train.num_minibatches=2" in reason


def test_skip_rng_restore_cannot_bite_when_minibatches_are_not_shuffled():
    cfg = config(train={"num_minibatches": 2, "shuffle_minibatches": False})
    assert fault("skip-rng-restore").cannot_bite(cfg) is not None


def test_skip_rng_restore_can_bite_with_two_shuffled_minibatches():
    assert fault("skip-rng-restore").cannot_bite(config(train={"num_minibatches": 2})) is None


def test_rank_divergence_cannot_bite_one_rank_but_can_two():
    assert "at least 2" in fault("rank-divergence").cannot_bite(config())
    assert fault("rank-divergence").cannot_bite(
        config(cluster={"executor": "ray", "train_devices": 2}, rollout={"prompts_per_step": 8})) is None


def test_moe_faults_bite_only_moe_models_and_corrupt_routing_only_with_replay():
    assert "is dense" in fault("nan-expert").cannot_bite(config())
    assert fault("nan-expert").cannot_bite(config(model={"name": "tiny-moe"})) is None
    assert "is dense" in fault("corrupt-routing").cannot_bite(config())
    assert "routing_replay is off" in fault("corrupt-routing").cannot_bite(config(model={"name": "tiny-moe"}))
    assert fault("corrupt-routing").cannot_bite(
        config(model={"name": "tiny-moe"}, train={"routing_replay": True})) is None


def test_the_tp_norm_gradient_fault_bites_only_the_megatron_trainer_split_over_ranks():
    assert "megatron.tensor_parallel=2" in fault("unsummed-tp-norm-grads").cannot_bite(config())
    assert "megatron.tensor_parallel=2" in fault("unsummed-tp-norm-grads").cannot_bite(config(run={"trainer": "megatron"}))
    assert fault("unsummed-tp-norm-grads").cannot_bite(config(
        run={"trainer": "megatron"}, megatron={"tensor_parallel": 2},
        cluster={"executor": "ray", "train_devices": 2}, rollout={"prompts_per_step": 8})) is None


@pytest.mark.parametrize("fault", [f for f in FAULTS if f.name not in
                                   ("logprob-temperature", "skip-rng-restore", "rank-divergence", "corrupt-routing",
                                    "nan-expert", "unsummed-tp-norm-grads")],
                         ids=lambda f: f.name)
def test_other_faults_can_bite_a_default_run(fault):
    assert fault.cannot_bite(config()) is None


def test_compare_steps_matches_rows_by_step_number_not_position():
    mine = [row(2), row(3)]
    theirs = [row(0), row(1), row(2), row(3)]
    assert compare_steps(mine, theirs, 0.0) == ["2 steps vs 4 in the second run (missing there: none)"]
    assert compare_steps(mine, [row(3), row(2)], 0.0) == []


def test_with_a_tolerance_bit_level_hashes_do_not_decide_but_numbers_do():
    drifted = row(0, weights_checksum="other", tokens_digest="other", loss=row(0)["loss"] * (1 + 1e-6))
    assert compare_steps([row(0)], [drifted], 1e-3) == []
    assert compare_steps([row(0)], [drifted], 0.0) != []
