"""GRPO pieces: group-normalised advantages, the k3 KL estimator, the PPO-clip loss with asymmetric clipping."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from agentbench_npu.training.losses import group_advantages, k3, ppo_clip_loss


# -- group advantages ------------------------------------------------------------------------------
def by_group(values, groups):
    out: dict[int, list[float]] = {}
    for v, g in zip(values, groups):
        out.setdefault(g, []).append(v)
    return out


def test_a_group_whose_rewards_are_all_equal_gets_zero_advantage():
    assert group_advantages([1.0, 1.0, 1.0, 0.0, 0.0], [0, 0, 0, 1, 1]) == [0.0] * 5


def test_advantages_are_zero_mean_and_unit_std_within_each_group():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.5]
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    adv = group_advantages(rewards, groups)
    for values in by_group(adv, groups).values():
        assert statistics.fmean(values) == pytest.approx(0.0, abs=1e-12)
        assert statistics.stdev(values) == pytest.approx(1.0, abs=1e-5)


def test_an_advantage_is_the_reward_minus_its_group_mean_over_the_group_std():
    adv = group_advantages([1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0])
    mean, std = 0.25, statistics.stdev([1.0, 0.0, 0.0, 0.0])
    assert adv == pytest.approx([(r - mean) / (std + 1e-6) for r in [1.0, 0.0, 0.0, 0.0]])


def test_groups_are_normalised_independently_even_when_interleaved():
    rewards = [1.0, 10.0, 0.0, 20.0]
    groups = [7, 3, 7, 3]
    adv = group_advantages(rewards, groups)
    assert adv[0] == pytest.approx(-adv[2]) and adv[0] > 0
    assert adv[1] == pytest.approx(-adv[3]) and adv[3] > 0
    # the scale of a group's rewards does not leak into another group's advantages
    assert adv[0] == pytest.approx(adv[3], abs=1e-5)  # equal up to the eps in the denominator


def test_without_std_normalisation_advantages_are_only_centred():
    adv = group_advantages([3.0, 1.0, 5.0, 5.0], [0, 0, 1, 1], normalise_std=False)
    assert adv == pytest.approx([1.0, -1.0, 0.0, 0.0])


def test_a_group_of_one_gets_zero_advantage():
    assert group_advantages([0.7, 0.2, 0.4], [0, 1, 1])[0] == 0.0


def test_advantages_come_back_in_input_order_as_floats():
    adv = group_advantages([0.0, 1.0], [5, 5])
    assert all(type(a) is float for a in adv) and adv[0] < 0 < adv[1]


# -- k3 --------------------------------------------------------------------------------------------
def test_k3_is_zero_where_the_policies_agree():
    logp = torch.tensor([-0.1, -2.0, -7.5])
    assert torch.equal(k3(logp, logp.clone()), torch.zeros(3))


def test_k3_is_non_negative_for_any_difference():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(10_000, generator=g) * 10, -torch.rand(10_000, generator=g) * 10
    assert (k3(logp, ref) >= 0).all()


def test_k3_is_non_negative_for_tiny_float32_differences():
    # near r = 0 the value is ~r^2/2, far below float32 resolution of its terms: rounding must not go negative
    logp = torch.full((2001,), -1.0)
    ref = logp + torch.linspace(-1e-3, 1e-3, 2001)
    assert (k3(logp, ref) >= 0).all()


def test_k3_is_exp_r_minus_r_minus_one_with_r_the_log_ratio_ref_over_policy():
    logp, ref = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-2.0, -1.0], dtype=torch.float64)
    expected = [math.exp(-1.0) + 1.0 - 1.0, math.exp(1.0) - 1.0 - 1.0]
    assert k3(logp, ref).tolist() == pytest.approx(expected, rel=1e-12)


def test_k3_grows_like_half_the_squared_log_ratio_near_zero():
    r = 1e-3
    value = k3(torch.tensor([0.0], dtype=torch.float64), torch.tensor([r], dtype=torch.float64)).item()
    assert value == pytest.approx(r * r / 2, rel=1e-3)


# -- PPO-clip --------------------------------------------------------------------------------------
EPS_LOW, EPS_HIGH = 0.2, 0.28


def clip_case(ratio: float, advantage: float):
    """The loss, the clip flag and d(loss)/d(logp) for one token at the given ratio and advantage."""
    logp = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, dtype=torch.float64)
    loss, clipped = ppo_clip_loss(logp, old, torch.tensor([advantage], dtype=torch.float64), EPS_LOW, EPS_HIGH)
    loss.sum().backward()
    return loss.item(), clipped.item(), logp.grad.item()


def test_at_ratio_one_the_loss_is_minus_the_advantage_and_nothing_is_clipped():
    loss, clipped, grad = clip_case(1.0, 2.0)
    assert loss == pytest.approx(-2.0) and clipped == 0.0
    assert grad == pytest.approx(-2.0)  # d(-A * exp(logp - old))/d logp at ratio 1


def test_positive_advantage_is_clipped_above_one_plus_eps_high_and_stops_the_gradient():
    loss, clipped, grad = clip_case(1.5, 1.0)
    assert loss == pytest.approx(-(1 + EPS_HIGH)) and clipped == 1.0 and grad == 0.0


def test_positive_advantage_is_not_clipped_below_one_minus_eps_low():
    # the pessimistic bound: a token made less likely keeps its (unclipped) gradient
    loss, clipped, grad = clip_case(0.5, 1.0)
    assert loss == pytest.approx(-0.5) and clipped == 0.0 and grad != 0.0


def test_negative_advantage_is_clipped_below_one_minus_eps_low_and_stops_the_gradient():
    loss, clipped, grad = clip_case(0.5, -1.0)
    assert loss == pytest.approx(1 - EPS_LOW) and clipped == 1.0 and grad == 0.0


def test_negative_advantage_is_not_clipped_above_one_plus_eps_high():
    loss, clipped, grad = clip_case(1.5, -1.0)
    assert loss == pytest.approx(1.5) and clipped == 0.0 and grad != 0.0


def test_clipping_is_asymmetric_with_separate_low_and_high_eps():
    # 1.25 is inside (1 - 0.2, 1 + 0.28): not clipped although it is outside 1 +/- 0.2
    assert clip_case(1.25, 1.0)[1] == 0.0
    # 0.78 is below 1 - 0.2: clipped for a negative advantage
    assert clip_case(0.78, -1.0)[1] == 1.0
    assert clip_case(0.78, -1.0)[0] == pytest.approx(1 - EPS_LOW)


def test_the_loss_is_per_token_and_zero_advantage_gives_zero_loss():
    logp = torch.log(torch.tensor([0.5, 1.0, 2.0]))
    loss, clipped = ppo_clip_loss(logp, torch.zeros(3), torch.zeros(3), EPS_LOW, EPS_HIGH)
    assert loss.shape == (3,) and torch.equal(loss, torch.zeros(3)) and torch.equal(clipped, torch.zeros(3))
