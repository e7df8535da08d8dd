"""Will the run fit its devices? The static memory of a trainer rank and of an engine, from config.json.

Static memory is exact arithmetic: parameters counted from config.json times the bytes each holds — the
trainers keep float32 weights, gradients and two Adam moments (16 bytes per parameter; Megatron's split divides
the dense ones by tensor parallel and a MoE model's experts by tensor x expert parallel), plus a float32 copy for the KL reference when train.kl_coef > 0 (an eval run: the float32
weights alone, for the log-prob probes); an engine holds its
weights in its dtype, split over engine.tp_size. Activations and the KV cache are what is left: a trainer rank
may take `hardware.usable_fraction` of a device for static memory. A run on a profile that knows its devices'
memory (`hardware.memory_gib`) is refused before anything starts when a trainer rank cannot fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import ConfigError

GIB = 1 << 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAIN_BYTES_PER_PARAM = 16  # float32 weights + gradients + Adam's two moments


def _experts(text: Mapping[str, Any]) -> int:
    return int(text.get("num_experts") or text.get("num_local_experts") or 0)


def count_expert_parameters(hf: Mapping[str, Any]) -> int:
    """The parameters of a MoE model's experts (what expert parallelism splits); 0 for a dense model."""
    text = hf.get("text_config") or hf
    experts = _experts(text)
    if not experts:
        return 0
    return int(text["num_hidden_layers"]) * experts * 3 * int(text["hidden_size"]) * int(text["moe_intermediate_size"])


def count_parameters(hf: Mapping[str, Any]) -> int:
    """Parameters of a Qwen2/Qwen3(-MoE)-style decoder from its config.json (a VL model's language model)."""
    text = hf.get("text_config") or hf
    h, layers, vocab = int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["vocab_size"])
    heads = int(text["num_attention_heads"])
    kv = int(text.get("num_key_value_heads") or heads)
    hd = int(text.get("head_dim") or h // heads)
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if str(text.get("model_type", "")).startswith("qwen2"):
        attention += heads * hd + 2 * kv * hd  # q/k/v biases
    if text.get("model_type", "").startswith("qwen3"):
        attention += 2 * hd  # q/k norms
    experts = _experts(text)
    if experts:
        mlp = experts * 3 * h * int(text["moe_intermediate_size"]) + h * experts
    else:
        mlp = 3 * h * int(text["intermediate_size"])
    tied = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return layers * (attention + mlp + 2 * h) + vocab * h * (1 if tied else 2) + h


@dataclass(frozen=True)
class Plan:
    parameters: int
    trainer_gib: float  # static memory of one trainer rank
    trainer_how: str
    engine_gib: float  # one engine's weights
    device_gib: float  # 0 = unknown
    usable_gib: float
    engine_beside: bool  # colocated and not released while the trainer steps: both on one device

    @property
    def need_gib(self) -> float:
        return self.trainer_gib + (self.engine_gib if self.engine_beside else 0.0)

    @property
    def fits(self) -> bool:
        return not self.device_gib or self.need_gib <= self.usable_gib

    def summary(self) -> str:
        where = f" of {self.usable_gib:.1f} usable per device" if self.device_gib else ""
        return (f"{self.parameters / 1e9:.2f} B parameters; trainer rank {self.trainer_gib:.1f} GiB "
                f"({self.trainer_how}){where}; engine weights {self.engine_gib:.1f} GiB")


def plan(config: Any, hf: Mapping[str, Any]) -> Plan:
    n = count_parameters(hf)
    tp, ep = config.tensor_parallel, config.expert_parallel
    experts = count_expert_parameters(hf)
    held = (n - experts) / tp + experts / (tp * ep)  # the parameters one trainer rank holds
    split = (f" / TP {tp}" if tp > 1 else "") + (f", experts / TP x EP {tp * ep}" if ep > 1 else "")
    trainer = held * TRAIN_BYTES_PER_PARAM
    how = f"{config.run.trainer}, 16 B/param{split}"
    if config.train.get("kl_coef", 0.0) > 0:
        trainer += held * 4
        how += " + KL reference"
    engine_dtype = config.model.engine_dtype or config.model.dtype
    engine = n * BYTES.get(engine_dtype, 4) / (config.engine.tp_size if config.run.engine == "sglang" else 1)
    beside = config.cluster.mode == "colocate"
    if beside and config.run.engine == "sglang" and config.engine.release_memory:
        how += "; the engine releases its memory for the step"
        beside = False
    if config.run.mode == "eval":  # the trainer still holds the weights, for the log-prob probes
        kl = config.train.get("kl_coef", 0.0) > 0
        trainer = held * 4 * (2 if kl else 1)
        how = f"eval: float32 weights{' and the KL reference' if kl else ''} only, {config.run.trainer}{split}"
    device = config.hardware.memory_gib
    return Plan(parameters=n, trainer_gib=trainer / GIB, trainer_how=how, engine_gib=engine / GIB,
                device_gib=device, usable_gib=device * config.hardware.usable_fraction, engine_beside=beside)


def check(config: Any, hf: Mapping[str, Any], profile: str) -> Plan:
    """The plan; a ConfigError naming the numbers and the way out when a trainer rank does not fit."""
    p = plan(config, hf)
    if p.device_gib and p.engine_gib > p.usable_gib:
        split = config.engine.tp_size if config.run.engine == "sglang" else 1
        dtype = config.model.engine_dtype or config.model.dtype
        raise ConfigError(
            f"profile {profile}: an engine needs {p.engine_gib:.1f} GiB for its weights ({dtype}, "
            f"{'on one device' if split == 1 else f'split {split} ways'}), and {p.device_gib:g} GiB devices leave {p.usable_gib:.1f} GiB "
            f"at hardware.usable_fraction {config.hardware.usable_fraction:g}; split it over devices with --engine "
            "sglang --set engine.tp_size=N")
    if p.fits:
        _check_engine_devices(config)
        return p
    engine = (f" + the engine's {p.engine_gib:.1f} GiB beside it = {p.need_gib:.1f} GiB" if p.engine_beside else "")
    text = hf.get("text_config") or hf
    kv_heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
    experts = _experts(text)
    data_parallel = config.data_parallel
    if config.run.trainer == "torch":
        advice = "split it: --trainer megatron --set megatron.tensor_parallel=N"
    elif config.megatron.tensor_parallel < kv_heads:
        advice = f"raise megatron.tensor_parallel (up to {kv_heads}, its key/value heads)"
    elif experts and config.megatron.expert_parallel < min(experts, data_parallel):
        advice = (f"raise megatron.expert_parallel (it must divide the {data_parallel} data-parallel ranks and the "
                  f"{experts} experts), or add trainer ranks (cluster.train_devices)")
    else:
        advice = (f"tensor parallelism cannot split it further (its {kv_heads} key/value heads)"
                  + (", nor expert parallelism with these trainer ranks" if experts else "")
                  + ", and a distributed optimizer is not built yet: add trainer ranks"
                  + (" and raise megatron.expert_parallel" if experts else ""))
    raise ConfigError(
        f"profile {profile}: a trainer rank needs {p.trainer_gib:.1f} GiB ({p.trainer_how}){engine}, "
        f"and {p.device_gib:g} GiB devices leave {p.usable_gib:.1f} GiB at hardware.usable_fraction "
        f"{config.hardware.usable_fraction:g}; {advice}")


def _check_engine_devices(config: Any) -> None:
    """An engine split over devices needs those devices: disaggregated, the Ray executor gives each engine worker
    engine.tp_size of them; colocated, each engine shares one device with a trainer rank."""
    e = config.engine
    if (config.run.engine == "sglang" and e.tp_size > 1 and not e.url and config.cluster.executor == "ray"
            and config.cluster.mode == "colocate"):
        raise ConfigError(
            f"engine.tp_size is {e.tp_size}, and colocated the Ray executor gives each engine worker the one device "
            f"it shares with a trainer rank, so a server it launches cannot split over {e.tp_size}: use --mode "
            "disaggregated (each engine then gets engine.tp_size devices), or engine.tp_size=1")


def describe(config: Any, model: str) -> Iterator[str]:
    """`run --dry-run`, line by line: the profile, the model recipe, the memory plan (a ConfigError when it
    cannot fit, after the lines that say what was resolved), and the resolved config as a recipe."""
    h = config.hardware
    yield (f"profile: {config.profile or '(none)'}"
           + (f" — {h.name}, {h.devices_per_node} x {h.memory_gib:g} GiB" if h.memory_gib else ""))
    yield f"model: {model}; " + (f"recipe: scenarios/models/{config.model.recipe}.toml" if config.model.recipe
                                 else "no model recipe matched")
    config_json = Path(model).expanduser() / "config.json"
    if config_json.is_file():
        p = check(config, json.loads(config_json.read_text()), config.profile or "(none)")
        yield f"memory plan: {p.summary()}" + ("" if p.device_gib else " (device memory unknown)")
    yield config.to_toml()
