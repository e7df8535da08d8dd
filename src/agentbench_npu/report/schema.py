"""report.json: a public, versioned schema. Field names here are a contract with users' tooling.

schema_version 1:
  schema_version, scenario, checklist_item, status (running | passed | failed | error), error,
  started_at, finished_at, run_dir, resumed_from, model_dir,
  environment {device, device_name, device_count, python, torch, transformers, host, agentbench_npu,
               torch_npu / sglang / megatron_core when installed, cluster {executor, mode, ...}},
  config {...fully resolved...}, config_digest,
  steps [ {step, reward_mean, reward_std, loss, kl, entropy, logprob_abs_diff_mean,
           logprob_abs_diff_max, rollout_seconds, train_seconds, weight_sync_seconds,
           weights_checksum_match, tokens_per_second, ...extra metrics: weights_checksum,
           sync_probe_abs_diff_max, tokens_digest, rank_checksums, weight_sync_transport, ...} ],
  gates [ {name, passed, value, threshold, detail} ], faults [names], checkpoints [paths],
  summary {..., routing (MoE runs) {moe_route_agreement, logprob_abs_diff_mean_replay, logprob_abs_diff_mean_no_replay,
           kl_replay, kl_no_replay, replay, mismatch_ratio_no_replay_over_replay}},
  MoE step fields: moe_route_agreement, moe_load_cv, moe_load_imbalance, moe_load_max_min, moe_dead_experts,
           moe_dead_fraction, moe_router_entropy(_max), moe_nonfinite_router_logits, moe_expert_load {layer: [...]},
           moe_routing_replay, moe_routes_recorded, logprob_abs_diff_mean_(no_)replay, kl_(no_)replay;
  every training step: nonfinite_logprobs, nonfinite_loss, skipped_updates, aborted_fraction
Non-finite numbers (a NaN loss, an infinite ratio) are written as null: report.json is strict JSON.
  evaluation (eval runs only: run.mode = eval) {policy, pass_hat_k {"1": …, "k": …}, trials_per_task,
             reward_mean, tasks [ {task_id, trials, successes, reward_mean,
                                   runs [ {step, trial, seed, reward, status, ...scenario columns} ]} ]}
"""

from __future__ import annotations

import importlib.metadata as metadata
import math
import os
import platform
import socket
import sys
from typing import Any

import torch

from .. import __version__

SCHEMA_VERSION = 1
STATUSES = ("running", "passed", "failed", "error")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: Any) -> dict[str, Any]:
    env: dict[str, Any] = dict(device.environment()) if device is not None else {}
    env.update({
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "agentbench_npu": __version__,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    })
    for dist, key in (("torch_npu", "torch_npu"), ("sglang", "sglang"), ("megatron-core", "megatron_core")):
        version = _version(dist)
        if version:
            env[key] = version
    cann = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    if cann:
        env["cann_home"] = cann
    env["argv"] = sys.argv[1:]
    return env


def summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    if not steps:
        return {}
    first, last = steps[0], steps[-1]
    return {
        "steps": len(steps),
        "reward_first": first["reward_mean"],
        "reward_last": last["reward_mean"],
        "reward_mean": sum(s["reward_mean"] for s in steps) / len(steps),
        "logprob_abs_diff_mean_max": _largest(s["logprob_abs_diff_mean"] for s in steps),
        "logprob_abs_diff_max_max": _largest(s["logprob_abs_diff_max"] for s in steps),
        "weights_checksum_match_all": all(s["weights_checksum_match"] for s in steps),
        "weight_sync_seconds_mean": sum(s["weight_sync_seconds"] for s in steps) / len(steps),
        "tokens_per_second_mean": sum(s["tokens_per_second"] for s in steps) / len(steps),
        **({"routing": routing_summary(steps)} if any("moe_route_agreement" in s for s in steps) else {}),
    }


def nan_if_null(value: Any) -> Any:
    """A number read back from report.json: null there was a non-finite number (see above), NaN here."""
    return math.nan if value is None else value


def _largest(values: Any) -> float | None:
    """The largest value; NaN when one is NaN or null (a NaN read back from JSON)."""
    values = [nan_if_null(v) for v in values]
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def routing_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """MoE runs: means over the steps that measured them (a step that trained nothing measured nothing)."""
    def mean(key: str) -> float | None:
        values = [s[key] for s in steps if s.get(key) is not None]
        return sum(values) / len(values) if values else None

    out = {key: mean(key) for key in ("moe_route_agreement", "logprob_abs_diff_mean_replay",
                                      "logprob_abs_diff_mean_no_replay", "kl_replay", "kl_no_replay")}
    out["replay"] = any(s.get("moe_routing_replay") for s in steps)
    on, off = out["logprob_abs_diff_mean_replay"], out["logprob_abs_diff_mean_no_replay"]
    out["mismatch_ratio_no_replay_over_replay"] = off / on if on and off is not None else None
    return out
