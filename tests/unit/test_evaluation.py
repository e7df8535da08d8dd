"""Eval-run bookkeeping (`agentbench_npu.evaluation`): τ-bench's pass^k estimator, the per-task table and pass^k
curve of `EvalRecord.summary()`, and `logprob_mismatch`, the train/rollout log-prob gap over trainable tokens.

Expected numbers are worked out by hand (C(c, k) / C(n, k); k3 = exp(r) - r - 1 with r = rollout - train), not
with the module's own helpers. Each test name states the behaviour it pins down.
"""

from __future__ import annotations

import itertools
import math

import pytest

from agentbench_npu.evaluation import EvalRecord, logprob_mismatch, pass_hat_k
from agentbench_npu.types import Trajectory


# -- pass_hat_k ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("successes, trials, k, expected", [
    (2, 4, 1, 0.5),        # 2/4
    (2, 4, 2, 1 / 6),      # C(2,2)/C(4,2) = 1/6
    (2, 4, 3, 0.0),        # C(2,3) = 0
    (3, 4, 2, 0.5),        # 3/6
    (3, 5, 3, 0.1),        # 1/10
    (1, 1, 1, 1.0),
    (0, 3, 1, 0.0),
])
def test_pass_hat_k_is_the_chance_that_k_trials_drawn_without_replacement_all_succeed(successes, trials, k, expected):
    assert pass_hat_k(successes, trials, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("trials", [1, 2, 5, 8])
def test_a_task_that_always_succeeds_has_pass_hat_k_one_for_every_k(trials):
    assert [pass_hat_k(trials, trials, k) for k in range(1, trials + 1)] == [1.0] * trials


def test_pass_hat_1_is_the_success_rate_and_the_curve_never_rises_with_k():
    for trials in range(1, 9):
        for successes in range(trials + 1):
            curve = [pass_hat_k(successes, trials, k) for k in range(1, trials + 1)]
            assert curve[0] == pytest.approx(successes / trials)
            assert all(a >= b for a, b in itertools.pairwise(curve)), (successes, trials, curve)


@pytest.mark.parametrize("successes, trials, k", [(2, 4, 0), (2, 4, 5), (0, 0, 1), (1, 3, -1)])
def test_a_k_outside_one_to_trials_is_a_value_error_naming_k_and_trials(successes, trials, k):
    with pytest.raises(ValueError, match=f"k={k}, trials={trials}"):
        pass_hat_k(successes, trials, k)


def test_more_successes_than_trials_is_a_value_error():
    with pytest.raises(ValueError):
        pass_hat_k(5, 4, 1)


# -- EvalRecord ---------------------------------------------------------------------------------------
def trial(task_id: str, reward: float, sample: int = 0, seed: int | None = None, status: str = "completed",
          **metadata) -> Trajectory:
    return Trajectory(prompt_ids=[1, 2], task_id=task_id, reward=reward, status=status,
                      metadata={"sample": sample, "seed": seed, **metadata})


class Plain:
    """A scenario without per-task columns."""


class WithColumns:
    def task_result(self, traj: Trajectory) -> dict:
        return {"db_match": traj.metadata["db_match"], "ended": traj.metadata["ended"]}


def record(rewards: dict[str, list[float]], scenario=None) -> EvalRecord:
    rec = EvalRecord()
    rec.add(0, [trial(task, r, sample=n, seed=100 + n) for task, rs in rewards.items() for n, r in enumerate(rs)],
            scenario or Plain())
    return rec


def test_an_empty_record_summarises_to_no_tasks_and_no_curve():
    assert EvalRecord().summary() == {"tasks": [], "pass_hat_k": {}, "trials_per_task": 0}


def test_pass_hat_k_is_averaged_over_tasks_up_to_the_fewest_trials_of_any_task():
    summary = record({"a": [1, 0, 1, 0], "b": [1, 1, 1]}).summary()
    assert summary["trials_per_task"] == 3
    assert list(summary["pass_hat_k"]) == ["1", "2", "3"]
    # a: 2 of 4 -> 1/2, 1/6, 0; b: 3 of 3 -> 1, 1, 1
    assert summary["pass_hat_k"]["1"] == pytest.approx((0.5 + 1) / 2)
    assert summary["pass_hat_k"]["2"] == pytest.approx((1 / 6 + 1) / 2)
    assert summary["pass_hat_k"]["3"] == pytest.approx((0 + 1) / 2)
    assert summary["reward_mean"] == pytest.approx(5 / 7)  # over trials, not tasks


def test_the_per_task_table_is_sorted_by_task_and_counts_trials_successes_and_mean_reward():
    summary = record({"zeta": [0.0, 1.0], "alpha": [1.0, 0.5, 0.25]}).summary()
    rows = [{k: v for k, v in row.items() if k != "runs"} for row in summary["tasks"]]
    assert rows == [
        {"task_id": "alpha", "trials": 3, "successes": 1, "reward_mean": pytest.approx(1.75 / 3)},
        {"task_id": "zeta", "trials": 2, "successes": 1, "reward_mean": 0.5},
    ]


@pytest.mark.parametrize("reward, success", [(1.0, True), (1.0 - 1e-7, True), (0.999, False), (0.5, False),
                                             (0.0, False), (2.0, True)])
def test_a_trial_succeeds_when_its_reward_is_one_within_1e_6(reward, success):
    summary = record({"t": [reward]}).summary()
    assert summary["tasks"][0]["successes"] == int(success)
    assert summary["pass_hat_k"] == {"1": float(success)}


def test_each_run_keeps_its_step_trial_seed_reward_and_status_in_the_order_they_ran():
    rec = EvalRecord()
    rec.add(3, [trial("t", 1.0, sample=0, seed=11), trial("t", 0.0, sample=1, seed=12, status="truncated")], Plain())
    rec.add(4, [trial("t", 1.0, sample=0, seed=21)], Plain())
    (row,) = rec.summary()["tasks"]
    assert row["runs"] == [
        {"step": 3, "trial": 0, "seed": 11, "reward": 1.0, "status": "completed"},
        {"step": 3, "trial": 1, "seed": 12, "reward": 0.0, "status": "truncated"},
        {"step": 4, "trial": 0, "seed": 21, "reward": 1.0, "status": "completed"},
    ]
    assert (row["trials"], row["successes"]) == (3, 2)


def test_a_scenario_s_task_result_columns_are_merged_into_each_run():
    rec = EvalRecord()
    rec.add(0, [trial("t", 1.0, seed=5, db_match=True, ended="user_stop"),
                trial("t", 0.0, sample=1, seed=6, db_match=False, ended="max_turns")], WithColumns())
    runs = rec.summary()["tasks"][0]["runs"]
    assert [(r["db_match"], r["ended"]) for r in runs] == [(True, "user_stop"), (False, "max_turns")]
    assert [r["seed"] for r in runs] == [5, 6]


def test_a_scenario_without_task_result_adds_no_columns():
    (row,) = record({"t": [1.0]}, Plain()).summary()["tasks"]
    assert set(row["runs"][0]) == {"step", "trial", "seed", "reward", "status"}


# -- logprob_mismatch -----------------------------------------------------------------------------------
def k3(train: float, rollout: float) -> float:
    r = rollout - train
    return math.exp(r) - r - 1


def mixed_trajectory(task_id: str = "t", sample: int = 0) -> Trajectory:
    """Response: 2 model tokens, 2 environment tokens, 1 model token (positions 0..4)."""
    traj = Trajectory(prompt_ids=[9], task_id=task_id, metadata={"sample": sample})
    traj.append_model_tokens([1, 2], [-0.5, -1.0])
    traj.append_env_tokens([3, 4])
    traj.append_model_tokens([5], [-2.0])
    return traj


def test_only_trainable_tokens_count_and_the_gap_is_mean_max_and_k3_kl():
    traj = mixed_trajectory()
    trainer = [-0.6, -1.0, -50.0, -50.0, -1.5]  # huge gaps on environment tokens must not count
    stats = logprob_mismatch([traj], [trainer])
    pairs = [(-0.6, -0.5), (-1.0, -1.0), (-1.5, -2.0)]  # (train, rollout) of the 3 model tokens
    assert stats["trainable_tokens"] == 3
    assert stats["logprob_abs_diff_mean"] == pytest.approx((0.1 + 0.0 + 0.5) / 3)
    assert stats["logprob_abs_diff_max"] == pytest.approx(0.5)
    assert stats["kl"] == pytest.approx(sum(k3(t, r) for t, r in pairs) / 3)
    assert stats["logprob_worst_token"] == {"task_id": "t", "sample": 0, "response_position": 4,
                                            "abs_diff": pytest.approx(0.5), "train_logprob": -1.5,
                                            "rollout_logprob": -2.0}


def test_k3_takes_r_as_rollout_minus_train_so_the_sign_of_the_gap_matters():
    up, down = Trajectory(prompt_ids=[1]), Trajectory(prompt_ids=[1])
    up.append_model_tokens([1], [-2.0])
    down.append_model_tokens([1], [-1.0])
    # trainer -1 vs rollout -2: r = -1, k3 = e^-1; trainer -2 vs rollout -1: r = 1, k3 = e - 2
    assert logprob_mismatch([up], [[-1.0]])["kl"] == pytest.approx(math.exp(-1))
    assert logprob_mismatch([down], [[-2.0]])["kl"] == pytest.approx(math.e - 2)


def test_identical_log_probs_give_zero_gap_and_zero_kl():
    traj = mixed_trajectory()
    stats = logprob_mismatch([traj], [list(traj.rollout_logprobs)])
    assert (stats["logprob_abs_diff_mean"], stats["logprob_abs_diff_max"], stats["kl"]) == (0.0, 0.0, 0.0)
    assert stats["trainable_tokens"] == 3


def test_the_worst_token_is_located_across_trajectories_by_task_sample_and_position():
    first, second = mixed_trajectory("a", sample=0), mixed_trajectory("b", sample=3)
    stats = logprob_mismatch([first, second], [[-0.5, -1.0, 0.0, 0.0, -2.0], [-0.5, -1.7, 0.0, 0.0, -2.1]])
    assert stats["trainable_tokens"] == 6
    assert stats["logprob_abs_diff_mean"] == pytest.approx((0.7 + 0.1) / 6)
    assert stats["logprob_worst_token"]["task_id"] == "b"
    assert stats["logprob_worst_token"]["sample"] == 3
    assert stats["logprob_worst_token"]["response_position"] == 1
    assert stats["logprob_worst_token"]["train_logprob"] == -1.7


def test_no_trainable_tokens_gives_zeros_and_no_worst_token():
    env_only = Trajectory(prompt_ids=[1])
    env_only.append_env_tokens([4, 5, 6])
    excluded = mixed_trajectory()
    excluded.exclude_from_training("prefix break")
    zeros = {"logprob_abs_diff_mean": 0.0, "logprob_abs_diff_max": 0.0, "kl": 0.0, "logprob_worst_token": None,
             "trainable_tokens": 0}
    assert logprob_mismatch([env_only, excluded], [[-3.0, -3.0, -3.0], [-9.0] * 5]) == zeros
    assert logprob_mismatch([], []) == zeros
