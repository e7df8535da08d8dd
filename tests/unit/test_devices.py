"""Devices: `auto` resolution, errors naming the choices and the missing extra, RNG state, env and backends."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch

from agentbench_npu.devices import Device, resolve_device
from agentbench_npu.devices.cpu import CpuDevice
from agentbench_npu.devices.cuda import CudaDevice
from agentbench_npu.devices.npu import NpuDevice
from agentbench_npu.errors import MissingExtraError, UserError
from agentbench_npu.plugins import load_plugins


@pytest.fixture(autouse=True)
def keep_global_rng():
    """These tests seed the process-wide generators; leave them as they were for other tests."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


@pytest.fixture
def devices(monkeypatch):
    """The registered devices, as the runner sees them (built-ins only)."""
    monkeypatch.setenv("AGENTBENCH_NPU_PLUGINS", "")
    return {name: item.obj for name, item in load_plugins().items("device").items()}


class AlwaysThereDevice(Device):
    """A device of a third party's making that is always available, at a chosen priority."""

    def __init__(self, name: str, priority: int) -> None:
        self.name = name
        self.auto_priority = priority
        self.prepared = False

    def is_available(self) -> bool:
        return True

    def prepare(self) -> None:
        self.prepared = True


def test_builtin_devices_are_cpu_cuda_and_npu(devices):
    assert sorted(devices) == ["cpu", "cuda", "npu"]


def test_auto_on_a_host_without_accelerators_is_cpu(devices):
    # this environment has a CPU-only torch and no torch_npu
    assert not torch.cuda.is_available() and importlib.util.find_spec("torch_npu") is None
    assert resolve_device("auto", devices).name == "cpu"


def test_auto_picks_the_available_device_with_the_highest_priority_and_prepares_it():
    low, high = AlwaysThereDevice("low", 1), AlwaysThereDevice("high", 5)
    chosen = resolve_device("auto", {"cpu": CpuDevice(), "low": low, "high": high})
    assert chosen is high and high.prepared and not low.prepared


def test_auto_skips_unavailable_devices_even_with_a_higher_priority():
    assert resolve_device("auto", {"cpu": CpuDevice(), "npu": NpuDevice(), "cuda": CudaDevice()}).name == "cpu"


def test_auto_with_nothing_available_is_a_user_error():
    class Gone(AlwaysThereDevice):
        def is_available(self) -> bool:
            return False

    with pytest.raises(UserError, match="no device is available"):
        resolve_device("auto", {"gone": Gone("gone", 0)})


def test_an_unknown_device_name_lists_the_choices(devices):
    with pytest.raises(UserError) as info:
        resolve_device("tpu", devices)
    assert str(info.value) == "unknown device 'tpu'; available: cpu, cuda, npu"


def test_npu_without_torch_npu_names_the_extra_to_install(devices):
    assert importlib.util.find_spec("torch_npu") is None
    with pytest.raises(MissingExtraError) as info:
        resolve_device("npu", devices)
    message = str(info.value)
    assert "torch_npu" in message and "agentbench-npu[npu]" in message and "\n" not in message
    assert info.value.extra == "npu" and info.value.module == "torch_npu"
    assert isinstance(info.value, UserError)


def test_npu_reports_itself_unavailable_rather_than_raising_without_torch_npu():
    assert NpuDevice().is_available() is False


def test_cuda_by_name_on_a_host_without_gpus_says_it_is_not_available(devices):
    assert not torch.cuda.is_available()
    with pytest.raises(UserError, match="device 'cuda' is not available on this machine; use --device auto or cpu"):
        resolve_device("cuda", devices)


def test_cpu_by_name_is_the_cpu_device(devices):
    cpu = resolve_device("cpu", devices)
    assert cpu.torch_device() == torch.device("cpu") and cpu.device_count() == 1
    assert cpu.memory_stats() == {}


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_cpu_rng_state_round_trip_restores_python_numpy_and_torch_streams():
    cpu = CpuDevice()
    cpu.seed(1234)
    draws()  # advance the streams somewhere past the seed
    state = cpu.rng_state()
    first = draws()
    cpu.seed(99)  # scramble everything
    draws()
    cpu.set_rng_state(state)
    assert draws() == first


def test_seeding_gives_the_same_streams_twice():
    cpu = CpuDevice()
    cpu.seed(7)
    first = draws()
    cpu.seed(7)
    assert draws() == first
    cpu.seed(8)
    assert draws() != first


def test_rng_state_survives_torch_save_and_load(tmp_path):
    cpu = CpuDevice()
    cpu.seed(5)
    torch.save(cpu.rng_state(), tmp_path / "rng.pt")
    expected = draws()
    cpu.seed(6)
    cpu.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert draws() == expected


@pytest.mark.parametrize("device, env", [
    (CudaDevice(), "CUDA_VISIBLE_DEVICES"),
    (NpuDevice(), "ASCEND_RT_VISIBLE_DEVICES"),
])
def test_visible_devices_uses_the_vendor_environment_variable(device, env):
    assert device.visible_devices([0, 3]) == {env: "0,3"}
    assert device.visible_devices([]) == {env: ""}


def test_cpu_has_no_visible_devices_variable():
    assert CpuDevice().visible_devices([0, 1]) == {}


@pytest.mark.parametrize("device, backend, resource", [
    (CpuDevice(), "gloo", "CPU"),
    (CudaDevice(), "nccl", "GPU"),
    (NpuDevice(), "hccl", "NPU"),
])
def test_each_device_names_its_distributed_backend_and_ray_resource(device, backend, resource):
    assert device.dist_backend == backend
    assert device.ray_resource == resource


def test_cpu_environment_records_device_and_backend():
    env = CpuDevice().environment()
    assert env["device"] == "cpu" and env["dist_backend"] == "gloo" and env["device_count"] == 1
    assert isinstance(env["device_name"], str) and env["device_name"]
