"""A torch-native GRPO trainer: log-probs recomputed on rollout tokens, PPO-clip, token-mean loss.

One `train_step` takes a batch of trajectories whose rewards are set, computes group-normalised
advantages, recomputes the log-probs of every response token with the current weights (that is the
"old" policy and the number compared against the engine's rollout log-probs), then runs
`num_minibatches` optimizer steps, each over micro-batches whose gradients accumulate.

On MoE models the trainer reads the engine's recorded routes (models/moe.py): with `routing_replay` (R3)
every forward of the step uses them; with `routing_compare` the step also measures the mismatch the other
way (one more forward without gradients), and reports how often its own router agreed with the engine's.
A minibatch whose loss or gradients are not finite is not applied (its optimizer step is skipped, counted).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..engines.sampling import sampling_logprobs
from ..models.moe import RoutingError, RoutingStats, checkpoint_is_moe, moe_spec, routing
from ..types import Trajectory
from .batch import PackedBatch, even_rows, pack, rows_of
from .losses import group_advantages, k3, ppo_clip_loss


LOGP_FLOOR = -1e4  # stands in for -inf where a trainable token fell outside the truncated distribution


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    grad_clip: float = 1.0
    eps_clip: float = 0.2
    eps_clip_high: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    num_minibatches: int = 1
    shuffle_minibatches: bool = True  # trajectories are dealt to minibatches by the global torch RNG
    micro_batch_size: int = 16
    advantage_std_norm: bool = True
    routing_replay: bool = False  # MoE: replay the engine's recorded experts in every forward (R3)
    routing_compare: bool = True  # MoE: also measure the train/rollout mismatch with replay the other way
    # the sampling distribution's definition (engines/sampling.py), so log-probs agree with rollout
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


class Trainer:
    def __init__(self, model: torch.nn.Module, config: TrainConfig, device: torch.device, pad_id: int,
                 process_group: Any = None, reference: torch.nn.Module | None = None):
        """`process_group`: the data-parallel group when several ranks each train on a shard.
        `reference`: the frozen policy of the KL term (default: a copy of `model` as it is now)."""
        self.model = model
        self.group = process_group
        self.config = config
        self.device = device
        self.pad_id = pad_id
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
        )
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        self.moe = moe_spec(model)
        # a model that observes its own routers (Megatron's: training/megatron/routing.py) gives statistics only
        self.observe = getattr(model, "observe_routing", None) if self.moe is None else None
        if self.observe is not None:
            self.moe = model.routing_spec
            if self.moe is None:
                self.observe = None
            elif config.routing_replay:
                raise RoutingError(f"train.routing_replay: {type(model).__name__} routes with its own routers, which "
                                   "this harness observes but does not replay; use the torch trainer for R3")
        if config.routing_replay and self.moe is None:
            why = ("has no router this harness can hook (softmax top-k routers returning (logits, weights, indices), "
                   "as transformers' Qwen3-MoE)" if checkpoint_is_moe(model.config.to_dict()) else "is dense")
            raise RoutingError(f"train.routing_replay needs a mixture-of-experts model; {type(model).__name__} {why}")
        self.corrupt_routes = 0  # the corrupt-routing fault: replayed expert ids shifted by this much
        self.ref_model = None
        if config.kl_coef > 0:
            self.ref_model = (reference if reference is not None else copy.deepcopy(model)).eval().requires_grad_(False)

    # -- log-probs ---------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, batch: PackedBatch, replay: bool | None = None,
                 stats: RoutingStats | None = None) -> torch.Tensor:
        """The model's logits for the batch; on MoE models through the routing hooks (replay per config
        unless `replay` says otherwise; `stats` collects what the routers did)."""
        if self.moe is None:
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        if self.observe is not None:
            with self.observe(batch.attention_mask, stats) if stats is not None else contextlib.nullcontext():
                return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        replay = self.config.routing_replay if replay is None else replay
        recorded = use = None
        if batch.routes is not None:
            recorded = batch.routes.reshape(-1, *batch.routes.shape[2:])
            use = batch.route_mask.reshape(-1)
        valid = batch.attention_mask.reshape(-1).bool() if stats is not None else None
        with routing(model, self.moe, recorded=recorded, use=use, replay=replay and recorded is not None,
                     valid=valid, corrupt=self.corrupt_routes) as session:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        if stats is not None:
            stats.add(session.stats)
        return logits

    def _logprobs(self, model: torch.nn.Module, batch: PackedBatch, *, truncate: bool = True,
                  with_entropy: bool = False, with_full: bool = False, replay: bool | None = None,
                  stats: RoutingStats | None = None) -> dict[str, torch.Tensor]:
        """Per-position log-probs of the targets: `logp` under the sampling distribution (truncated
        when `truncate`), `entropy` of that distribution, and `full` under temperature alone."""
        logits = self._forward(model, batch, replay, stats)[:, :-1]
        c = self.config
        top_p, top_k = (c.top_p, c.top_k) if truncate else (1.0, -1)
        lp_all = sampling_logprobs(logits, c.temperature, top_p, top_k)
        logp = lp_all.gather(-1, batch.targets[..., None])[..., 0]
        # Positions outside the response (and tokens the truncation cut) have log-prob -inf; they
        # must not turn the loss or its gradient into NaN, so they read 0 (masked) or a finite floor
        # (trainable: the log-prob gate then shows the gap instead of the optimizer eating NaN).
        logp = torch.where(batch.loss_mask > 0, logp.clamp(min=LOGP_FLOOR), torch.zeros_like(logp))
        result = {"logp": logp}
        if with_entropy:
            finite = lp_all.masked_fill(torch.isinf(lp_all), 0.0)
            result["entropy"] = -(finite.exp() * finite).sum(-1)
        if with_full:
            if top_p >= 1.0 and top_k == -1:
                result["full"] = logp
            else:
                full = sampling_logprobs(logits, c.temperature).gather(-1, batch.targets[..., None])[..., 0]
                result["full"] = torch.where(batch.loss_mask > 0, full, torch.zeros_like(full))
        return result

    @torch.no_grad()
    def recompute_logprobs(self, batch: PackedBatch, model: torch.nn.Module | None = None,
                           truncate: bool = True, replay: bool | None = None,
                           stats: RoutingStats | None = None) -> torch.Tensor:
        model = model or self.model
        was_training = model.training
        model.eval()
        parts = []
        mbs = self.config.micro_batch_size
        for start in range(0, batch.input_ids.shape[0], mbs):
            parts.append(self._logprobs(model, rows_of(batch, slice(start, start + mbs)), truncate=truncate,
                                        replay=replay, stats=stats)["logp"])
        model.train(was_training)
        return torch.cat(parts)

    def logprobs_for(self, trajs: Sequence[Trajectory]) -> list[list[float]]:
        """The trainer's log-probs of each trajectory's response tokens (for probes and gates)."""
        batch = pack(trajs, [0.0] * len(trajs), self.pad_id, self.device)
        logp = self.recompute_logprobs(batch)
        return [logp[i][batch.response_mask[i] > 0].tolist() for i in range(len(trajs))]

    # -- data parallel ------------------------------------------------------------------------
    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) scalars over the data-parallel ranks; identity on one rank."""
        if self.group is None:
            return values
        import torch.distributed as dist

        # on the training device: nccl / hccl groups take no host tensors
        t = torch.tensor(values, dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def _reduce_gradients(self) -> None:
        """Sum gradients over ranks (each rank's loss is already divided by the global token count). A model split
        over ranks says which group sums which of its parameters (Megatron: experts over expert-data-parallel)."""
        if self.group is None:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in self.model.parameters():  # a rank with an empty minibatch still sends a full (zero) buffer
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        split = getattr(self.model, "gradient_groups", None)
        trained = [p for p in self.model.parameters() if p.grad is not None]
        for group, params in (split(self.group) if split is not None else [(self.group, trained)]):
            grads = [p.grad for p in params if p.grad is not None]
            if group is None or not grads:
                continue
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, trajs: Sequence[Trajectory]) -> dict[str, Any]:
        c = self.config
        trajs = [t for t in trajs if t.response_length > 0]
        if not self._any_rank(bool(trajs)):  # every request aborted (non-finite logits, say): record it, change nothing
            self.scheduler.step()
            return self._nothing_trained()
        if not trajs:
            raise ValueError("this data-parallel rank's shard has no response to train on while other ranks' have")
        if c.routing_replay:
            missing = [t.task_id for t in trajs if t.num_trainable and t.routed_experts is None]
            if missing:
                raise RoutingError(f"train.routing_replay is on, but {len(missing)} trajectories with trainable tokens "
                                   f"carry no routed experts (first: task {missing[0]}); the scenario's rollout must "
                                   "pass the engine's result.routed_experts to append_model_tokens")
        adv = group_advantages([float(t.reward or 0.0) for t in trajs], [t.group for t in trajs],
                               normalise_std=c.advantage_std_norm)
        if c.shuffle_minibatches and c.num_minibatches > 1:
            order = torch.randperm(len(trajs)).tolist()
            trajs, adv = [trajs[i] for i in order], [adv[i] for i in order]
        batch = pack(trajs, adv, self.pad_id, self.device)
        if getattr(self.model, "lockstep", False):  # ranks that run every forward together need as many rows
            batch = even_rows(batch, int(self._all_reduce([float(len(trajs))], op="max")[0]), self.pad_id)
        routing_stats = RoutingStats(self.moe.num_experts, self.moe.top_k) if self.moe is not None else None
        old_logp = self.recompute_logprobs(batch, stats=routing_stats)
        # the reference case of the routing comparison, with the same weights (before this step's updates)
        other_logp = other_stats = None
        # decided alike on every data-parallel rank (each joins the same collectives), even one whose shard
        # holds no recorded route: its comparison pass then simply routes on its own both ways
        if (routing_stats is not None and c.routing_compare and self.observe is None
                and self._any_rank(batch.routes is not None)):
            # with replay on, the route agreement is read here: how often the trainer's router, left to itself
            # over its own hidden states, picks the engine's experts
            other_stats = RoutingStats(self.moe.num_experts, self.moe.top_k) if c.routing_replay else None
            other_logp = self.recompute_logprobs(batch, replay=not c.routing_replay, stats=other_stats)
        mask = batch.loss_mask
        nonfinite_logprobs = int((~torch.isfinite(old_logp) & (mask > 0)).sum())
        gap = (old_logp - batch.rollout_logprobs).abs() * mask
        diff = gap[mask > 0]
        worst = None
        if diff.numel():
            row, col = divmod(int(torch.argmax(gap)), gap.shape[1])
            t = trajs[row]
            worst = {"task_id": t.task_id, "sample": t.metadata.get("sample"),
                     "response_position": col - (len(t.prompt_ids) - 1), "abs_diff": float(gap[row, col]),
                     "train_logprob": float(old_logp[row, col]), "rollout_logprob": float(batch.rollout_logprobs[row, col])}
        mismatch_kl = k3(old_logp.double(), batch.rollout_logprobs.double())[mask > 0]
        # the KL to the reference is taken over full (temperature-only) distributions: under top-k/top-p
        # the policy keeps tokens the frozen reference cuts, which would make a truncated KL infinite
        ref_logp = self.recompute_logprobs(batch, self.ref_model, truncate=False) if self.ref_model is not None else None

        self.model.train()
        n = batch.input_ids.shape[0]
        k = max(1, c.num_minibatches)
        sums = {"loss": 0.0, "entropy": 0.0, "ref_kl": 0.0, "ppo_kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
        updates = 0
        nonfinite_loss = skipped = 0
        # exactly k optimizer steps, whatever n is: every data-parallel rank joins the same collectives
        bounds = [round(i * n / k) for i in range(k + 1)]
        for mb_start, mb_stop in zip(bounds, bounds[1:]):
            mb_rows = slice(mb_start, mb_stop)
            mb_tokens = max(1.0, self._all_reduce([float(mask[mb_rows].sum())])[0])
            self.optimizer.zero_grad(set_to_none=True)
            stats = {k: 0.0 for k in sums if k != "grad_norm"}
            for start in range(mb_rows.start, mb_rows.stop, c.micro_batch_size):
                rows = slice(start, min(mb_rows.stop, start + c.micro_batch_size))
                micro = rows_of(batch, rows)
                m = micro.loss_mask
                out = self._logprobs(self.model, micro, with_entropy=True, with_full=ref_logp is not None)
                logp, entropy = out["logp"], out["entropy"]
                old = old_logp[rows]
                adv_tok = micro.advantages[:, None].expand_as(logp)
                pg, clipped = ppo_clip_loss(logp, old, adv_tok, c.eps_clip, c.eps_clip_high)
                total = pg - c.entropy_coef * entropy
                if ref_logp is not None:
                    kl = k3(out["full"], ref_logp[rows])
                    total = total + c.kl_coef * kl
                    stats["ref_kl"] += float((kl.detach() * m).sum()) / mb_tokens
                loss = (total * m).sum() / mb_tokens
                nonfinite_loss += int(not torch.isfinite(loss.detach()))
                loss.backward()
                stats["loss"] += float(loss.detach())
                stats["entropy"] += float((entropy.detach() * m).sum()) / mb_tokens
                stats["ppo_kl"] += float(((old - logp.detach()) * m).sum()) / mb_tokens
                stats["clip_fraction"] += float((clipped * m).sum()) / mb_tokens
            finish = getattr(self.model, "finish_gradients", None)  # a model split over ranks (Megatron's TP)
            if finish is not None:
                finish()
            self._reduce_gradients()
            clip = getattr(self.model, "clip_grad_norm_", None)  # ... whose norm sums over its shards
            grad_norm = (clip(c.grad_clip) if clip is not None
                         else torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip))
            if torch.isfinite(grad_norm):  # the norm is of the all-reduced gradients: every rank decides alike
                self.optimizer.step()
            else:  # a NaN/Inf gradient would poison every weight it touches: skip, and say so
                skipped += 1
            for k, v in zip(stats, self._all_reduce(list(stats.values()))):
                sums[k] += v
            sums["grad_norm"] += float(grad_norm)
            updates += 1
        self.scheduler.step()
        self.model.eval()
        means = {k: v / updates for k, v in sums.items()}
        diff_sum, kl_sum, count = self._all_reduce([float(diff.sum()), float(mismatch_kl.sum()), float(diff.numel())])
        (diff_max,) = self._all_reduce([float(diff.max()) if diff.numel() else 0.0], op="max")
        nonfinite = self._all_reduce([float(nonfinite_logprobs), float(nonfinite_loss)])
        return {
            **means,
            "nonfinite_logprobs": int(nonfinite[0]),
            "nonfinite_loss": int(nonfinite[1]),
            "skipped_updates": skipped,
            **(self._routing_metrics(batch, other_logp, diff_sum / count if count else 0.0,
                                     kl_sum / count if count else 0.0, routing_stats, other_stats)
               if routing_stats is not None else {}),
            "ref_kl": means["ref_kl"] if ref_logp is not None else None,
            "kl": kl_sum / count if count else 0.0,
            "logprob_abs_diff_mean": diff_sum / count if count else 0.0,
            "logprob_abs_diff_max": diff_max,
            "logprob_worst_token": worst,
            "trainable_tokens": int(mask.sum()),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "advantage_abs_mean": float(batch.advantages[:len(trajs)].abs().mean()),
        }

    def _any_rank(self, flag: bool) -> bool:
        return self._all_reduce([1.0 if flag else 0.0], op="max")[0] > 0

    def _reduce_stats(self, stats: RoutingStats) -> RoutingStats:
        """Every data-parallel rank's routing counts summed (in place)."""
        assert self.moe is not None
        layers = list(self.moe.moe_layers)  # the same vector on every rank, whatever routed locally
        zeros = torch.zeros(stats.num_experts, dtype=torch.long)
        flat = [float(x) for layer in layers for x in stats.load.get(layer, zeros).tolist()]
        flat += [stats.entropy_sum, stats.entropy_count, stats.nonfinite_router_logits, stats.agree, stats.compared]
        flat = self._all_reduce(flat)
        e = stats.num_experts
        for j, layer in enumerate(layers):
            stats.load[layer] = torch.tensor(flat[j * e:(j + 1) * e]).round().long()
        (stats.entropy_sum, stats.entropy_count, stats.nonfinite_router_logits, stats.agree,
         stats.compared) = flat[len(layers) * e:]
        return stats

    def _routing_metrics(self, batch: PackedBatch, other: torch.Tensor | None, diff_mean: float, kl_mean: float,
                         stats: RoutingStats, other_stats: RoutingStats | None) -> dict[str, Any]:
        """MoE health of the step's old-log-prob pass; with `other` (the log-probs with replay the other way,
        same weights) the mismatch both ways; route agreement from the pass without replay."""
        c = self.config
        out = self._reduce_stats(stats).summary()
        if other_stats is not None:
            out["moe_route_agreement"] = self._reduce_stats(other_stats).summary()["moe_route_agreement"]
        out["moe_routing_replay"] = c.routing_replay
        out["moe_routes_recorded"] = self._any_rank(batch.routes is not None)
        if other is not None:
            mask = batch.loss_mask > 0
            gap = (other - batch.rollout_logprobs).abs()[mask]
            kl = k3(other.double(), batch.rollout_logprobs.double())[mask]
            o_diff, o_kl, count = self._all_reduce([float(gap.sum()), float(kl.sum()), float(gap.numel())])
            o_diff, o_kl = (o_diff / count, o_kl / count) if count else (0.0, 0.0)
            on, off = ((diff_mean, kl_mean), (o_diff, o_kl)) if c.routing_replay else ((o_diff, o_kl), (diff_mean, kl_mean))
            out.update({"logprob_abs_diff_mean_replay": on[0], "kl_replay": on[1],
                        "logprob_abs_diff_mean_no_replay": off[0], "kl_no_replay": off[1]})
        return out

    def _nothing_trained(self) -> dict[str, Any]:
        """The metrics of a step that had no response token to train on (the update is skipped)."""
        return {"loss": 0.0, "entropy": 0.0, "ref_kl": None, "ppo_kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0,
                "kl": 0.0, "logprob_abs_diff_mean": 0.0, "logprob_abs_diff_max": 0.0, "logprob_worst_token": None,
                "trainable_tokens": 0, "lr": float(self.scheduler.get_last_lr()[0]), "advantage_abs_mean": 0.0,
                "nonfinite_logprobs": 0, "nonfinite_loss": 0, "skipped_updates": max(1, self.config.num_minibatches)}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
