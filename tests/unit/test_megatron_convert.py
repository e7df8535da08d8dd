"""The Megatron backend's accelerator-free half: HF ⇄ Megatron-core weight names and layouts, the model config,
the parallel sizes. (Megatron kernels need an accelerator; the live check is tests/device/.)"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from agentbench_npu.errors import ConfigError, MissingExtraError
from agentbench_npu.models.loading import resolve_model_dir
from agentbench_npu.training.megatron import (Layout, Parallel, hf_to_megatron, layout_from_hf, megatron_to_hf,
                                              model_options, require_megatron, transformer_config)

# Published config.json values (Hugging Face model cards) of the models the real recipes target
QWEN3_4B = {"model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000, "max_position_embeddings": 40960,
            "tie_word_embeddings": True}
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                 "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
                 "router_aux_loss_coef": 0.001, "rope_theta": 1000000, "tie_word_embeddings": False}
QWEN25_3B = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def random_qwen2_state(layout: Layout, hidden: int = 16, ffn: int = 24, vocab: int = 40) -> dict[str, torch.Tensor]:
    """A Qwen2-shaped HF state dict (qkv bias, untied head) of random numbers."""
    g = torch.Generator().manual_seed(0)
    hd, q, kv = layout.head_dim, layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
             "model.norm.weight": torch.randn(hidden, generator=g), "lm_head.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layout.num_layers):
        p = f"model.layers.{i}."
        shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
                  "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
                  "self_attn.v_proj.weight": (kv, hidden), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                  "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.weight": (hidden, q),
                  "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
                  "mlp.down_proj.weight": (hidden, ffn)}
        state.update({p + n: torch.randn(*s, generator=g) for n, s in shapes.items()})
    assert hd
    return state


def hf_state(name: str) -> tuple[dict[str, torch.Tensor], Layout]:
    """A tiny model's checkpoint as saved (per-expert names, as real checkpoints have), and its layout."""
    path = resolve_model_dir(name)
    return load_file(str(path / "model.safetensors")), layout_from_hf(json.loads((path / "config.json").read_text()))


@pytest.mark.parametrize("name, tp, pp, ep", [("tiny", 1, 1, 1), ("tiny", 2, 2, 1), ("tiny-moe", 2, 1, 2),
                                               ("tiny-moe", 1, 2, 4)])
def test_a_tiny_model_survives_the_round_trip_through_megatron_shards_bit_for_bit(name, tp, pp, ep):
    state, layout = hf_state(name)
    shards = hf_to_megatron(state, layout, tp=tp, pp=pp, ep=ep)
    assert set(shards) == {(p, t, e) for p in range(pp) for t in range(tp) for e in range(ep)}
    back = megatron_to_hf(shards, layout)
    assert set(back) == set(state)
    for n, tensor in state.items():
        assert torch.equal(back[n], tensor), n
    # a loading rank builds its own shard alone, the same as its part of the whole
    last = (pp - 1, tp - 1, ep - 1)
    alone = hf_to_megatron(state, layout, tp=tp, pp=pp, ep=ep, only=last)
    assert list(alone) == [last] and alone[last].keys() == shards[last].keys()
    assert all(torch.equal(alone[last][k], v) for k, v in shards[last].items())


def test_a_qwen2_layout_with_qkv_bias_and_an_untied_head_round_trips():
    layout = Layout(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, qkv_bias=True)
    state = random_qwen2_state(layout)
    back = megatron_to_hf(hf_to_megatron(state, layout, tp=2), layout)
    assert set(back) == set(state) and all(torch.equal(back[n], t) for n, t in state.items())


def test_megatron_interleaves_q_k_v_per_query_group_and_ranks_hold_consecutive_groups():
    # 4 query heads in 2 groups, head_dim 1: rows name themselves (q0 q1 q2 q3 | k0 k1 | v0 v1)
    layout = Layout(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=1, qk_norm=True, tied_embeddings=True)
    q, k, v = torch.tensor([[0.], [1.], [2.], [3.]]), torch.tensor([[10.], [11.]]), torch.tensor([[20.], [21.]])
    state = {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
             "model.layers.0.self_attn.v_proj.weight": v}
    for n, shape in (("input_layernorm.weight", (1,)), ("post_attention_layernorm.weight", (1,)),
                     ("self_attn.q_norm.weight", (1,)), ("self_attn.k_norm.weight", (1,)),
                     ("self_attn.o_proj.weight", (1, 4)), ("mlp.gate_proj.weight", (2, 1)),
                     ("mlp.up_proj.weight", (2, 1)), ("mlp.down_proj.weight", (1, 2))):
        state[f"model.layers.0.{n}"] = torch.zeros(shape)
    state["model.layers.0.mlp.gate_proj.weight"] = torch.tensor([[100.], [101.]])
    state["model.layers.0.mlp.up_proj.weight"] = torch.tensor([[200.], [201.]])
    state["model.embed_tokens.weight"], state["model.norm.weight"] = torch.zeros(2, 1), torch.zeros(1)
    one = hf_to_megatron(state, layout)[(0, 0, 0)]
    assert one["decoder.layers.0.self_attention.linear_qkv.weight"].flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert one["decoder.layers.0.mlp.linear_fc1.weight"].flatten().tolist() == [100, 101, 200, 201]  # [gate; up]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in one  # TE's fused input norm
    two = hf_to_megatron(state, layout, tp=2)
    assert two[(0, 0, 0)]["decoder.layers.0.self_attention.linear_qkv.weight"].flatten().tolist() == [0, 1, 10, 20]
    assert two[(0, 1, 0)]["decoder.layers.0.self_attention.linear_qkv.weight"].flatten().tolist() == [2, 3, 11, 21]
    assert two[(0, 1, 0)]["decoder.layers.0.mlp.linear_fc1.weight"].flatten().tolist() == [101, 201]


def test_moe_layers_use_the_router_and_per_rank_local_expert_numbers():
    state, layout = hf_state("tiny-moe")
    shards = hf_to_megatron(state, layout, ep=2)
    rank1 = shards[(0, 0, 1)]
    assert torch.equal(rank1["decoder.layers.0.mlp.router.weight"], state["model.layers.0.mlp.gate.weight"])
    local0 = rank1["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"]
    assert torch.equal(local0, state["model.layers.0.mlp.experts.4.down_proj.weight"])  # 8 experts / 2 ranks
    assert "decoder.layers.0.mlp.experts.local_experts.4.linear_fc2.weight" not in rank1
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in rank1


def test_a_missing_shard_tensor_is_named():
    state, layout = hf_state("tiny")
    shards = hf_to_megatron(state, layout, tp=2)
    del shards[(0, 1, 0)]["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(KeyError, match=r"\(pp=0, ep=0\) has no tensor 'decoder.layers.1.mlp.linear_fc2.weight'"):
        megatron_to_hf(shards, layout)


def test_the_megatron_config_of_qwen3_4b_and_qwen3_30b_a3b():
    dense = transformer_config(QWEN3_4B, Parallel(tp=2, dp=4))
    assert (dense["num_layers"], dense["hidden_size"], dense["ffn_hidden_size"]) == (36, 2560, 9728)
    assert (dense["num_attention_heads"], dense["num_query_groups"], dense["kv_channels"]) == (32, 8, 128)
    assert dense["qk_layernorm"] and not dense["add_qkv_bias"] and dense["sequence_parallel"] and dense["bf16"]
    assert "num_moe_experts" not in dense
    assert model_options(QWEN3_4B) == {"vocab_size": 151936, "max_sequence_length": 40960,
                                       "position_embedding_type": "rope", "rotary_base": 1000000,
                                       "share_embeddings_and_output_weights": True}
    moe = transformer_config(QWEN3_30B_A3B, Parallel(tp=4, ep=8, dp=4))
    assert (moe["num_moe_experts"], moe["moe_router_topk"], moe["moe_ffn_hidden_size"]) == (128, 8, 768)
    assert moe["moe_router_pre_softmax"] is False and moe["expert_model_parallel_size"] == 8
    assert transformer_config(QWEN25_3B, Parallel(tp=2))["add_qkv_bias"] is True


def test_parallel_sizes_that_do_not_fit_the_model_or_the_devices_are_refused():
    with pytest.raises(ConfigError, match=r"tensor parallel size 4 must divide .* key/value heads \(2\)"):
        transformer_config(QWEN25_3B, Parallel(tp=4))
    with pytest.raises(ConfigError, match=r"expert parallel size 3 must divide the experts \(128\)"):
        transformer_config(QWEN3_30B_A3B, Parallel(ep=3, dp=3))
    assert Parallel.for_world(16, tp=2, pp=2) == Parallel(tp=2, pp=2, ep=1, dp=4)
    with pytest.raises(ConfigError, match="2 x 3 must divide 16"):
        Parallel.for_world(16, tp=2, pp=3)
    # experts are split over TP too (Megatron's default), so EP divides the data-parallel size
    assert Parallel.for_world(16, tp=2, ep=8) == Parallel(tp=2, ep=8, dp=8)
    with pytest.raises(ConfigError, match=r"expert parallel 8 must divide data parallel 4"):
        Parallel.for_world(16, tp=4, ep=8)


def test_rope_base_is_read_where_transformers_5_writes_it():
    v5 = {**QWEN3_4B, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    del v5["rope_theta"]
    assert model_options(v5)["rotary_base"] == 1000000


def test_without_megatron_core_the_error_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("megatron") else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"agentbench-npu\[megatron\]"):
        require_megatron("cuda")
