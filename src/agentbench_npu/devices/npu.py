from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..errors import MissingExtraError, UserError, one_line
from .base import Device


class NpuDevice(Device):
    """Huawei Ascend NPUs through torch_npu (hccl). torch_npu is imported only when this device is used."""

    name = "npu"
    description = "Ascend NPU via torch_npu (hccl)"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    ray_resource = "NPU"
    auto_priority = 20

    def is_available(self) -> bool:
        if importlib.util.find_spec("torch_npu") is None:
            return False
        try:
            self.prepare()
        except UserError:
            return False
        return bool(torch.npu.is_available())  # type: ignore[attr-defined]

    def prepare(self) -> None:
        if importlib.util.find_spec("torch_npu") is None:
            raise MissingExtraError("device 'npu'", extra="npu", module="torch_npu")
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)
        except Exception as exc:
            raise UserError(
                f"device 'npu': torch_npu is installed but fails to import ({one_line(exc)}); "
                "check CANN (source set_env.sh) or run `agentbench-npu doctor`"
            ) from exc

    def module(self) -> Any:
        return torch.npu  # type: ignore[attr-defined]

    def set_deterministic(self, enabled: bool = True) -> None:
        import os

        super().set_deterministic(enabled)
        if enabled:
            os.environ.setdefault("HCCL_DETERMINISTIC", "true")
