"""Trajectory invariants enforced at the append; SamplingParams validated where they are built."""

from __future__ import annotations

import math

import pytest

from agentbench_npu.types import SamplingParams, StepMetrics, Trajectory, TrajectoryError


def lengths(traj: Trajectory) -> tuple[int, int, int]:
    return len(traj.response_ids), len(traj.loss_mask), len(traj.rollout_logprobs)


# -- Trajectory ------------------------------------------------------------------------------------
def test_model_tokens_are_trainable_and_keep_their_rollout_logprobs():
    traj = Trajectory(prompt_ids=[1, 2])
    traj.append_model_tokens([5, 6], [-0.5, -1.25])
    assert traj.response_ids == [5, 6]
    assert traj.loss_mask == [1, 1]
    assert traj.rollout_logprobs == [-0.5, -1.25]


def test_environment_tokens_get_mask_zero_and_logprob_zero():
    traj = Trajectory(prompt_ids=[1])
    traj.append_env_tokens([7, 8, 9])
    assert traj.loss_mask == [0, 0, 0]
    assert traj.rollout_logprobs == [0.0, 0.0, 0.0]


def test_interleaved_appends_keep_all_per_token_lists_equal_in_length_and_in_order():
    traj = Trajectory(prompt_ids=[1, 2, 3])
    traj.append_model_tokens([10, 11], [-0.1, -0.2])
    traj.append_env_tokens([20])
    traj.append_model_tokens((12,), (-0.3,))
    assert lengths(traj) == (4, 4, 4)
    assert traj.response_ids == [10, 11, 20, 12]
    assert traj.loss_mask == [1, 1, 0, 1]
    assert traj.rollout_logprobs == [-0.1, -0.2, 0.0, -0.3]
    assert traj.tokens == [1, 2, 3, 10, 11, 20, 12]
    assert (traj.response_length, traj.num_trainable) == (4, 3)


def test_appended_values_are_stored_as_plain_python_numbers():
    import torch

    traj = Trajectory(prompt_ids=[])
    traj.append_model_tokens(torch.tensor([3, 4]).tolist(), torch.tensor([-0.5, -0.25]).tolist())
    traj.append_model_tokens([7], [-1])  # an int log-prob is stored as a float
    assert all(type(i) is int for i in traj.response_ids)
    assert all(type(lp) is float for lp in traj.rollout_logprobs)


def test_model_tokens_with_a_different_number_of_logprobs_are_refused():
    traj = Trajectory(prompt_ids=[1])
    with pytest.raises(TrajectoryError, match="2 model tokens came with 1 log-probs"):
        traj.append_model_tokens([5, 6], [-0.5])


@pytest.mark.parametrize("bad", [0.5, math.nan, math.inf, -math.inf])
def test_a_model_logprob_that_is_positive_or_not_finite_is_refused(bad):
    traj = Trajectory(prompt_ids=[1])
    with pytest.raises(TrajectoryError, match="is not a finite value <= 0"):
        traj.append_model_tokens([5, 6], [-0.1, bad])


def test_a_refused_append_leaves_the_trajectory_unchanged():
    traj = Trajectory(prompt_ids=[1])
    traj.append_model_tokens([5], [-0.1])
    with pytest.raises(TrajectoryError):
        traj.append_model_tokens([6, 7], [-0.2, math.nan])
    with pytest.raises(TrajectoryError):
        traj.append_model_tokens([6, 7], [-0.2])
    assert (traj.response_ids, traj.loss_mask, traj.rollout_logprobs) == ([5], [1], [-0.1])


def test_a_logprob_of_zero_or_a_rounding_hair_above_is_accepted():
    traj = Trajectory(prompt_ids=[1])
    traj.append_model_tokens([5, 6], [0.0, 1e-7])  # a certain token; float noise around log(1)
    assert traj.num_trainable == 2


def test_trajectory_errors_are_value_errors():
    assert issubclass(TrajectoryError, ValueError)


# -- SamplingParams --------------------------------------------------------------------------------
def test_default_sampling_is_untruncated_at_temperature_one():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, -1)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0, got -1"),
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": 0}, r"top_k must be -1 \(off\) or >= 1, got 0"),
    ({"top_k": -2}, r"top_k must be -1 \(off\) or >= 1, got -2"),
])
def test_invalid_sampling_params_are_refused_naming_the_field_and_range(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        SamplingParams(**kwargs)


def test_boundary_values_are_valid_sampling_params():
    SamplingParams(max_new_tokens=0, temperature=0.0, top_p=1.0, top_k=1)


def test_replace_gives_a_new_params_object_and_validates_it():
    p = SamplingParams(temperature=0.7, stop=("</answer>",))
    q = p.replace(max_new_tokens=8)
    assert (q.max_new_tokens, q.temperature, q.stop) == (8, 0.7, ("</answer>",))
    assert p.max_new_tokens == 32
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=2.0)


def test_sampling_params_are_immutable():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_step_metrics_flatten_their_extra_fields_into_the_report_row():
    m = StepMetrics(step=1, reward_mean=0.5, reward_std=0.1, loss=0.2, kl=0.0, entropy=1.0,
                    logprob_abs_diff_mean=1e-6, logprob_abs_diff_max=1e-5, rollout_seconds=1.0,
                    train_seconds=2.0, weight_sync_seconds=0.1, weights_checksum_match=True,
                    tokens_per_second=100.0, extra={"clip_fraction": 0.25})
    row = m.to_dict()
    assert row["clip_fraction"] == 0.25 and "extra" not in row and row["step"] == 1
