"""The loop: tasks → rollout → reward → train step → weight sync → record, then gates and the report.

Nothing here knows a device, an engine or a scenario by name: it talks to their interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import shutil
import time
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .datasets import load_jsonl_tasks, take
from .devices import Device, resolve_device
from .errors import UserError, one_line
from .evaluation import EvalRecord, logprob_mismatch
from .executors import make_cluster, preflight
from .models.loading import load_tokenizer, resolve_model_dir, torch_dtype
from .models.moe import model_dir_is_moe
from .gates.faults import selected_faults
from .gates.base import SECOND_RUN_ENV, GateContext, evaluate_gates, select_gates, subprocess_rerun, thresholds_for
from .paths import atomic_write_json, atomic_write_text
from .probe import SyncProbe, tokens_digest
from .plugins import Plugins
from .report.records import append_samples, build_report, history_before
from .rollout import collect
from .training.checkpoint import Checkpoint, check_resumable, load_checkpoint, step_of
from .training.warm_start import ensure_warm_start
from .types import GateResult, SamplingParams, StepMetrics, Task


class Progress:
    """What a run tells its watcher. The CLI draws bars; tests and libraries use this silent default."""

    def phase(self, name: str, total: int | None = None) -> None: ...

    def advance(self, done: int, **info: Any) -> None: ...

    def step(self, metrics: StepMetrics, total: int) -> None: ...

    def done(self) -> None: ...


@dataclass
class Run:
    """The live state of one run, as plugins' lifecycle hooks see it."""

    config: RunConfig
    scenario: Any
    out_dir: Path
    device: Device | None = None
    steps: list[StepMetrics] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    resumed_from: str | None = None
    model_dir: str = ""
    gates: list[GateResult] = field(default_factory=list)
    cluster: Any = None
    cluster_info: dict[str, Any] = field(default_factory=dict)
    sandbox_info: dict[str, Any] | None = None
    services_info: dict[str, Any] = field(default_factory=dict)


class Runner:
    def __init__(self, config: RunConfig, plugins: Plugins, out_dir: Path, *, resume: Path | None = None,
                 progress: Progress | None = None):
        self.config = config
        self.plugins = plugins
        self.scenario = plugins.get("scenario", config.scenario).obj
        self.progress = progress or Progress()
        self.resume_path = resume
        # absolute: workers (Ray actors) write checkpoints from working directories of their own
        self.run = Run(config=config, scenario=self.scenario, out_dir=Path(out_dir).absolute())
        self._dataset: list[Task] | None = None
        self._tasks_take_mode = "mode" in inspect.signature(self.scenario.tasks).parameters
        self.evaluation = EvalRecord() if config.run.mode == "eval" else None

    # -- set-up: everything that can fail on bad input fails here, before the run dir exists --
    def prepare(self) -> None:
        c = self.config
        devices = {name: r.obj for name, r in self.plugins.items("device").items()}
        self.device = resolve_device(c.run.device, devices)
        self.run.device = self.device
        if c.data.path:
            self._dataset = load_jsonl_tasks(c.data.path)
        else:
            # the scenario's own task source (a file named in [task], say) is input too: a bad one fails here,
            # not at the first step (tasks() is deterministic and cheap by contract)
            self._scenario_tasks(0, 1)
        if c.run.mode == "eval":
            self._check_eval_coverage()
        if c.run.policy == "gold" and not getattr(self.scenario, "has_gold_policy", False):
            with_gold = sorted(n for n, r in self.plugins.items("scenario").items()
                               if getattr(r.obj, "has_gold_policy", False))
            raise UserError(f"scenario '{c.scenario}' has no gold policy; --policy gold works with: "
                            f"{', '.join(with_gold) or 'no installed scenario'}")
        self.checkpoint: Checkpoint | None = None
        if self.resume_path:
            self.checkpoint = load_checkpoint(self.resume_path)
            check_resumable(self.checkpoint, c)
        self.engine_factory = self.plugins.get("engine", c.run.engine).obj
        self.sandbox_factory = None
        if getattr(self.scenario, "uses_sandbox", False):
            self.sandbox_factory = self.plugins.get("sandbox", c.sandbox.backend).obj
        # built (and their input checked) now, started in _setup
        self.services = dict(self.scenario.services(c.task)) if hasattr(self.scenario, "services") else {}
        torch_dtype(c.model.dtype)
        self.base_model_dir = resolve_model_dir(c.model.name, c.model.seed)
        if c.train.get("routing_replay") and not model_dir_is_moe(self.base_model_dir):
            raise UserError(f"train.routing_replay replays routed experts, and model '{c.model.name}' is dense (its "
                            "config.json names no experts); use a mixture-of-experts model, e.g. --model tiny-moe")
        gates = {name: r.obj for name, r in self.plugins.items("gate").items()}
        self.gates = select_gates(gates, c)
        if (c.run.compare_to and not os.environ.get(SECOND_RUN_ENV)
                and not any(g.name == "baseline" for g in self.gates)):
            raise UserError("--compare-to is judged by the baseline gate, which --gates leaves out; add baseline "
                            "to --gates")
        for gate in self.gates:
            if hasattr(gate, "check"):  # bad input a gate can see now rather than after the run
                gate.check(c)
        self.thresholds = thresholds_for(self.device.name, c)
        preflight(c, self.device.name, self.base_model_dir)
        self.faults = selected_faults(c, lambda name: self.plugins.get("fault", name).obj, gates,
                                      judged=bool(self.gates))

    def _check_eval_coverage(self) -> None:
        """Each eval step tries every task equally often, or pass^k would average unequal (and missing) tasks."""
        c = self.config
        if self._dataset is not None:
            count = len(self._dataset)
        elif hasattr(self.scenario, "all_tasks"):
            count = len(self.scenario.all_tasks(c.task, **({"mode": c.run.mode} if self._tasks_take_mode else {})))
        else:
            return
        if c.rollout.prompts_per_step % count:
            raise UserError(f"--mode eval tries every task in every step, and there are {count} tasks; "
                            f"set rollout.prompts_per_step={count} (it is {c.rollout.prompts_per_step})")

    def _setup(self) -> None:
        c = self.config
        if c.run.threads:
            torch.set_num_threads(c.run.threads)
        self.device.seed(c.run.seed)
        if self.checkpoint is not None:
            # the run's initial policy (the KL anchor); the weights themselves come from the checkpoint
            model_dir = Path(self.checkpoint.state.get("initial_model_dir") or self.checkpoint.model_dir)
            if not model_dir.is_dir():
                model_dir = self.checkpoint.model_dir
            self.run.resumed_from = str(self.checkpoint.path)
        elif c.warm_start.steps > 0 and hasattr(self.scenario, "demonstrations") and c.run.policy == "model":
            self.progress.phase("warm start", c.warm_start.steps)
            model_dir = ensure_warm_start(
                self.base_model_dir, self.scenario, c.task, c.warm_start.__dict__, c.model.seed,
                progress=lambda done, loss: self.progress.advance(done, loss=loss),
            )
        else:
            model_dir = self.base_model_dir
        self.run.model_dir = str(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.cluster = make_cluster(c, self.device, self.engine_factory, self.faults)
        self.run.cluster = self.cluster
        state = self.cluster.start(str(model_dir),
                                   resume_from=str(self.checkpoint.path.absolute()) if self.checkpoint else "")
        self.run.cluster_info = self.cluster.describe()
        if self.sandbox_factory is not None:
            self.progress.phase(f"sandbox {c.sandbox.backend}", None)
            from .sandbox.base import SandboxError

            try:
                self.sandboxes = self.sandbox_factory(c.sandbox.limits(), c.sandbox.options())
                asyncio.run(self.sandboxes.start())
            except SandboxError as exc:
                self.sandboxes = None
                raise UserError(f"sandbox '{c.sandbox.backend}' could not start: {one_line(exc)}") from exc
            self.run.sandbox_info = self.sandboxes.describe()
        self._services = contextlib.ExitStack()
        self.service_clients: dict[str, Any] = {}
        for name, service in self.services.items():
            self.progress.phase(f"service {name}", None)
            self.service_clients[name] = self._services.enter_context(service)
            self.run.services_info[name] = service.describe() if hasattr(service, "describe") else {}
        self.start_step, self.cursor = int(state.get("step", 0)), int(state.get("cursor", 0))
        first = self.first_sync = self.cluster.sync_weights()
        if not first.checksums_match:
            raise UserError("the engine does not hold the trainer's initial weights (checksum mismatch)")
        self.probe = SyncProbe(self.scenario, c, self._dataset, self.tokenizer)
        for fault in self.faults:
            if fault.role == "driver":
                fault.inject(self)

    # -- the loop ------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        """Run every step; returns the final report. Call prepare() first."""
        out = self.run.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.recipe_path = out / "recipe.toml"
        atomic_write_text(self.recipe_path, self.config.to_toml())
        self.samples_path = out / "samples.jsonl"
        try:
            if self.checkpoint is None:
                self.samples_path.write_text("")
            else:
                self._carry_over_history()
            self._setup()
            self.plugins.call("run_started", run=self.run)
            total = self.config.run.steps
            self.progress.phase("steps", total)
            for step in range(self.start_step, total):
                metrics = self._step(step)
                self.run.steps.append(metrics)
                self._write_report("running")
                self.progress.step(metrics, total)
                self.plugins.call("step_finished", run=self.run, step=step, metrics=metrics)
                done = step + 1
                if self._checkpoint_due(done):
                    self._save_checkpoint(self.run.out_dir / "checkpoints" / f"step-{done:06d}", done, retain=True)
                for gate in self.gates:
                    if hasattr(gate, "split_step") and gate.split_step(self.config) == done:
                        self._save_checkpoint(gate.checkpoint_dir(self.run.out_dir, self.config), done)
            self._shutdown()  # the gates' own runs need the devices (and CPUs) back
            self.run.gates = self._evaluate_gates()
            status = "passed" if all(g.passed for g in self.run.gates) else "failed"
            report = self._write_report(status)
        except UserError as exc:
            self._write_report("error", error=str(exc))
            self._shutdown_after_failure()
            raise
        except Exception as exc:
            self._write_report("error", error=one_line(exc))
            self._shutdown_after_failure()
            raise
        finally:
            self.progress.done()
            self._shutdown()
        self.plugins.call("run_finished", run=self.run, report=report)
        return report

    def _shutdown(self) -> None:
        # each stops even when one before it fails: a service or sandbox backend that fails to close must not
        # keep the devices (or Ray) held; callbacks run last-registered first
        with contextlib.ExitStack() as stack:
            stack.callback(self._stop_cluster)
            stack.callback(self._stop_sandboxes)
            services, self._services = getattr(self, "_services", None), None
            if services is not None:
                stack.callback(services.close)

    def _shutdown_after_failure(self) -> None:
        """Clean up after a failed run without hiding why it failed: a service or backend that then fails to
        stop is logged, and the run's own exception is the one raised."""
        try:
            self._shutdown()
        except Exception as exc:
            logging.getLogger(__name__).warning("shutting down after the failure failed too: %s", one_line(exc))

    def _stop_sandboxes(self) -> None:
        if getattr(self, "sandboxes", None) is not None:
            sandboxes, self.sandboxes = self.sandboxes, None
            asyncio.run(sandboxes.close())

    def _stop_cluster(self) -> None:
        if self.run.cluster is not None:
            self.run.cluster.shutdown()
            self.run.cluster = None

    def _tasks(self, count: int) -> list[Task]:
        c = self.config
        if self._dataset is not None:
            tasks = take(self._dataset, c.run.seed, self.cursor, count)
        else:
            tasks = self._scenario_tasks(self.cursor, count)
        self.cursor += count
        return tasks

    def _scenario_tasks(self, cursor: int, count: int) -> list[Task]:
        c = self.config
        mode = {"mode": c.run.mode} if self._tasks_take_mode else {}
        return self.scenario.tasks(c.task, c.run.seed, cursor, count, **mode)

    def _step(self, step: int) -> StepMetrics:
        c = self.config
        r = c.rollout
        tasks = self._tasks(r.prompts_per_step)
        sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                  top_k=r.top_k)
        t0 = time.perf_counter()
        batch = asyncio.run(collect(
            self.scenario, self.cluster.engine, self.tokenizer, tasks, step=step, seed=c.run.seed,
            samples_per_prompt=r.samples_per_prompt, sampling=sampling, options=c.task,
            sandboxes=getattr(self, "sandboxes", None), services=self.service_clients, batching=r.batching,
            policy=c.run.policy,
        ))
        rollout_seconds = time.perf_counter() - t0
        trajs = batch.trajectories
        t1 = time.perf_counter()
        if self.evaluation is None:
            train = self.cluster.train_step(trajs)
            train_seconds = time.perf_counter() - t1
            sync = self.cluster.sync_weights()
        else:  # score only: the trainer's log-probs of the sampled tokens, no update, so nothing to sync
            train = self._score(trajs)
            train_seconds = time.perf_counter() - t1
            sync = dataclasses.replace(self.first_sync, seconds=0.0, bytes=0, tensors=0, transport="none (eval)")
            self.evaluation.add(step, trajs, self.scenario)
        probe = self.probe.measure(self.cluster)
        rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
        generated = sum(t.num_trainable for t in trajs)
        append_samples(self.samples_path, step, trajs, self.tokenizer)
        extra = {k: v for k, v in train.items() if k not in ("loss", "kl", "entropy", "logprob_abs_diff_mean",
                                                            "logprob_abs_diff_max")}
        if hasattr(self.scenario, "step_metrics"):
            extra.update({k: float(v) for k, v in self.scenario.step_metrics(trajs).items()})
        extra.update({
            "trajectories": len(trajs),
            "truncated_fraction": sum(t.status == "truncated" for t in trajs) / len(trajs),
            "aborted_fraction": sum(t.status == "aborted" for t in trajs) / len(trajs),
            "response_length_mean": sum(t.response_length for t in trajs) / len(trajs),
            "weight_version": sync.weight_version,
            "weight_sync_bytes": sync.bytes,
            "weight_sync_tensors": sync.tensors,
            "weight_sync_transport": sync.transport,
            "weight_sync_gb_per_s": sync.bytes / sync.seconds / 1e9 if sync.seconds > 0 else 0.0,
            "weights_checksum": sync.engine_checksum,
            "trainer_weights_checksum": sync.trainer_checksum,
            "sync_probe_abs_diff_mean": probe["mean"],
            "sync_probe_abs_diff_max": probe["max"],
            "tokens_digest": tokens_digest(trajs),
            "rewards_digest": hashlib.sha256(repr([t.reward for t in trajs]).encode()).hexdigest()[:16],
        })
        return StepMetrics(
            step=step, reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()) if len(trajs) > 1 else 0.0,
            loss=train["loss"], kl=train["kl"], entropy=train["entropy"],
            logprob_abs_diff_mean=train["logprob_abs_diff_mean"], logprob_abs_diff_max=train["logprob_abs_diff_max"],
            rollout_seconds=rollout_seconds, train_seconds=train_seconds, weight_sync_seconds=sync.seconds,
            weights_checksum_match=sync.checksums_match,
            tokens_per_second=generated / rollout_seconds if rollout_seconds > 0 else 0.0,
            extra=extra,
        )

    def _score(self, trajs: list) -> dict[str, Any]:
        sampled = [t for t in trajs if t.num_trainable]
        stats = logprob_mismatch(sampled, self.cluster.trainer_logprobs(sampled) if sampled else [])
        return {"loss": 0.0, "entropy": 0.0, **stats}

    # -- records -------------------------------------------------------------------------------
    def _carry_over_history(self) -> None:
        """A resumed run continues the steps and samples recorded before its checkpoint."""
        assert self.checkpoint is not None
        self.run.steps, rows = history_before(self.checkpoint.path.parent.parent, self.checkpoint.step)
        self.samples_path.write_text("".join(r + "\n" for r in rows))

    def _checkpoint_due(self, done: int) -> bool:
        c = self.config.checkpoint
        if not c.save or self.config.run.mode == "eval":  # an eval run changes no weights
            return False
        return done == self.config.run.steps or (c.every > 0 and done % c.every == 0)

    def _save_checkpoint(self, path: Path, done: int, retain: bool = False) -> None:
        """Save model, optimizer, RNG and cursor; `retain` applies checkpoint.keep to checkpoints/."""
        self.cluster.save_checkpoint(str(path), {
            "step": done, "cursor": self.cursor, "weight_version": self.cluster.weight_version,
            "initial_model_dir": self.run.model_dir, "train_ranks": self.config.cluster.train_devices,
            "trainer": self.config.run.trainer, "tensor_parallel": self.config.tensor_parallel,
            "expert_parallel": self.config.expert_parallel,
            "scenario": self.config.scenario, "config_digest": self.config.digest()})
        if not retain:
            return
        root = path.parent
        keep = self.config.checkpoint.keep
        existing = sorted(root.glob("step-*"), key=step_of)
        for old in existing[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        self.run.checkpoints = [str(p) for p in sorted(root.glob("step-*"), key=step_of)]

    def _evaluate_gates(self) -> list[GateResult]:
        def context(gate: Any) -> GateContext:
            return GateContext(config=self.config, report=self._report_dict("running"), thresholds=self.thresholds,
                               run_dir=self.run.out_dir, rerun=subprocess_rerun(self.config.scenario, self.recipe_path))

        # second runs of a local executor on CPU overlap well; on an accelerator both would load the model onto
        # the same device, and Ray ones would each start a cluster of their own
        parallel = self.config.cluster.executor == "local" and self.device.name == "cpu"
        return evaluate_gates(self.gates, context, on_gate=lambda name: self.progress.phase(f"gates {name}", None),
                              parallel=parallel)

    def _write_report(self, status: str, error: str | None = None) -> dict[str, Any]:
        report = self._report_dict(status, error)
        atomic_write_json(self.run.out_dir / "report.json", report)
        return report

    def _report_dict(self, status: str, error: str | None = None) -> dict[str, Any]:
        return build_report(self.run, self.config, self.scenario, getattr(self, "device", None), status, error,
                            self.evaluation)
