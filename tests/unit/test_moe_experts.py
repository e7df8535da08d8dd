"""Expert weights between the checkpoint's per-expert names and transformers' fused tensors (models/experts.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from agentbench_npu.models.experts import fuse_experts, split_experts, transformers_weight_names
from agentbench_npu.models.loading import load_causal_lm, resolve_model_dir


@pytest.fixture(scope="module")
def tiny_moe():
    path = resolve_model_dir("tiny-moe")
    return load_causal_lm(path), load_file(str(path / "model.safetensors"))


def test_the_checkpoints_experts_fused_are_the_tensors_transformers_holds(tiny_moe):
    model, saved = tiny_moe
    held = dict(model.named_parameters())
    fused = dict(fuse_experts(saved.items(), transformers_weight_names(model.config)))
    assert set(fused) == set(held)
    for name, tensor in held.items():
        assert torch.equal(fused[name], tensor.detach()), name


def test_splitting_gives_the_checkpoint_back_bit_for_bit(tiny_moe):
    model, saved = tiny_moe
    back = dict(split_experts(model.named_parameters()))
    assert set(back) == set(saved)
    assert all(torch.equal(back[k].detach(), v) for k, v in saved.items())


def test_experts_a_model_holds_apart_and_dense_tensors_pass_through_in_order():
    named = [("a.weight", torch.ones(2)), ("model.layers.0.mlp.experts.0.down_proj.weight", torch.zeros(3, 2))]
    assert [n for n, _ in fuse_experts(named, held={"a.weight"})] == [n for n, _ in named]


def test_a_layer_missing_an_experts_projection_is_named():
    named = [(f"model.layers.0.mlp.experts.{e}.{p}.weight", torch.zeros(2, 2))
             for e in range(2) for p in ("gate_proj", "up_proj", "down_proj")][:-2]  # expert 1 has no up, no down
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts: the per-expert tensors are incomplete"):
        fuse_experts(named, held={"model.layers.0.mlp.experts.down_proj"})
