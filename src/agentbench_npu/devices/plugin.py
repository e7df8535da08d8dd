"""Built-in devices, registered through the same hook a third party uses."""

from ..hookspecs import hookimpl
from .cpu import CpuDevice
from .cuda import CudaDevice
from .npu import NpuDevice


@hookimpl
def register_devices(register):
    register(CpuDevice())
    register(CudaDevice())
    register(NpuDevice())
