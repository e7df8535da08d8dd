"""Devices: cpu, cuda, npu. `resolve_device` turns a name (or `auto`) into a Device."""

from .base import Device, resolve_device

__all__ = ["Device", "resolve_device"]
