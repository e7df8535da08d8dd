"""FAKE torch_npu, for tests only: an Ascend NPU cannot exist on a CPU machine, so this stands in at the SDK
boundary. Importing it gives torch a `torch.npu` module that reports two 64 GiB NPUs and registers an `hccl`
process-group backend name (whose process groups cannot be created). Nothing runs on it: it exists so that the
code that *reports* on NPUs (doctor, device descriptions) is exercised; the live test needs a real Ascend host.
"""

import types

import torch
import torch.distributed as dist

__version__ = "0.0.0+fake"
GIB = 1024**3


def _no_hccl(*args, **kwargs):
    raise RuntimeError("the FAKE torch_npu cannot create HCCL process groups")


npu = types.SimpleNamespace(
    is_available=lambda: True,
    device_count=lambda: 2,
    get_device_name=lambda index=0: "Ascend910B3 (FAKE)",
    mem_get_info=lambda index=0: (60 * GIB, 64 * GIB),
    synchronize=lambda index=None: None,
)
torch.npu = npu
if "hccl" not in dist.Backend.backend_list:
    dist.Backend.register_backend("hccl", _no_hccl, devices=["npu"])
