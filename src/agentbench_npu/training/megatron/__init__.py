"""The Megatron-core trainer backend's pieces that need no accelerator: the model config from a Hugging Face
config.json, the parallel layout, and the weight-name conversion both ways (for loading and for weight sync).
The training loop itself runs only on accelerators and is not built yet."""

from .config import Parallel, model_options, require_megatron, transformer_config
from .convert import Layout, check_parallelism, hf_to_megatron, layout_from_hf, megatron_to_hf

__all__ = ["Layout", "Parallel", "check_parallelism", "hf_to_megatron", "layout_from_hf", "megatron_to_hf",
           "model_options", "require_megatron", "transformer_config"]
