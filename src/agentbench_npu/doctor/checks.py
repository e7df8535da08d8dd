"""What `doctor` looks at: the stack, CANN, devices, process-group backends, sandboxes, the cache, the environment.

Each probe returns `Check`s. A check is `ok` (present and working), `absent` (an optional part that is not here:
said, not a failure), `warn` (present, but set up in a way that hurts RL runs) or `fail` (required and missing
or broken). What is required depends on the device doctor checks for and on `--require`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import one_line

OK, ABSENT, WARN, FAIL = "ok", "absent", "warn", "fail"
GIB = 1024**3


@dataclass(frozen=True)
class Check:
    group: str  # stack | cann | devices | distributed | sandboxes | storage | environment | smoke
    name: str
    status: str  # ok | absent | warn | fail
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _check(group: str, name: str, ok: bool, detail: str, required: bool) -> Check:
    return Check(group, name, OK if ok else (FAIL if required else ABSENT), detail)


# -- the Python stack -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Package:
    name: str  # what the line says
    module: str  # what is imported
    distribution: str  # whose version is reported
    extra: str = ""  # the agentbench-npu extra that installs it; "" = a core dependency
    needed_for: str = ""  # a device or --require name that makes it required


CORE = tuple(Package(n, m, d) for n, m, d in (
    ("torch", "torch", "torch"), ("transformers", "transformers", "transformers"),
    ("tokenizers", "tokenizers", "tokenizers"), ("safetensors", "safetensors", "safetensors"),
    ("numpy", "numpy", "numpy"), ("pluggy", "pluggy", "pluggy"), ("click", "click", "click"),
    ("rich", "rich", "rich"), ("httpx", "httpx", "httpx"), ("fastapi", "fastapi", "fastapi"),
    ("uvicorn", "uvicorn", "uvicorn"),
))
OPTIONAL = (
    Package("torch_npu", "torch_npu", "torch_npu", "npu", "npu"),
    Package("sglang", "sglang", "sglang", "sglang", "sglang"),
    Package("vllm", "vllm", "vllm", "", "vllm"),
    Package("vllm-ascend", "vllm_ascend", "vllm_ascend", "", "vllm"),
    Package("megatron-core", "megatron.core", "megatron-core", "megatron", "megatron"),
    Package("mindspeed", "mindspeed", "mindspeed", "", "megatron-npu"),
    Package("ray", "ray", "ray", "ray", "ray"),
    Package("docker", "docker", "docker", "docker", "docker"),
    Package("modal", "modal", "modal", "modal", "modal"),
)


def _version(distribution: str, module: Any) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "?"))


def package_check(package: Package, required: bool) -> Check:
    """Import the package for real; report its version, or why it is not usable."""
    how = f"pip install 'agentbench-npu[{package.extra}]'" if package.extra else f"pip install {package.distribution}"
    if importlib.util.find_spec(package.module.split(".")[0]) is None:
        return _check("stack", package.name, False, f"not installed ({how})", required)
    try:
        module = importlib.import_module(package.module)
    except Exception as exc:  # installed but broken: always a failure, optional or not
        return Check("stack", package.name, FAIL, f"installed but fails to import: {one_line(exc)}")
    return Check("stack", package.name, OK, _version(package.distribution, module))


def stack_checks(required: set[str]) -> list[Check]:
    checks = [package_check(p, True) for p in CORE]
    checks += [package_check(p, p.needed_for in required) for p in OPTIONAL]
    return checks


# -- CANN -----------------------------------------------------------------------------------------
CANN_HOMES = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
CANN_DEFAULT = Path("/usr/local/Ascend/ascend-toolkit/latest")


def cann_version(home: Path) -> str | None:
    """The toolkit's version from `<home>/<arch>-linux/ascend_toolkit_install.info` (or version.cfg)."""
    for info in sorted(home.glob("*/ascend_toolkit_install.info")) + [home / "version.cfg"]:
        try:
            lines = info.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition("=")
            if key.strip() in ("version", "Version") and value.strip():
                return value.strip().strip('"')
    return None


def cann_check(required: bool) -> Check:
    named = [(var, os.environ[var]) for var in CANN_HOMES if os.environ.get(var)]
    homes = [Path(path) for _, path in named] or [CANN_DEFAULT]
    for home in homes:
        if home.is_dir():
            version = cann_version(home)
            if version:
                return Check("cann", "CANN toolkit", OK, f"{version} at {home}")
            return _check("cann", "CANN toolkit", False, f"{home} has no ascend_toolkit_install.info: a broken install?",
                          required)
    where = f"${named[0][0]}={named[0][1]} does not exist" if named else f"no {CANN_DEFAULT}"
    return _check("cann", "CANN toolkit", False,
                  f"{where}; on an Ascend host `source /usr/local/Ascend/ascend-toolkit/set_env.sh`", required)


# -- devices --------------------------------------------------------------------------------------
def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu_detail() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = _meminfo()
    ram = (f", {mem['MemTotal'] / GIB:.1f} GiB RAM ({mem.get('MemAvailable', 0) / GIB:.1f} available)"
           if "MemTotal" in mem else "")
    return f"{cores} cores usable, {platform.machine()}{ram}"


def accelerator_detail(device: Any) -> str:
    module = device.module()
    parts = []
    for i in range(device.device_count()):
        text = f"{i}: {device.device_name(i)}"
        if hasattr(module, "mem_get_info"):
            free, total = module.mem_get_info(i)
            text += f" {total / GIB:.0f} GiB ({free / GIB:.0f} free)"
        parts.append(text)
    return "; ".join(parts)


def device_checks(devices: dict[str, Any], required: set[str]) -> list[Check]:
    checks = []
    for name, device in sorted(devices.items(), key=lambda kv: kv[1].auto_priority):
        if name == "cpu":
            checks.append(Check("devices", name, OK, cpu_detail()))
            continue
        try:
            available = device.is_available()
            detail = accelerator_detail(device) if available else _why_absent(device)
        except Exception as exc:
            checks.append(Check("devices", name, FAIL, f"probing failed: {one_line(exc)}"))
            continue
        checks.append(_check("devices", name, available, detail, name in required))
    return checks


def _why_absent(device: Any) -> str:
    if device.name == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            return "torch_npu is not installed"
        return "torch_npu imports but sees no NPU (ASCEND_RT_VISIBLE_DEVICES? npu-smi info)"
    if device.name == "cuda":
        import torch

        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        return "no CUDA device visible (CUDA_VISIBLE_DEVICES? nvidia-smi)"
    return "not available"


# -- process-group backends ----------------------------------------------------------------------
def gloo_roundtrip() -> str:
    """A one-rank gloo group, for real: init, all_reduce, destroy."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return "a process group is already up in this process"
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        x = torch.tensor([2.0])
        dist.all_reduce(x)
        if x.item() != 2.0:
            raise RuntimeError(f"all_reduce over one rank gave {x.item()}, not 2.0")
    finally:
        dist.destroy_process_group()
    return "one-rank group: init, all_reduce, destroy"


def distributed_checks(devices: dict[str, Any], required: set[str]) -> list[Check]:
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return [Check("distributed", "torch.distributed", FAIL, "this torch is built without torch.distributed")]
    try:
        checks = [Check("distributed", "gloo", OK, gloo_roundtrip())]
    except Exception as exc:
        checks = [Check("distributed", "gloo", FAIL, one_line(exc))]
    nccl = dist.is_nccl_available() and torch.cuda.is_available()
    try:
        nccl_detail = f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if nccl else \
            "needs a CUDA torch build and a GPU"
    except Exception as exc:  # the library is there but does not answer: say so, do not crash the report
        nccl, nccl_detail = False, f"NCCL does not report its version: {one_line(exc)}"
    checks.append(_check("distributed", "nccl", nccl, nccl_detail, "cuda" in required))
    hccl = False
    if "npu" in devices and importlib.util.find_spec("torch_npu") is not None:
        try:
            devices["npu"].prepare()
            hccl = "hccl" in dist.Backend.backend_list
        except Exception:
            hccl = False
    checks.append(_check("distributed", "hccl", hccl, "registered by torch_npu" if hccl else
                         "needs torch_npu (and CANN's HCCL)", "npu" in required))
    return checks


# -- sandboxes ------------------------------------------------------------------------------------
def local_sandbox_check(factory: Callable[..., Any]) -> Check:
    """Start the local sandbox backend and run one real exec in it."""
    import asyncio

    from ..sandbox.base import SandboxLimits

    async def go() -> str:
        provider = factory(SandboxLimits(wall_seconds=10, cpu_seconds=10, memory_mb=256), {})
        async with provider:
            box = provider.sandbox()
            async with box:
                result = await box.exec(["python3", "-c", "print(6 * 7)"])
            if result.stdout.strip() != "42":
                raise RuntimeError(f"`print(6 * 7)` gave {result.stdout!r} (exit {result.exit_code}): "
                                   f"{result.stderr.strip()[-200:]}")
            return str(provider.describe().get("isolation", "?"))

    try:
        isolation = asyncio.run(go())
    except Exception as exc:
        return Check("sandboxes", "local", FAIL, one_line(exc))
    return Check("sandboxes", "local", OK, f"ran python3 in a sandbox ({isolation} isolation)")


def docker_check(required: bool) -> Check:
    from ..sandbox.docker import DEFAULT_IMAGE, unavailable

    why = unavailable(DEFAULT_IMAGE)
    return _check("sandboxes", "docker", why is None,
                  f"daemon answers, image {DEFAULT_IMAGE} present" if why is None else why, required)


def modal_check(required: bool) -> Check:
    if importlib.util.find_spec("modal") is None:
        return _check("sandboxes", "modal", False, "the modal SDK is not installed "
                      "(pip install 'agentbench-npu[modal]')", required)
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        where = "MODAL_TOKEN_ID / MODAL_TOKEN_SECRET"
    elif (Path.home() / ".modal.toml").is_file():
        where = "~/.modal.toml"
    else:
        return _check("sandboxes", "modal", False, "no Modal credentials (`modal token new`, or MODAL_TOKEN_ID "
                      "and MODAL_TOKEN_SECRET)", required)
    return Check("sandboxes", "modal", OK, f"credentials in {where} (not contacted: doctor makes no cloud calls)")


# -- storage --------------------------------------------------------------------------------------
def cache_check() -> Check:
    from ..paths import CACHE_ENV, cache_root

    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-") as handle:
            handle.write(b"ok")
            handle.flush()
        free = shutil.disk_usage(root).free
    except Exception as exc:
        where = os.environ.get(CACHE_ENV)
        return Check("storage", "cache", FAIL, f"cannot write the cache ({one_line(exc)}); "
                     + (f"point ${CACHE_ENV} (now {where}) at a writable dir" if where else f"set ${CACHE_ENV}"))
    return Check("storage", "cache", OK, f"{root} writable, {free / GIB:.1f} GiB free")


# -- environment ----------------------------------------------------------------------------------
# (variable, the value RL runs want, why) — on Ascend hosts
NPU_ENVIRONMENT = (
    ("VLLM_ASCEND_ENABLE_NZ", "0", "vllm-ascend refuses RL weight updates with FRACTAL_NZ weights"),
    ("HCCL_DETERMINISTIC", "true", "deterministic HCCL reductions (the reproducibility gate)"),
)
VISIBLE = ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "HCCL_CONNECT_TIMEOUT")


def environment_checks(npu: bool) -> list[Check]:
    checks = []
    for var, want, why in NPU_ENVIRONMENT if npu else ():
        have = os.environ.get(var)
        if have is None:
            checks.append(Check("environment", var, WARN, f"unset; set {var}={want}: {why}"))
        elif have.lower() != want:
            checks.append(Check("environment", var, WARN, f"{have}; want {want}: {why}"))
        else:
            checks.append(Check("environment", var, OK, have))
    for var in VISIBLE:
        if var in os.environ:
            checks.append(Check("environment", var, OK, os.environ[var]))
    return checks


def summarise(checks: Iterable[Check]) -> dict[str, int]:
    counts = {OK: 0, ABSENT: 0, WARN: 0, FAIL: 0}
    for c in checks:
        counts[c.status] += 1
    return counts
