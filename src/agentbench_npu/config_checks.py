"""Rules across a merged config's values: ranges, choices, and settings that must agree with each other.

`check_values` runs on the merged sections (plain dicts, before they become the typed RunConfig); every error
names the field path and what it accepts.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def _megatron_data_parallel(megatron: dict[str, int], ranks: int) -> int:
    """The Megatron trainer's data-parallel size; a ConfigError when its split does not fit the ranks."""
    tp, pp, ep = megatron["tensor_parallel"], megatron["pipeline_parallel"], megatron["expert_parallel"]
    if pp != 1:
        raise ConfigError(f"megatron.pipeline_parallel is {pp}: the Megatron trainer runs no pipeline schedule yet; "
                          "use 1 and split the model with megatron.tensor_parallel")
    if ranks % tp:
        raise ConfigError(f"megatron.tensor_parallel ({tp}) must divide cluster.train_devices ({ranks}); "
                          f"several trainer ranks run on Ray: --executor ray --train-devices {tp}")
    if (ranks // tp) % ep:
        raise ConfigError(f"megatron.expert_parallel ({ep}) must divide the data-parallel size ({ranks // tp}: "
                          f"cluster.train_devices {ranks} / megatron.tensor_parallel {tp}); experts are split over "
                          "data-parallel ranks")
    return ranks // tp


_POSITIVE = ("cluster.train_devices", "cluster.rollout_devices", "cluster.sync_bucket_mb", "run.steps", "rollout.prompts_per_step", "rollout.samples_per_prompt", "rollout.max_new_tokens",
             "train.micro_batch_size", "train.num_minibatches", "warm_start.batch_size",
             "sandbox.wall_seconds", "sandbox.cpu_seconds", "sandbox.memory_mb", "sandbox.processes",
             "sandbox.output_bytes", "sandbox.file_mb", "sandbox.slots", "engine.tp_size", "engine.ep_size",
             "engine.launch_timeout",
             "megatron.tensor_parallel", "megatron.pipeline_parallel", "megatron.expert_parallel")
_NON_NEGATIVE = ("hardware.devices_per_node", "hardware.memory_gib", "run.threads", "warm_start.steps", "checkpoint.every", "checkpoint.keep", "train.warmup_steps",
                 "rollout.temperature", "train.kl_coef", "train.grad_clip", "engine.mem_fraction_static", "engine.port")


def check_values(merged: dict[str, dict[str, Any]]) -> None:
    def get(path: str) -> Any:
        s, k = path.split(".")
        return merged[s][k]

    for path in _POSITIVE:
        if get(path) <= 0:
            raise ConfigError(f"{path} must be > 0, got {get(path)}")
    for path in _NON_NEGATIVE:
        if get(path) < 0:
            raise ConfigError(f"{path} must be >= 0, got {get(path)}")
    for path, choices in (("run.mode", ("train", "eval")), ("run.policy", ("model", "gold")),
                          ("cluster.executor", ("local", "ray")), ("cluster.mode", ("colocate", "disaggregated")),
                          ("cluster.placement", ("pack", "spread")), ("rollout.batching", ("lockstep", "free")),
                          ("sandbox.isolation", ("auto", "namespaces", "rlimits")),
                          ("engine.launcher", ("sglang", "agentbench")), ("run.trainer", ("torch", "megatron"))):
        if get(path) not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(choices)}; got '{get(path)}'")
    if get("engine.url") and merged["cluster"]["rollout_devices"] != 1:
        raise ConfigError("engine.url attaches one engine worker to one server; with several rollout devices "
                          "leave it empty and let each worker launch its own")
    if get("run.policy") == "gold" and get("run.mode") != "eval":
        raise ConfigError("run.policy=gold replays gold actions, which there is nothing to train on; "
                          "use it with --mode eval")
    cluster = merged["cluster"]
    if cluster["executor"] == "local" and (cluster["mode"] != "colocate" or cluster["train_devices"] != 1
                                           or cluster["rollout_devices"] != 1):
        raise ConfigError("cluster.executor=local runs one colocated trainer and engine; use --executor ray for "
                          "disaggregated mode or several devices")
    for key, value in merged["gates"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"gates.{key} must be >= 0, got {value}")
    if not 0 < get("hardware.usable_fraction") <= 1:
        raise ConfigError(f"hardware.usable_fraction must be in (0, 1], got {get('hardware.usable_fraction')}")
    if not 0 < get("rollout.top_p") <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {get('rollout.top_p')}")
    if get("rollout.top_k") == 0 or get("rollout.top_k") < -1:
        raise ConfigError(f"rollout.top_k must be -1 (off) or >= 1, got {get('rollout.top_k')}")
    if get("sandbox.uid_base") < 1000:
        raise ConfigError(f"sandbox.uid_base must be >= 1000 (the first of a range of uids no account uses); "
                          f"got {get('sandbox.uid_base')}")
    if get("train.lr") <= 0:
        raise ConfigError(f"train.lr must be > 0, got {get('train.lr')}")
    for path in ("model.dtype",) + (("model.engine_dtype",) if get("model.engine_dtype") else ()):
        if get(path) not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{path} must be one of float32, bfloat16, float16; got '{get(path)}'")
    if get("model.dtype") != "float32":
        raise ConfigError(f"model.dtype is '{get('model.dtype')}': the trainer keeps no float32 master weights, "
                          "so small updates would round away; train in float32 and serve in half precision with "
                          "model.engine_dtype=bfloat16")
    prompts, ranks = get("rollout.prompts_per_step"), get("cluster.train_devices")
    if get("run.trainer") == "megatron":
        ranks = _megatron_data_parallel(merged["megatron"], ranks)
    if prompts % ranks:
        what = ("the Megatron trainer's data-parallel size" if get("run.trainer") == "megatron"
                else "cluster.train_devices")
        raise ConfigError(f"rollout.prompts_per_step ({prompts}) must be a multiple of {what} ({ranks}): "
                          "each trainer rank takes whole prompt groups")
