"""Load a causal LM and its tokenizer from a HF checkpoint directory (or build a tiny one by name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from ..errors import UserError, one_line
from .tiny import TINY_MODELS, is_tiny, tiny_model_dir

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    path: Path


def resolve_model_dir(name_or_path: str, seed: int = 0) -> Path:
    """A tiny model name → its cached dir (built if needed); a path → checked to be a usable checkpoint."""
    if is_tiny(name_or_path):
        return tiny_model_dir(name_or_path, seed)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise UserError(
            f"model '{name_or_path}' is neither a tiny model ({', '.join(TINY_MODELS)}) nor an existing "
            "directory; pass a local HF checkpoint dir (hubs are not contacted)"
        )
    if not (path / "config.json").is_file():
        raise UserError(f"model dir '{path}' has no config.json; pass a HF checkpoint directory")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"model dir '{path}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files of the base model into it"
        )
    return path


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}'; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer of '{path}': {one_line(exc)}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, dtype: str = "float32", device: torch.device | str = "cpu",
                   attn_implementation: str = "sdpa") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, attn_implementation=attn_implementation,
            **{dtype_kw: torch_dtype(dtype)},
        )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot load the model in '{path}': {one_line(exc)}") from exc
    return model.to(device)


def load_model(name_or_path: str, *, dtype: str = "float32", device: torch.device | str = "cpu",
               seed: int = 0, attn_implementation: str = "sdpa") -> LoadedModel:
    path = resolve_model_dir(name_or_path, seed)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, dtype, device, attn_implementation)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path)
