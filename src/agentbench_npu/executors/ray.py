"""The Ray executor: trainer ranks and engine workers as Ray actors in a placement group.

`colocate` puts trainer rank i and engine i in the same bundle (they share its devices);
`disaggregated` gives trainers and engines bundles of their own. Weights travel from trainer rank 0 to
every engine over a gloo group of their own (sync/distributed.py); data-parallel trainer ranks share a
torch.distributed group. Devices are Ray resources (CPU, GPU, NPU), so Ray sets each actor's
visible-device variable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from typing import Any, Sequence

from ..config import RunConfig
from ..devices import Device
from ..engines.base import EngineClient
from ..engines.batching import RequestBatcher
from ..errors import MissingExtraError, UserError, one_line
from ..sync import SyncResult
from ..types import GenerateRequest, GenerateResult, Trajectory
from .base import Cluster
from .workers import EngineWorker, TrainWorker, WorkerSpec

CONNECT_TIMEOUT_S = 10.0
PLACEMENT_TIMEOUT_S = 30.0


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError("--executor ray", extra="ray", module="ray") from exc
    return ray


def check_reachable(address: str) -> None:
    """Fail fast (seconds, not minutes) when HOST:PORT has no listener."""
    if address in ("", "auto") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address '{address}' is not HOST:PORT (or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
                        f"`ray start --head --port {port}` or pass --ray-address auto") from exc


class RayEngineClient(EngineClient):
    """Scenarios' engine client: requests are batched as locally, then split across the engine actors."""

    def __init__(self, engines: list[Any]):
        self.engines = engines
        self._batcher = RequestBatcher(self._run_batch)

    async def _run_batch(self, batch: list[GenerateRequest]) -> list[GenerateResult]:
        n = len(self.engines)
        size = -(-len(batch) // n)
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        ray = _ray()
        try:
            parts = await asyncio.gather(*[e.generate_batch.remote(c) for e, c in zip(self.engines, chunks)])
        except ray.exceptions.RayError as exc:
            raise ray_failure(exc, "generation") from exc
        return [r for part in parts for r in part]

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return await self._batcher.submit(requests)

    async def update_weights_from_disk(self, path: Any) -> int:
        versions = await asyncio.gather(*[e.update_weights_from_disk.remote(str(path)) for e in self.engines])
        return int(versions[0])

    async def weights_checksum(self) -> str:
        sums = await asyncio.gather(*[e.checksum.remote() for e in self.engines])
        return sums[0] if len(set(sums)) == 1 else "mismatch:" + ",".join(sums)

    async def model_info(self) -> dict[str, Any]:
        infos = await asyncio.gather(*[e.model_info.remote() for e in self.engines])
        return {**infos[0], "engines": len(self.engines)}


class RayCluster(Cluster):
    def __init__(self, config: RunConfig, device: Device, engine_factory: Any, faults: list):
        self.config = config
        self.device = device
        self.engine_factory = engine_factory
        self.faults = faults
        self._version = 0
        self._actor_nodes = 0
        self._started_ray = False
        self.pg = None
        self.trainers: list[Any] = []
        self.engines: list[Any] = []

    # -- start ---------------------------------------------------------------------------------
    def _init_ray(self) -> Any:
        ray = _ray()
        c = self.config.cluster
        if ray.is_initialized():
            return ray
        check_reachable(c.ray_address)
        try:
            if c.ray_address:
                ray.init(address=c.ray_address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            else:
                # a local Ray gets this machine's cores; for more CPU workers start Ray yourself
                # (`ray start --head --num-cpus N`) and pass --ray-address
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
                self._started_ray = True
        except (ConnectionError, RuntimeError) as exc:
            raise UserError(f"cannot connect to Ray at '{c.ray_address or 'a new local instance'}': "
                            f"{one_line(exc)}") from exc
        return ray

    def _bundles(self) -> tuple[list[dict[str, float]], list[int], list[int], float]:
        """Bundles, the bundle of each trainer and engine, and the share of a bundle each actor takes."""
        c = self.config.cluster
        resource = self.device.ray_resource or "CPU"
        if c.mode == "colocate":
            count = max(c.train_devices, c.rollout_devices)
            bundles = [{resource: 1.0} for _ in range(count)]
            return bundles, [i % count for i in range(c.train_devices)], [i % count for i in range(c.rollout_devices)], 0.5
        per_engine = float(self._engine_devices())
        bundles = [{resource: 1.0} for _ in range(c.train_devices)] + [{resource: per_engine}
                                                                       for _ in range(c.rollout_devices)]
        return bundles, list(range(c.train_devices)), list(range(c.train_devices, len(bundles))), 1.0

    def _engine_devices(self) -> int:
        """Devices one engine worker holds: an SGLang server it launches splits over engine.tp_size of them
        (disaggregated mode; the plan refuses that split colocated)."""
        e, r = self.config.engine, self.config.run
        return e.tp_size if r.engine == "sglang" and not e.url and self.config.cluster.mode == "disaggregated" else 1

    def _actor(self, ray: Any, cls: type, bundle: int, share: float, spec: WorkerSpec) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resource = self.device.ray_resource or "CPU"
        options: dict[str, Any] = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=bundle)}
        if resource == "CPU":
            options["num_cpus"] = share
        elif resource == "GPU":
            options.update(num_cpus=0, num_gpus=share)
        else:
            options.update(num_cpus=0, resources={resource: share})
        return ray.remote(cls).options(**options).remote(spec)

    def start(self, model_dir: str, resume_from: str = "") -> dict[str, Any]:
        ray = self._init_ray()
        c = self.config.cluster
        bundles, train_at, engine_at, share = self._bundles()
        from ray.util.placement_group import placement_group

        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "NPU")}
        need = f"the run needs {len(bundles)} bundles of {bundles[0]} ({c.train_devices} trainer(s), " \
               f"{c.rollout_devices} engine(s) of {self._engine_devices()} device(s), {c.mode}); the Ray cluster " \
               f"has {have}"
        resource = next(iter(bundles[0]))
        if have.get(resource, 0) < sum(b[resource] for b in bundles):
            self.shutdown()
            raise UserError(need)
        self.pg = placement_group(bundles, strategy="STRICT_SPREAD" if c.placement == "spread" else "PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self.shutdown()
            raise UserError(f"{need}, but not free within {PLACEMENT_TIMEOUT_S:.0f} s")
        base = dict(config=self.config, model_dir=model_dir, device=self.device, resume_from=resume_from,
                    faults=self.faults)
        self.trainers = [self._actor(ray, TrainWorker, b, share,
                                     WorkerSpec(**base, rank=r, world_size=c.train_devices))
                         for r, b in enumerate(train_at)]
        self.engines = [self._actor(ray, EngineWorker, b, share * self._engine_devices(), WorkerSpec(**base))
                        for b in engine_at]
        dp_host, dp_port = self._get(self.trainers[0].node_address.remote(), "trainer rank 0")
        states = self._get([t.setup.remote(f"tcp://{dp_host}:{dp_port}") for t in self.trainers], "trainer setup")
        self._get([e.setup.remote(self.engine_factory) for e in self.engines], "engine setup")
        self._version = int(states[0].get("weight_version", 0))
        self._get([e.set_weight_version.remote(self._version) for e in self.engines], "engine setup")
        self._data_ranks = self._get([t.data_shard.remote() for t in self.trainers], "trainer setup")
        specs = self._with_peers(self.trainers[0].weight_specs.remote(), "trainer rank 0")
        # a free port picked just before use: collectives between the pick and the listen may take it
        host, port = self._get(self.trainers[0].node_address.remote(), "trainer rank 0")
        world = 1 + len(self.engines)
        self._get([self.trainers[0].join_update_group.remote(host, port, world)] +
                  [e.join_update_group.remote(host, port, i + 1, world, specs, self._bucket_bytes())
                   for i, e in enumerate(self.engines)],
                  "weight-update group")
        self.engine = RayEngineClient(self.engines)
        self._actor_nodes = len(set(self._get([a.node_id.remote() for a in self.trainers + self.engines], "set-up")))
        return states[0]

    def _get(self, refs: Any, what: str) -> Any:
        """ray.get, but the first failure surfaces at once (not after the survivors' collective timeout)."""
        ray = _ray()
        try:
            pending = list(refs) if isinstance(refs, list) else [refs]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            raise ray_failure(exc, what) from exc

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, trajs: Sequence[Trajectory]) -> dict[str, Any]:
        shards = shard_by_group(trajs, 1 + max(self._data_ranks))
        shards = [shards[d] for d in self._data_ranks]  # the TP ranks of one model replica train on one shard
        # colocated server engines (SGLang) give their devices' memory to the trainers for the step
        release = (self.config.cluster.mode == "colocate" and self.config.engine.release_memory
                   and getattr(self.engine_factory, "colocated_release", False))
        released = all(self._get([e.release_memory.remote() for e in self.engines], "releasing engine memory")) \
            if release else False
        try:
            results = self._get([t.train_step.remote(s) for t, s in zip(self.trainers, shards)], "the training step")
        finally:
            if release:
                self._get([e.resume_memory.remote() for e in self.engines], "resuming engine memory")
        return {**results[0], "rank_losses": [r["loss"] for r in results],
                "rank_checksums": [r["weights_checksum"] for r in results], "engine_memory_released": released}

    def _bucket_bytes(self) -> int:
        # server engines (SGLang) receive one broadcast per tensor; ours take buckets of sync_bucket_mb
        return 0 if getattr(self.engine_factory, "per_tensor_broadcast", False) else self.config.cluster.sync_bucket_mb << 20

    def sync_weights(self) -> SyncResult:
        bucket = self._bucket_bytes()
        dtype = self.config.model.engine_dtype or self.config.model.dtype
        sent, *received = self._get([self.trainers[0].send_weights.remote(bucket, dtype)] + self._peers_gather() +
                                    [e.receive_weights.remote() for e in self.engines], "the weight sync")
        received = received[len(self._peers()):]
        sums = {r["checksum"] for r in received}
        self._version = received[0]["version"]
        return SyncResult(
            transport="distributed (gloo)",
            seconds=max([sent["seconds"]] + [r["seconds"] for r in received]), bytes=sent["bytes"],
            tensors=sent["tensors"], trainer_checksum=sent["checksum"],
            engine_checksum=received[0]["checksum"] if len(sums) == 1 else "mismatch:" + ",".join(sorted(sums)),
            weight_version=self._version,
        )

    def trainer_logprobs(self, trajs: Sequence[Trajectory]) -> list[list[float]]:
        trajs = list(trajs)  # a model split over ranks computes together: every rank of replica 0 runs the forward
        return self._get([t.logprobs_for.remote(trajs) for t in [self.trainers[0], *self._peers()]],
                         "a log-prob recompute")[0]

    def save_checkpoint(self, path: str, state: dict[str, Any]) -> None:
        rngs = self._get([t.rng_state.remote() for t in self.trainers], "a checkpoint")
        self._get([t.save_trainer_shard.remote(path) for t in self._peers()], "a checkpoint")  # their optimizer parts
        self._with_peers(self.trainers[0].save_checkpoint.remote(
            path, state, {"ranks": {str(r): s for r, s in enumerate(rngs)}}),
            "a checkpoint")

    # -- a model split over ranks (Megatron's TP and EP) ------------------------------------------------------
    def _peers(self) -> list[Any]:
        """The other ranks holding a part of trainer rank 0's model: they join every gather of its weights and
        every forward it runs alone (EP ranks exchange tokens in each)."""
        return self.trainers[1:self.config.model_parallel]

    def _peers_gather(self) -> list[Any]:
        return [t.gather_weights.remote() for t in self._peers()]

    def _with_peers(self, ref: Any, what: str) -> Any:
        """Rank 0's call that gathers the weights, with its peers taking part; rank 0's result."""
        return self._get([ref, *self._peers_gather()], what)[0]

    @property
    def weight_version(self) -> int:
        return self._version

    def describe(self) -> dict[str, Any]:
        c = self.config.cluster
        ray = _ray()
        nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive")} if ray.is_initialized() else set()
        return {"executor": "ray", "mode": c.mode, "train_ranks": c.train_devices, "engines": c.rollout_devices,
                "placement": c.placement, "cluster_nodes": len(nodes), "ray_address": c.ray_address or "local",
                "sync": "distributed (gloo)", "actor_nodes": self._actor_nodes,
                "engine_devices": self._engine_devices(),
                **self._get(self.trainers[0].describe.remote(), "trainer rank 0")}

    def shutdown(self) -> None:
        ray = _ray()
        # engines that started a server stop it; each on its own, so that one dead actor does not cut the others
        # short (a server whose actor died gets SIGTERM from the kernel: it was started with a parent-death signal)
        closing = [(i, e.close.remote()) for i, e in enumerate(self.engines)]
        for i, ref in closing:
            try:
                ray.get(ref, timeout=60)
            except Exception as exc:
                print(f"engine worker {i}: closing its engine failed: {one_line(exc)[:200]}", file=sys.stderr)
        for actor in self.trainers + self.engines:
            try:
                ray.kill(actor)
            except Exception:  # already dead: nothing to release
                pass
        self.trainers, self.engines = [], []
        if self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()


def ray_failure(exc: BaseException, what: str) -> UserError:
    """A Ray error as the one-line error a user can act on."""
    ray = _ray()
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)):
        return UserError(f"a Ray worker died during {what}: {one_line(exc)[:300]}; the run's last checkpoint "
                         "can be continued with --resume")
    if isinstance(exc, ray.exceptions.RayTaskError):
        return UserError(f"{what} failed in a Ray worker: {one_line(exc.cause if exc.cause else exc)[:300]}")
    return UserError(f"{what} failed in Ray: {one_line(exc)[:300]}")


def shard_by_group(trajs: Sequence[Trajectory], ranks: int) -> list[list[Trajectory]]:
    """Whole groups per rank (advantages are normalised within a group), groups dealt in order."""
    groups: dict[int, list[Trajectory]] = {}
    for t in trajs:
        groups.setdefault(t.group, []).append(t)
    ordered = list(groups.values())
    if len(ordered) % ranks:
        raise UserError(f"{len(ordered)} prompt groups cannot be split evenly over {ranks} data-parallel trainer "
                        f"ranks; make rollout.prompts_per_step a multiple of {ranks}")
    per = len(ordered) // ranks
    return [[t for g in ordered[r * per:(r + 1) * per] for t in g] for r in range(ranks)]
