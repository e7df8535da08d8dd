from __future__ import annotations

import platform

import torch

from .base import Device


class CpuDevice(Device):
    """The host CPU: the tiny profile runs here, the whole loop at toy size."""

    name = "cpu"
    description = "host CPU (gloo); the tiny profile's home"
    dist_backend = "gloo"
    ray_resource = "CPU"
    auto_priority = 0

    def is_available(self) -> bool:
        return True

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return platform.processor() or platform.machine() or "cpu"
