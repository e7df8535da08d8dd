"""Megatron-core GPT weights ⇄ Hugging Face names, for Qwen2/Qwen2.5, Qwen3 and Qwen3-MoE.

The Megatron trainer holds each tensor sharded by tensor (TP), pipeline (PP) and expert (EP) parallelism under
Megatron-core's names; the engines (ours, SGLang) load Hugging Face names. A weight sync gathers the shards and
renames them here; loading a Hugging Face checkpoint into Megatron goes the other way.

Layouts, as Megatron-core lays them out:
- `linear_qkv`: per query group g, the group's query heads, then its key head, then its value head, stacked along
  dim 0 ([groups x (heads_per_group + 2) x head_dim, hidden]); TP ranks hold consecutive groups.
- `linear_fc1` (SwiGLU): [gate; up] along dim 0; each TP rank holds [its gate rows; its up rows].
- column-parallel (qkv, fc1, word embeddings, output layer) split along dim 0, row-parallel (linear_proj, fc2)
  along dim 1; norms, q/k layernorms and the router are replicated.
- with Transformer Engine's fused norms the input norm is `linear_qkv.layer_norm_weight` and the dense MLP's is
  `linear_fc1.layer_norm_weight`; MoE layers keep `pre_mlp_layernorm`. Experts are
  `mlp.experts.local_experts.{e}.linear_fc{1,2}.weight` (sequential) with EP ranks holding consecutive experts.
- PP stages number their layers from 0; stage s holds layers [s x L/pp, (s+1) x L/pp).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

Shards = dict[tuple[int, int, int], dict[str, torch.Tensor]]  # (pp, tp, ep) rank → that rank's state dict


@dataclass(frozen=True)
class Layout:
    """What the name mapping needs to know about the model."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int = 0  # 0 = dense
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k
    qkv_bias: bool = False  # Qwen2 / Qwen2.5
    tied_embeddings: bool = False
    fused_norms: bool = True  # Transformer Engine's layer specs

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def layout_from_hf(config: Mapping[str, Any]) -> Layout:
    """A Layout from a Hugging Face config.json (a VL model's text_config is used for its language model)."""
    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    model_type = str(text.get("model_type") or config.get("model_type", ""))
    return Layout(
        num_layers=int(text["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
        num_experts=int(text.get("num_experts") or text.get("num_local_experts") or 0),
        qk_norm=model_type.startswith("qwen3"), qkv_bias=model_type.startswith("qwen2"),
        tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    )


# -- one layer's names ---------------------------------------------------------------------------------------
def _layer_names(layout: Layout, moe: bool) -> dict[str, str]:
    """Megatron suffix → HF suffix for one decoder layer's tensors that map one to one."""
    names = {"self_attention.linear_proj.weight": "self_attn.o_proj.weight"}
    names["self_attention.linear_qkv.layer_norm_weight" if layout.fused_norms else "input_layernorm.weight"] = \
        "input_layernorm.weight"
    if layout.qk_norm:
        names["self_attention.q_layernorm.weight"] = "self_attn.q_norm.weight"
        names["self_attention.k_layernorm.weight"] = "self_attn.k_norm.weight"
    if moe:
        names["pre_mlp_layernorm.weight"] = "post_attention_layernorm.weight"
        names["mlp.router.weight"] = "mlp.gate.weight"
    else:
        names["mlp.linear_fc1.layer_norm_weight" if layout.fused_norms else "pre_mlp_layernorm.weight"] = \
            "post_attention_layernorm.weight"
        names["mlp.linear_fc2.weight"] = "mlp.down_proj.weight"
    return names


ROW_PARALLEL = ("self_attention.linear_proj.weight", "linear_fc2.weight")


# -- HF → Megatron ------------------------------------------------------------------------------------------
def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    groups, hpg = layout.num_kv_heads, layout.heads_per_group
    tail = q.shape[1:]
    q = q.reshape(groups, hpg * layout.head_dim, *tail)
    k = k.reshape(groups, layout.head_dim, *tail)
    v = v.reshape(groups, layout.head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv_to_hf(qkv: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hpg, hd = layout.num_kv_heads, layout.heads_per_group, layout.head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (hpg + 2) * hd, *tail)
    q, k, v = grouped.split([hpg * hd, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_to_megatron(state: Mapping[str, torch.Tensor], layout: Layout, *, tp: int = 1, pp: int = 1,
                   ep: int = 1, only: tuple[int, int, int] | None = None) -> Shards:
    """A full HF state dict as every (pp, tp, ep) rank's Megatron state dict, or as rank `only`'s alone (what a
    rank loading a checkpoint needs: one shard's copies, not every rank's)."""
    check_parallelism(layout, tp=tp, pp=pp, ep=ep)
    per_stage = layout.num_layers // pp
    shards: Shards = {(p, t, e): {} for p in range(pp) for t in range(tp) for e in range(ep)
                      if only is None or (p, t, e) == only}

    def put(stage: int, name: str, tensor: torch.Tensor, split_dim: int | None) -> None:
        """A tensor outside the experts: split over TP (or replicated), the same on every EP rank."""
        pieces = tensor.chunk(tp, dim=split_dim) if split_dim is not None else [tensor] * tp
        for (p, t, _), out in shards.items():
            if p == stage:
                out[name] = pieces[t].clone()

    for p in range(pp):
        for local in range(per_stage):
            i = p * per_stage + local
            hf, mg = f"model.layers.{i}.", f"decoder.layers.{local}."
            moe = layout.num_experts > 0
            for m_suffix, h_suffix in _layer_names(layout, moe).items():
                dim = 1 if m_suffix.endswith(ROW_PARALLEL) else (None if "norm" in m_suffix or "router" in m_suffix
                                                                 else 0)
                put(p, mg + m_suffix, state[hf + h_suffix], dim)
            for kind in ("weight", "bias") if layout.qkv_bias else ("weight",):
                q, k, v = (state[f"{hf}self_attn.{x}_proj.{kind}"] for x in "qkv")
                # each TP rank takes consecutive query groups: split per group, then interleave
                per_rank = [_qkv_to_megatron(*parts, layout=_tp_layout(layout, tp))
                            for parts in zip(q.chunk(tp), k.chunk(tp), v.chunk(tp))]
                for (pp_, t, _), out in shards.items():
                    if pp_ == p:
                        out[f"{mg}self_attention.linear_qkv.{kind}"] = per_rank[t].clone()
            if moe:
                per_ep = layout.num_experts // ep
                for (pp_, t, e), out in shards.items():
                    if pp_ != p:
                        continue
                    for local_e in range(per_ep):
                        src = f"{hf}mlp.experts.{e * per_ep + local_e}."
                        dst = f"{mg}mlp.experts.local_experts.{local_e}."
                        out[dst + "linear_fc1.weight"] = _fc1_shard(state[src + "gate_proj.weight"],
                                                                    state[src + "up_proj.weight"], tp, t)
                        out[dst + "linear_fc2.weight"] = state[src + "down_proj.weight"].chunk(tp, dim=1)[t].clone()
            else:
                for (pp_, t, _), out in shards.items():
                    if pp_ == p:
                        out[f"{mg}mlp.linear_fc1.weight"] = _fc1_shard(state[f"{hf}mlp.gate_proj.weight"],
                                                                       state[f"{hf}mlp.up_proj.weight"], tp, t)
    put(0, "embedding.word_embeddings.weight", state["model.embed_tokens.weight"], 0)
    put(pp - 1, "decoder.final_layernorm.weight", state["model.norm.weight"], None)
    if not layout.tied_embeddings:
        put(pp - 1, "output_layer.weight", state["lm_head.weight"], 0)
    return shards


def _tp_layout(layout: Layout, tp: int) -> Layout:
    """The layout one TP rank sees: its share of the heads and groups."""
    from dataclasses import replace

    return replace(layout, num_heads=layout.num_heads // tp, num_kv_heads=layout.num_kv_heads // tp)


def _fc1_shard(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]]).clone()


# -- Megatron → HF ------------------------------------------------------------------------------------------
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight")


def megatron_to_hf(shards: Shards, layout: Layout) -> dict[str, torch.Tensor]:
    """Every rank's Megatron state dict gathered into one HF state dict (the inverse of hf_to_megatron)."""
    pp = 1 + max(p for p, _, _ in shards)
    tp = 1 + max(t for _, t, _ in shards)
    ep = 1 + max(e for _, _, e in shards)
    check_parallelism(layout, tp=tp, pp=pp, ep=ep)
    per_stage, per_ep = layout.num_layers // pp, (layout.num_experts // ep if layout.num_experts else 0)
    moe = layout.num_experts > 0
    out: dict[str, torch.Tensor] = {}

    def tp_parts(p: int, name: str, e: int = 0) -> list[torch.Tensor]:
        try:
            return [shards[(p, t, e)][name] for t in range(tp)]
        except KeyError as exc:
            raise KeyError(f"Megatron rank (pp={p}, ep={e}) has no tensor '{name}'") from exc

    for p in range(pp):
        for local in range(per_stage):
            i = p * per_stage + local
            hf, mg = f"model.layers.{i}.", f"decoder.layers.{local}."
            for m_suffix, h_suffix in _layer_names(layout, moe).items():
                parts = tp_parts(p, mg + m_suffix)
                if "norm" in m_suffix or "router" in m_suffix:
                    out[hf + h_suffix] = parts[0]
                else:
                    out[hf + h_suffix] = torch.cat(parts, dim=1 if m_suffix.endswith(ROW_PARALLEL) else 0)
            for kind in ("weight", "bias") if layout.qkv_bias else ("weight",):
                split = [_qkv_to_hf(part, _tp_layout(layout, tp))
                         for part in tp_parts(p, f"{mg}self_attention.linear_qkv.{kind}")]
                for j, x in enumerate("qkv"):
                    out[f"{hf}self_attn.{x}_proj.{kind}"] = torch.cat([s[j] for s in split])
            if moe:
                for e in range(ep):
                    for local_e in range(per_ep):
                        src = f"{mg}mlp.experts.local_experts.{local_e}."
                        dst = f"{hf}mlp.experts.{e * per_ep + local_e}."
                        gate, up = _fc1_to_hf(tp_parts(p, src + "linear_fc1.weight", e))
                        out[dst + "gate_proj.weight"], out[dst + "up_proj.weight"] = gate, up
                        out[dst + "down_proj.weight"] = torch.cat(tp_parts(p, src + "linear_fc2.weight", e), dim=1)
            else:
                out[f"{hf}mlp.gate_proj.weight"], out[f"{hf}mlp.up_proj.weight"] = \
                    _fc1_to_hf(tp_parts(p, f"{mg}mlp.linear_fc1.weight"))
    out["model.embed_tokens.weight"] = torch.cat(tp_parts(0, "embedding.word_embeddings.weight"))
    out["model.norm.weight"] = tp_parts(pp - 1, "decoder.final_layernorm.weight")[0]
    if not layout.tied_embeddings:
        out["lm_head.weight"] = torch.cat(tp_parts(pp - 1, "output_layer.weight"))
    return out


def _fc1_to_hf(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    halves = [part.chunk(2) for part in parts]
    return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])


def check_parallelism(layout: Layout, *, tp: int, pp: int, ep: int) -> None:
    """TP must divide the heads and the query groups, PP the layers, EP the experts."""
    problems = []
    if layout.num_heads % tp or layout.num_kv_heads % tp:
        problems.append(f"tensor parallel size {tp} must divide the attention heads ({layout.num_heads}) and the "
                        f"key/value heads ({layout.num_kv_heads})")
    if layout.num_layers % pp:
        problems.append(f"pipeline parallel size {pp} must divide the layers ({layout.num_layers})")
    if ep > 1 and not layout.num_experts:
        problems.append(f"expert parallel size {ep} splits the experts of a mixture-of-experts model, and this one "
                        "is dense: use 1")
    elif ep > 1 and layout.num_experts % ep:
        problems.append(f"expert parallel size {ep} must divide the experts ({layout.num_experts})")
    if problems:
        raise ValueError("; ".join(problems))
