from __future__ import annotations

from typing import Any

import torch

from .base import Device


class CudaDevice(Device):
    """NVIDIA GPUs through torch.cuda (nccl): the GPU baseline side of every comparison."""

    name = "cuda"
    description = "NVIDIA GPU (nccl)"
    dist_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    ray_resource = "GPU"
    auto_priority = 10

    def is_available(self) -> bool:
        return bool(torch.cuda.is_available())

    def module(self) -> Any:
        return torch.cuda
