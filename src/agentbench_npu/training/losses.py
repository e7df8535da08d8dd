"""GRPO pieces: group-normalised advantages, the PPO-clip policy loss, KL estimators."""

from __future__ import annotations

from typing import Sequence

import torch


def group_advantages(rewards: Sequence[float], groups: Sequence[int], normalise_std: bool = True,
                     eps: float = 1e-6) -> list[float]:
    """(r - mean of its group) / (std of its group + eps); a group whose rewards are equal gets 0."""
    r = torch.tensor(rewards, dtype=torch.float64)
    g = torch.tensor(groups)
    adv = torch.zeros_like(r)
    for group in torch.unique(g):
        idx = g == group
        centred = r[idx] - r[idx].mean()
        if normalise_std and idx.sum() > 1:
            centred = centred / (r[idx].std(unbiased=True) + eps)
        adv[idx] = centred
    return adv.tolist()


def k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 per token, r = logp_ref − logp: exp(r) − r − 1 (≥ 0, 0 where they agree). Over tokens sampled
    from π it estimates KL(π ‖ π_ref) without bias; the runner's train/rollout mismatch score uses the
    r = logp_rollout − logp_train form peers report."""
    r = logp_ref - logp
    return torch.expm1(r) - r


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss (to minimise) and a 0/1 tensor of where clipping bit."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, (clipped > unclipped).float()
