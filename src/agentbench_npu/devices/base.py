"""The device interface: what the runner, trainer and engine need to know about an accelerator."""

from __future__ import annotations

import os
import random
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import UserError


class Device:
    """A kind of device. Subclasses set the class attributes and override what differs."""

    name: str = ""
    description: str = ""
    dist_backend: str = "gloo"
    visible_devices_env: str | None = None
    ray_resource: str | None = None  # the Ray resource name that counts these devices
    auto_priority: int = 0  # `--device auto` picks the available device with the highest priority

    def is_available(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Import whatever stack the device needs; raise UserError naming the extra if it is missing."""

    def module(self) -> Any:
        """The torch device module (torch.cuda, torch.npu, ...); None for cpu."""
        return None

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device(self.name, index)

    def device_count(self) -> int:
        mod = self.module()
        return int(mod.device_count()) if mod is not None else 1

    def device_name(self, index: int = 0) -> str:
        mod = self.module()
        return str(mod.get_device_name(index)) if mod is not None else self.name

    def synchronize(self) -> None:
        mod = self.module()
        if mod is not None:
            mod.synchronize()

    def memory_stats(self) -> dict[str, int]:
        mod = self.module()
        if mod is None:
            return {}
        return {
            "allocated_bytes": int(mod.memory_allocated()),
            "max_allocated_bytes": int(mod.max_memory_allocated()),
            "reserved_bytes": int(mod.memory_reserved()),
        }

    def visible_devices(self, indices: list[int]) -> dict[str, str]:
        """Environment that restricts a worker process to `indices`."""
        if self.visible_devices_env is None:
            return {}
        return {self.visible_devices_env: ",".join(str(i) for i in indices)}

    # -- randomness ------------------------------------------------------------------------
    def seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also seeds cuda/npu generators when present

    def rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        mod = self.module()
        if mod is not None:
            state["device"] = mod.get_rng_state_all()
        return state

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        mod = self.module()
        if mod is not None and "device" in state:
            mod.set_rng_state_all(state["device"])

    def set_deterministic(self, enabled: bool = True) -> None:
        torch.use_deterministic_algorithms(enabled, warn_only=False)
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    def environment(self) -> dict[str, Any]:
        """What report.json records about this device."""
        return {
            "device": self.name,
            "device_name": self.device_name(),
            "device_count": self.device_count(),
            "dist_backend": self.dist_backend,
        }


def best_available(devices: Mapping[str, Device]) -> Device | None:
    """The available device with the highest auto priority (what `--device auto` means); None if none is."""
    for device in sorted(devices.values(), key=lambda d: -d.auto_priority):
        try:
            if device.is_available():
                return device
        except Exception:  # a broken stack is not available; `doctor` says why
            continue
    return None


def resolve_device(name: str, devices: Mapping[str, Device]) -> Device:
    """`auto` → the available device with the highest priority; a name → that device, prepared."""
    if name == "auto":
        device = best_available(devices)
        if device is None:
            raise UserError("no device is available (not even cpu?)")
        device.prepare()
        return device
    if name not in devices:
        raise UserError(f"unknown device '{name}'; available: {', '.join(sorted(devices))}")
    device = devices[name]
    device.prepare()
    if not device.is_available():
        raise UserError(f"device '{name}' is not available on this machine; use --device auto or cpu")
    return device
