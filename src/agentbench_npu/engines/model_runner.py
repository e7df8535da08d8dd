"""Forward passes for decoding: a lean Qwen3 path with a preallocated KV cache, and a generic HF path.

The engine owns its forward pass, as serving engines do: it reads the weights of the HF module it
holds (so weight updates are visible at once) but not its Python call stack, which dominates the cost
of small-batch decoding. The trainer uses the HF forward, so the log-prob gate compares two real
implementations. Architectures without a lean path fall back to the HF forward with a DynamicCache.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer key/value tensors [B, kv_heads, max_len, head_dim] plus which key slots are valid."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0


class ModelRunner:
    """Interface: prefill(ids, positions, key_valid) and decode(ids, positions, key_valid) → last logits."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def start(self, batch: int, max_len: int) -> Any:
        raise NotImplementedError

    def forward(self, state: Any, input_ids: torch.Tensor, positions: torch.Tensor,
                key_valid: torch.Tensor) -> torch.Tensor:
        """Run `input_ids` [B, T] at `positions` [B, T]; key_valid [B, L_total] marks non-pad keys.

        Returns float32 logits [B, V] of the last position.
        """
        raise NotImplementedError


class Qwen3Runner(ModelRunner):
    """Qwen3 dense decoder layers written out with functional ops over the module's own weights."""

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return (
            getattr(config, "model_type", None) == "qwen3"
            and not getattr(config, "use_sliding_window", False)
            and hasattr(model, "model") and hasattr(model.model, "rotary_emb")
        )

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.layers = model.model.layers
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb

    def start(self, batch: int, max_len: int) -> KVCache:
        # Weight references are taken per batch: updates copy into these same tensors in place.
        self._weights = [
            (
                layer.input_layernorm.weight,
                layer.self_attn.q_proj.weight, layer.self_attn.q_proj.bias,
                layer.self_attn.k_proj.weight, layer.self_attn.k_proj.bias,
                layer.self_attn.v_proj.weight, layer.self_attn.v_proj.bias,
                layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight,
                layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias,
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight,
            )
            for layer in self.layers
        ]
        p = next(self.model.parameters())
        return KVCache(len(self.layers), batch, self.kv_heads, max_len, self.head_dim, p.dtype, p.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        # as HF does for half precision: normalise in float32, cast back, then scale
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * weight

    def forward(self, state: KVCache, input_ids: torch.Tensor, positions: torch.Tensor,
                key_valid: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        start, end = state.length, state.length + t
        x = F.embedding(input_ids, self.model.model.embed_tokens.weight)
        cos, sin = self.model.model.rotary_emb(x, positions)
        # attend to valid keys at or before each query position; a query always sees itself so that
        # rows of left padding stay finite (their outputs are never used)
        keys = key_valid[:, None, None, :end]
        if t > 1:
            causal = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            eye = torch.zeros(t, end, dtype=torch.bool, device=x.device)
            eye[:, start:end] = torch.eye(t, dtype=torch.bool, device=x.device)
            mask = (keys & causal) | eye
        else:
            mask = keys
        gqa = self.kv_heads != self.heads
        for i, (ln1, wq, bq, wk, bk, wv, bv, qn, kn, wo, bo, ln2, wg, wu, wd) in enumerate(self._weights):
            h = self._norm(x, ln1)
            q = self._norm(F.linear(h, wq, bq).view(b, t, self.heads, self.head_dim), qn).transpose(1, 2)
            k = self._norm(F.linear(h, wk, bk).view(b, t, self.kv_heads, self.head_dim), kn).transpose(1, 2)
            v = F.linear(h, wv, bv).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            state.k[i][:, :, start:end] = k
            state.v[i][:, :, start:end] = v
            o = F.scaled_dot_product_attention(
                q, state.k[i][:, :, :end], state.v[i][:, :, :end], attn_mask=mask, enable_gqa=gqa,
            )
            x = x + F.linear(o.transpose(1, 2).reshape(b, t, -1), wo, bo)
            h = self._norm(x, ln2)
            x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        state.length = end
        h = self._norm(x[:, -1], self.model.model.norm.weight)
        return F.linear(h, self.model.lm_head.weight).float()


class HFRunner(ModelRunner):
    """Any HF causal LM, through its own forward and a DynamicCache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def start(self, batch: int, max_len: int) -> dict[str, Any]:
        from transformers import DynamicCache

        return {"cache": DynamicCache(config=self.model.config), "length": 0}

    def forward(self, state: dict[str, Any], input_ids: torch.Tensor, positions: torch.Tensor,
                key_valid: torch.Tensor) -> torch.Tensor:
        end = state["length"] + input_ids.shape[1]
        out = self.model(
            input_ids=input_ids, position_ids=positions, attention_mask=key_valid[:, :end].long(),
            use_cache=True, logits_to_keep=1, **{self._cache_kw: state["cache"]},
        )
        state["length"] = end
        return out.logits[:, -1].float()


def runner_for(model: torch.nn.Module, prefer_lean: bool = True) -> ModelRunner:
    if prefer_lean and Qwen3Runner.supports(model):
        return Qwen3Runner(model)
    return HFRunner(model)
