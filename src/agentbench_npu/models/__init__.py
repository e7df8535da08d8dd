"""Models: the tiny Qwen3 builder (offline, deterministic) and loading of HF checkpoint dirs."""

from .loading import LoadedModel, load_model, resolve_model_dir

__all__ = ["LoadedModel", "load_model", "resolve_model_dir"]
