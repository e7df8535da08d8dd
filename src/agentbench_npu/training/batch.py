"""Trajectories as tensors: right-padded token ids with, per predicting position, the response bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from ..models.moe import RoutingError
from ..types import Trajectory


@dataclass
class PackedBatch:
    """Right-padded token ids and, for each predicting position, the response-token bookkeeping."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L-1] token predicted at each position
    response_mask: torch.Tensor  # [B, L-1] 1 where the target is a response token
    loss_mask: torch.Tensor  # [B, L-1] 1 where the target is trainable
    rollout_logprobs: torch.Tensor  # [B, L-1]
    advantages: torch.Tensor  # [B] per trajectory
    routes: torch.Tensor | None = None  # [B, L, num_layers, top_k] the engine's recorded experts (MoE)
    route_mask: torch.Tensor | None = None  # [B, L] True where a position has a recorded route


def pack(trajs: Sequence[Trajectory], advantages: Sequence[float], pad_id: int, device: torch.device) -> PackedBatch:
    width = max(len(t.tokens) for t in trajs)
    b = len(trajs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp = torch.zeros((b, width - 1))
    loss = torch.zeros((b, width - 1))
    rollout = torch.zeros((b, width - 1))
    routes = route_mask = None
    recorded = [t.routed_experts for t in trajs if t.routed_experts is not None]
    if recorded:
        routes = torch.full((b, width, *recorded[0].shape[1:]), -1, dtype=torch.int32)
        route_mask = torch.zeros((b, width), dtype=torch.bool)
    for i, t in enumerate(trajs):
        n, p, r = len(t.tokens), len(t.prompt_ids), t.response_length
        if routes is not None and t.routed_experts is not None:
            k = t.routed_experts.shape[0]
            if k > n - 1 or tuple(t.routed_experts.shape[1:]) != tuple(routes.shape[2:]):
                raise RoutingError(f"task {t.task_id}: recorded routes {tuple(t.routed_experts.shape)} do not fit "
                                   f"{n} tokens of a batch routed as {tuple(routes.shape[2:])}")
            routes[i, :k] = t.routed_experts
            route_mask[i, :k] = True
        ids[i, :n] = torch.tensor(t.tokens)
        attn[i, :n] = 1
        # position p-1 predicts the first response token
        resp[i, p - 1:p - 1 + r] = 1
        loss[i, p - 1:p - 1 + r] = torch.tensor(t.loss_mask, dtype=torch.float32)
        rollout[i, p - 1:p - 1 + r] = torch.tensor(t.rollout_logprobs, dtype=torch.float32)
    return PackedBatch(
        input_ids=ids.to(device), attention_mask=attn.to(device), targets=ids[:, 1:].to(device),
        response_mask=resp.to(device), loss_mask=loss.to(device), rollout_logprobs=rollout.to(device),
        advantages=torch.tensor(list(advantages), dtype=torch.float32, device=device),
        routes=routes, route_mask=route_mask,
    )


def rows_of(batch: PackedBatch, rows: slice) -> PackedBatch:
    """The rows `rows` of every field."""
    return PackedBatch(*(None if getattr(batch, f) is None else getattr(batch, f)[rows]
                         for f in PackedBatch.__dataclass_fields__))


def even_rows(batch: PackedBatch, rows: int, pad_id: int) -> PackedBatch:
    """`batch` grown to `rows` rows with empty ones (pad tokens, nothing to train on, no route recorded): what
    ranks that must run every forward together (Megatron's expert parallelism) use to agree on a row count."""
    extra = rows - batch.input_ids.shape[0]
    if extra <= 0:
        return batch

    def grown(name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        fill = pad_id if name in ("input_ids", "targets") else (-1 if name == "routes" else 0)
        blank = torch.full((extra, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
        return torch.cat([tensor, blank])

    return PackedBatch(**{f.name: grown(f.name, getattr(batch, f.name)) for f in fields(PackedBatch)})
