"""Tiny Qwen3 checkpoints, built offline and deterministically from a seed, cached as HF model dirs.

The result is an ordinary checkpoint directory (config.json, model.safetensors, tokenizer files), so
the code that loads it is the code that loads /path/to/Qwen3-4B.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..paths import atomic_directory, cache_root
from .tokenizer import build_tokenizer

BUILDER_VERSION = 2

# Sizes measured to learn a toy task in seconds on 2 CPU cores (see MACHINE-NOTES: ~361k params).
_TINY_DENSE: dict[str, Any] = {
    "architecture": "Qwen3ForCausalLM",
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
TINY_MODELS: dict[str, dict[str, Any]] = {
    "tiny": _TINY_DENSE,
    # the stand-in for Qwen3-30B-A3B: the same architecture (Qwen3-MoE, softmax top-k router with
    # normalised top-k weights) at toy size, 8 experts, 2 routed per token in every layer
    "tiny-moe": {
        **_TINY_DENSE,
        "architecture": "Qwen3MoeForCausalLM",
        "moe_intermediate_size": 64,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
    },
}


ARCHITECTURES = {
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


def is_tiny(name: str) -> bool:
    return name in TINY_MODELS


def tiny_model_dir(name: str = "tiny", seed: int = 0) -> Path:
    """The cached checkpoint dir of a tiny model, built on first use."""
    spec = TINY_MODELS[name]
    key = hashlib.sha256(
        json.dumps({"spec": spec, "seed": seed, "v": BUILDER_VERSION, "torch": torch.__version__.split("+")[0]},
                   sort_keys=True).encode()
    ).hexdigest()[:12]
    final = cache_root() / "models" / f"{name}-s{seed}-{key}"
    if not (final / "config.json").exists():
        with atomic_directory(final) as tmp:
            build_tiny_model(tmp, spec, seed)
    return final


def build_tiny_model(path: Path, spec: dict[str, Any], seed: int) -> None:
    import transformers
    from transformers import GenerationConfig

    config_class, model_class = ARCHITECTURES[spec["architecture"]]
    tokenizer = build_tokenizer(vocab_size=spec["vocab_size"], seed=seed)
    config_kwargs = {k: v for k, v in spec.items() if k != "architecture"}
    config = getattr(transformers, config_class)(
        **config_kwargs,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
