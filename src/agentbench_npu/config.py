"""The typed run config: scenario recipe ← profile ← flags ← `--set key=value`, validated.

Every value has one home, a dotted field path (`train.lr`, `rollout.max_new_tokens`, `task.ops`);
errors name that path, the file and line it came from when it came from a file, and the valid keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config_checks import check_values
from .errors import ConfigError, close_names
from .recipes import Layer, _Raw, load_toml, packaged_recipe, parse_set, profile_layer  # noqa: F401  (public here too)
from .training.trainer import TrainConfig


@dataclass(frozen=True)
class RunSection:
    steps: int = 10
    seed: int = 0
    device: str = "auto"
    engine: str = "reference"
    trainer: str = "torch"  # torch (a transformers model) | megatron (Megatron-core's GPT model: [megatron])
    deterministic: bool = True
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    out: str = ""
    faults: list = field(default_factory=list)  # injected faults (gates/faults.py), for proving gates
    mode: str = "train"  # train (rollout + GRPO step + sync) | eval (rollout and scoring only, pass^k per task)
    policy: str = "model"  # model (the engine samples) | gold (replay the scenario's gold actions; eval only)
    compare_to: str = ""  # "" | baseline (the matching archived run) | a run dir or report: the `baseline` gate
    baselines: str = ""  # the baseline archive ("" = $AGENTBENCH_NPU_BASELINES or ./baselines)
    compare_tolerances: str = ""  # a tolerance TOML for the comparison (docs/diff.md)


@dataclass(frozen=True)
class ModelSection:
    name: str = "tiny"
    dtype: str = "float32"
    engine_dtype: str = ""  # "" = same as dtype
    seed: int = 0  # tiny models only: the seed they are built from
    attn_implementation: str = "sdpa"
    recipe: str = ""  # the scenarios/models/ recipe applied for this checkpoint ("" = none matched)


@dataclass(frozen=True)
class RolloutSection:
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # lockstep: multi-turn agent loops decode in waves whose make-up does not depend on tool timing
    # (bitwise reproducible); free: each request joins whatever batch is forming (engines/lockstep.py)
    batching: str = "lockstep"


@dataclass(frozen=True)
class WarmStartSection:
    """Supervised warm start on the scenario's demonstrations (tiny profile), cached by content."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 5e-3
    demonstrations: int = 2000


@dataclass(frozen=True)
class DataSection:
    path: str = ""  # JSONL with `prompt` and `label` per line; "" = the scenario's generated tasks


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 0  # save every N steps; 0 = only after the last step
    keep: int = 2  # newest checkpoints kept; 0 = all
    save: bool = True


@dataclass(frozen=True)
class ClusterSection:
    """Where trainer and engine run: in this process (local) or as Ray actors (ray)."""

    executor: str = "local"  # local | ray
    mode: str = "colocate"  # colocate (trainer and engine share devices) | disaggregated
    ray_address: str = ""  # "" = start a local Ray; auto | HOST:PORT of a running cluster
    train_devices: int = 1  # data-parallel trainer ranks
    rollout_devices: int = 1  # engine workers
    placement: str = "pack"  # pack | spread (across nodes)
    sync_bucket_mb: int = 64  # distributed weight sync: bytes per broadcast


@dataclass(frozen=True)
class GatesSection:
    """Which gates run, and their thresholds. A threshold left unset comes from scenarios/gates.toml
    for the run's device and dtype (docs/gates.md lists the defaults and their sources)."""

    enabled: str = "all"  # all | none | comma-separated gate names
    logprob_mean: float | None = None  # per step: mean |train - rollout| log-prob over trainable tokens
    logprob_max: float | None = None  # any single token
    logprob_kl: float | None = None  # per step: mean k3 KL(rollout || train)
    spike_factor: float | None = None  # a step mean above factor x the running median is a spike ...
    spike_floor: float | None = None  # ... when it is also above this floor
    sync_probe_max: float | None = None  # after a sync: max |engine - trainer| log-prob on the probe batch
    repro_tolerance: float | None = None  # relative; 0 = bitwise
    repro_steps: int = 2  # steps the second process runs and compares
    continuity_tolerance: float | None = None  # relative; 0 = identical
    continuity_split: int = 0  # the step N to save at and resume from; 0 = half the steps
    # moe_health (MoE models), per step; non-finite logits, loss, gradients or router logits always fail it
    moe_dead_fraction: float = 0.1  # share of (layer, expert) pairs that got no token in the step
    moe_load_imbalance: float = 0.8  # the worst layer's load CV over a total collapse's (sqrt(E/k - 1)); 1 = collapsed
    moe_router_entropy_min: float = 0.02  # mean router entropy over log(num_experts); ~0 = saturated routers


@dataclass(frozen=True)
class EngineSection:
    """The `sglang` engine backend (run.engine = "sglang"): one server per engine worker, launched or attached."""

    url: str = ""  # attach to a running server (one engine worker); "" = launch one per worker
    launcher: str = "sglang"  # sglang (python -m sglang.launch_server) | agentbench (our `serve`: same API subset)
    tp_size: int = 1  # SGLang --tp-size
    ep_size: int = 1  # SGLang --ep-size (MoE expert parallelism)
    mem_fraction_static: float = 0.0  # SGLang --mem-fraction-static; 0 = SGLang's default
    attention_backend: str = ""  # "" = ascend on npu, SGLang's default elsewhere
    release_memory: bool = True  # colocated: the engine releases its memory while the trainer steps
    deterministic: bool = True  # SGLang --enable-deterministic-inference
    launch_timeout: float = 600.0  # seconds to wait for /health
    extra_args: list = field(default_factory=list)  # more launch_server flags, verbatim
    port: int = 0  # 0 = a free port
    staging_dir: str = ""  # colocated syncs write weights here for the server to load; "" = a local temp dir


@dataclass(frozen=True)
class HardwareSection:
    """What the profile's machines have, for the memory plan (plan.py); memory_gib 0 = unknown, no plan."""

    name: str = ""  # e.g. "Atlas 800T A2 (Ascend 910B)"
    devices_per_node: int = 0
    memory_gib: float = 0.0  # per device
    usable_fraction: float = 0.8  # of it for weights, gradients and optimizer states; the rest is activations


@dataclass(frozen=True)
class MegatronSection:
    """The Megatron trainer (run.trainer = "megatron"): how each model is split over the trainer's ranks.
    The ranks (cluster.train_devices) are tensor parallel x pipeline parallel x data parallel."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # 1: the wrapper runs no pipeline schedule (yet)
    expert_parallel: int = 1  # MoE: experts split over data-parallel ranks


@dataclass(frozen=True)
class SandboxSection:
    """Where agent tools run code: a sandbox backend (register_sandboxes) and the limits of every exec."""

    backend: str = "local"  # local | docker | modal | any registered sandbox
    wall_seconds: float = 10.0
    cpu_seconds: float = 10.0
    memory_mb: int = 512
    processes: int = 32
    output_bytes: int = 65536
    file_mb: int = 64
    network: bool = False
    image: str = ""  # docker / modal: the image; "" = the backend's default
    isolation: str = "auto"  # local: auto | namespaces | rlimits
    slots: int = 128  # local: sandboxes open at once (each has its own uid)
    uid_base: int = 3_000_000  # local: first uid of the slots' range (>= 1000; unused by any account)

    def limits(self) -> Any:
        from .sandbox.base import SandboxLimits

        return SandboxLimits(wall_seconds=self.wall_seconds, cpu_seconds=self.cpu_seconds, memory_mb=self.memory_mb,
                             processes=self.processes, output_bytes=self.output_bytes, file_mb=self.file_mb,
                             network=self.network)

    def options(self) -> dict[str, Any]:
        return {"image": self.image, "isolation": self.isolation, "slots": self.slots, "uid_base": self.uid_base}


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("temperature", "top_p", "top_k"))


@dataclass(frozen=True)
class RunConfig:
    scenario: str
    profile: str = ""
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    rollout: RolloutSection = RolloutSection()
    train: dict[str, Any] = field(default_factory=dict)
    warm_start: WarmStartSection = WarmStartSection()
    data: DataSection = DataSection()
    checkpoint: CheckpointSection = CheckpointSection()
    cluster: ClusterSection = ClusterSection()
    gates: GatesSection = GatesSection()
    sandbox: SandboxSection = SandboxSection()
    engine: EngineSection = EngineSection()
    megatron: MegatronSection = MegatronSection()
    hardware: HardwareSection = HardwareSection()
    task: dict[str, Any] = field(default_factory=dict)  # the scenario's own options

    @property
    def tensor_parallel(self) -> int:
        """Trainer ranks that hold one model between them (Megatron's TP; 1 for the torch trainer)."""
        return self.megatron.tensor_parallel if self.run.trainer == "megatron" else 1

    @property
    def expert_parallel(self) -> int:
        """Data ranks that split a MoE model's experts between them (Megatron's EP; 1 for the torch trainer)."""
        return self.megatron.expert_parallel if self.run.trainer == "megatron" else 1

    @property
    def model_parallel(self) -> int:
        """Trainer ranks whose forwards and weight gathers run together: tensor x expert parallel, the first of
        which is trainer rank 0 (Megatron orders ranks TP first, then EP)."""
        return self.tensor_parallel * self.expert_parallel

    @property
    def data_parallel(self) -> int:
        """Trainer ranks that each train on a data shard of their own (train_devices / tensor parallel)."""
        return self.cluster.train_devices // self.tensor_parallel

    def train_config(self) -> TrainConfig:
        r = self.rollout
        return TrainConfig(**self.train, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The fully resolved config as a recipe: `run --recipe` with it reproduces this run."""
        lines = [f"scenario = {json.dumps(self.scenario)}"]
        for section, body in self.to_dict().items():
            if not isinstance(body, dict):
                continue
            lines.append(f"\n[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in body.items() if value is not None]
        return "\n".join(lines) + "\n"

    def digest(self) -> str:
        """A hash of everything that changes results (not where output goes)."""
        data = self.to_dict()
        data["run"] = {k: v for k, v in data["run"].items() if k != "out"}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


SECTIONS: dict[str, type] = {
    "run": RunSection, "model": ModelSection, "rollout": RolloutSection, "warm_start": WarmStartSection,
    "data": DataSection, "checkpoint": CheckpointSection, "cluster": ClusterSection,
    "gates": GatesSection, "sandbox": SandboxSection, "engine": EngineSection,
    "megatron": MegatronSection, "hardware": HardwareSection,
}
TOP_LEVEL = ("scenario", "profile", "checklist_item", "description")


def _field_types() -> dict[str, dict[str, type]]:
    """section -> key -> the Python type its values take (Optional[X] -> X)."""
    types: dict[str, dict[str, type]] = {}
    for name, cls in {**SECTIONS, "train": TrainConfig}.items():
        hints = typing.get_type_hints(cls)
        types[name] = {k: next(a for a in typing.get_args(t) if a is not type(None)) if typing.get_args(t) and
                       type(None) in typing.get_args(t) else typing.get_origin(t) or t for k, t in hints.items()}
    return types


def _train_defaults() -> dict[str, Any]:
    defaults = TrainConfig()
    return {k: getattr(defaults, k) for k in TRAIN_KEYS}


def section_defaults(task_defaults: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
    out["train"] = _train_defaults()
    out["task"] = dict(task_defaults)
    return out


def valid_keys(task_defaults: Mapping[str, Any]) -> list[str]:
    return sorted(f"{s}.{k}" for s, keys in section_defaults(task_defaults).items() for k in keys)


def _coerce(value: Any, target: type, path: str, where: str) -> Any:
    if isinstance(value, _Raw):
        text = str(value)
        try:
            if target is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            if target is int:
                return int(text)
            if target is float:
                number = float(text)
                if math.isnan(number):
                    raise ValueError
                return number
            if target is list:
                return json.loads(text) if text.startswith("[") else [s.strip() for s in text.split(",") if s.strip()]
            return text
        except ValueError:
            raise ConfigError(
                f"{where}: {path} must be {_type_word(target)}, got '{text}'"
            ) from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{where}: {path} must be a number, got nan")
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {path} must be {_type_word(target)}, got {value!r}")
    return value


def _type_word(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}.get(t, t.__name__)


def resolve(scenario: str, layers: list[Layer], task_defaults: Mapping[str, Any]) -> RunConfig:
    """Merge layers (later wins) over the defaults, checking every key and type."""
    merged = section_defaults(task_defaults)
    types = _field_types()
    top: dict[str, Any] = {"scenario": scenario, "profile": ""}
    for layer in layers:
        for section, body in layer.values.items():
            if section in TOP_LEVEL and not isinstance(body, dict):
                if section == "profile":
                    top["profile"] = str(body)
                continue
            if section not in merged:
                names = sorted(merged) + list(TOP_LEVEL)
                raise ConfigError(
                    f"{layer.source}: unknown section '{section}'{close_names(section, names)}; "
                    f"valid sections: {', '.join(sorted(merged))}"
                )
            if not isinstance(body, dict):
                raise ConfigError(f"{layer.source}: '{section}' must be a table of keys")
            for key, value in body.items():
                path = f"{section}.{key}"
                if key not in merged[section]:
                    keys = sorted(f"{section}.{k}" for k in merged[section])
                    raise ConfigError(
                        f"{layer.where(section, key)}: unknown key '{path}'{close_names(path, keys)}; "
                        f"valid keys: {', '.join(keys)}"
                    )
                target = types.get(section, {}).get(key) or type(merged[section][key])
                merged[section][key] = _coerce(value, target, path, layer.where(section, key))
    check_values(merged)
    return RunConfig(scenario=top["scenario"], profile=top["profile"], train=merged["train"], task=merged["task"],
                     **{name: cls(**merged[name]) for name, cls in SECTIONS.items()})
