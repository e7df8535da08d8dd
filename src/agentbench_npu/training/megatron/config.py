"""Megatron-core's model config from a Hugging Face config.json, the parallel layout, and the lazy import.

Megatron-core (and MindSpeed on Ascend) is an extra for accelerators: nothing here imports it until
`require_megatron` is called, and what can be checked without it — the config mapping, the parallel sizes,
the weight names (convert.py) — is checked on any machine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import ConfigError, MissingExtraError, UserError, one_line
from .convert import check_parallelism, layout_from_hf


@dataclass(frozen=True)
class Parallel:
    """Tensor, pipeline, expert and data parallel sizes: world = tp x pp x dp. Experts are split over TP like
    the dense layers (Megatron's default expert-tensor-parallel size), so EP divides dp."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1) -> Parallel:
        """The data-parallel size that fills `world_size` devices; an error naming the sizes if none does."""
        if tp < 1 or pp < 1 or ep < 1 or world_size % (tp * pp):
            raise ConfigError(f"{world_size} devices cannot be split as tensor parallel {tp} x pipeline parallel "
                              f"{pp} x data parallel: {tp} x {pp} must divide {world_size}")
        dp = world_size // (tp * pp)
        if dp % ep:
            raise ConfigError(f"expert parallel {ep} must divide data parallel {dp} ({world_size} devices / tensor "
                              f"parallel {tp} / pipeline parallel {pp}): experts are also split over TP")
        return cls(tp=tp, pp=pp, ep=ep, dp=dp)


DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": ""}


def transformer_config(hf: Mapping[str, Any], parallel: Parallel, dtype: str = "bfloat16") -> dict[str, Any]:
    """Keyword arguments for `megatron.core.transformer.TransformerConfig` describing the HF model `hf`.

    Covers Qwen2/Qwen2.5 (qkv bias), Qwen3 (q/k RMSNorm) and Qwen3-MoE (softmax top-k router with normalised
    top-k weights); a VL model's language model from its text_config. Raises ConfigError naming what does not fit.
    """
    text = hf.get("text_config") or hf
    layout = layout_from_hf(hf)
    try:
        check_parallelism(layout, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep)
    except ValueError as exc:
        raise ConfigError(f"model {hf.get('_name_or_path') or text.get('model_type', '?')}: {exc}") from None
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    out: dict[str, Any] = {
        "num_layers": layout.num_layers,
        "hidden_size": int(text["hidden_size"]),
        "ffn_hidden_size": int(text.get("intermediate_size") or 4 * int(text["hidden_size"])),
        "num_attention_heads": layout.num_heads,
        "num_query_groups": layout.num_kv_heads,
        "kv_channels": layout.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(text.get("rms_norm_eps", 1e-6)),
        "gated_linear_unit": True,  # SwiGLU: activation_func = silu, set by the caller with torch in hand
        "add_bias_linear": False,
        "add_qkv_bias": layout.qkv_bias,
        "qk_layernorm": layout.qk_norm,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "tensor_model_parallel_size": parallel.tp,
        "pipeline_model_parallel_size": parallel.pp,
        "expert_model_parallel_size": parallel.ep,
        "sequence_parallel": parallel.tp > 1,
        "bf16": dtype == "bfloat16",
        "fp16": dtype == "float16",
    }
    if layout.num_experts:
        out.update({
            "num_moe_experts": layout.num_experts,
            "moe_router_topk": int(text["num_experts_per_tok"]),
            "moe_ffn_hidden_size": int(text["moe_intermediate_size"]),
            "moe_router_pre_softmax": not bool(text.get("norm_topk_prob", True)),  # softmax over the top-k only
            # no load-balancing loss: the GRPO objective is the torch trainer's, which adds none (and Megatron's
            # aux-loss tracker is CUDA-only)
            "moe_router_load_balancing_type": "none",
            "moe_aux_loss_coeff": 0.0,
            "moe_grouped_gemm": False,  # sequential experts: the names convert.py maps
        })
    return out


def model_options(hf: Mapping[str, Any]) -> dict[str, Any]:
    """What `GPTModel` takes besides the TransformerConfig: vocabulary, positions, RoPE, tying."""
    text = hf.get("text_config") or hf
    return {
        "vocab_size": int(text["vocab_size"]),
        "max_sequence_length": int(text.get("max_position_embeddings", 32768)),
        "position_embedding_type": "rope",
        "rotary_base": int(float(_rope_theta(text))),
        "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings",
                                                           text.get("tie_word_embeddings", False))),
    }


def _rope_theta(text: Mapping[str, Any]) -> float:
    """RoPE's base: `rope_theta` at the top (transformers 4) or in `rope_parameters` (transformers 5)."""
    nested = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return float(text.get("rope_theta") or nested.get("rope_theta") or 10000)


def require_megatron(device: str) -> Any:
    """Import megatron.core (after MindSpeed's adaptor on Ascend); a one-line error naming the extra if missing."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise MissingExtraError("the Megatron trainer backend", extra="megatron", module="megatron-core")
    if device == "npu":
        if importlib.util.find_spec("mindspeed") is None:
            raise UserError("the Megatron trainer backend on npu needs MindSpeed (Megatron on Ascend), which is not "
                            "installed: use the Ascend image (Dockerfile.npu) or install MindSpeed from its repository")
        import mindspeed.megatron_adaptor  # noqa: F401  (patches Megatron for NPUs; must come first)
    try:
        import megatron.core as core
    except Exception as exc:
        raise UserError(f"megatron-core is installed but fails to import: {one_line(exc)}") from exc
    return core
