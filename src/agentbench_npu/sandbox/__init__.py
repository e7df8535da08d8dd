"""Sandboxes for agent tools: the contract (base.py), its conformance suite, and the built-in backends."""

from .base import ExecResult, Sandbox, SandboxError, SandboxLimits, SandboxProvider

__all__ = ["ExecResult", "Sandbox", "SandboxError", "SandboxLimits", "SandboxProvider"]
