"""Packing trajectories into tensors, and evening out row counts for ranks that run every forward together."""

from __future__ import annotations

import torch

from agentbench_npu.training.batch import even_rows, pack
from agentbench_npu.types import Trajectory

CPU = torch.device("cpu")


def _traj(prompt: list[int], response: list[int], routes: bool = False) -> Trajectory:
    t = Trajectory(prompt_ids=prompt)
    n = len(prompt) + len(response) - 1
    t.append_model_tokens(response, [-0.5] * len(response),
                          routed_experts=torch.ones((n, 2, 1), dtype=torch.int32) if routes else None)
    return t


def test_pack_right_pads_and_marks_the_response_positions():
    batch = pack([_traj([1, 2], [3, 4]), _traj([1], [5])], [1.0, -1.0], pad_id=0, device=CPU)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [1, 5, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch.rollout_logprobs[0].tolist() == [0.0, -0.5, -0.5]


def test_even_rows_adds_rows_with_nothing_to_train_and_no_route():
    batch = pack([_traj([1, 2], [3, 4], routes=True)], [1.0], pad_id=9, device=CPU)
    grown = even_rows(batch, 3, pad_id=9)
    assert grown.input_ids.shape == (3, 4) and grown.input_ids[1:].eq(9).all() and grown.targets[1:].eq(9).all()
    for name in ("attention_mask", "loss_mask", "response_mask", "rollout_logprobs", "advantages"):
        assert getattr(grown, name)[1:].eq(0).all(), name
    assert grown.routes[1:].eq(-1).all() and not grown.route_mask[1:].any()
    assert torch.equal(grown.input_ids[:1], batch.input_ids) and torch.equal(grown.routes[:1], batch.routes)
    assert even_rows(batch, 1, pad_id=9) is batch  # already as many rows: unchanged
