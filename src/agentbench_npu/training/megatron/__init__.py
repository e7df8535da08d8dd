"""The Megatron-core trainer backend (run.trainer = "megatron").

config.py    TransformerConfig and GPTModel options from a Hugging Face config.json; parallel sizes; the lazy import
convert.py   Hugging Face ⇄ Megatron-core weight names and layouts over TP x PP x EP (loading, weight sync)
model.py     a rank's GPTModel holding a Hugging Face checkpoint, behind the causal-LM interface the trainer uses
backend.py   a trainer rank's start: groups, model, data-parallel group (and megatron-core on the CPU)

Nothing here imports megatron-core until a model is built: config.py and convert.py work without it.
"""

from .config import Parallel, model_options, require_megatron, transformer_config
from .convert import Layout, check_parallelism, hf_to_megatron, layout_from_hf, megatron_to_hf

__all__ = ["Layout", "Parallel", "check_parallelism", "hf_to_megatron", "layout_from_hf", "megatron_to_hf",
           "model_options", "require_megatron", "transformer_config"]
