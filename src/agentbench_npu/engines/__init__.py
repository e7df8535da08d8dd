"""Inference engines behind one client interface (engines/base.py)."""

from .base import EngineClient

__all__ = ["EngineClient"]
