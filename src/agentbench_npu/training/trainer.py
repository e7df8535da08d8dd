"""A torch-native GRPO trainer: log-probs recomputed on rollout tokens, PPO-clip, token-mean loss.

One `train_step` takes a batch of trajectories whose rewards are set, computes group-normalised
advantages, recomputes the log-probs of every response token with the current weights (that is the
"old" policy and the number compared against the engine's rollout log-probs), then runs
`num_minibatches` optimizer steps, each over micro-batches whose gradients accumulate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..engines.sampling import sampling_logprobs
from ..types import Trajectory
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
    # the sampling distribution's definition (engines/sampling.py), so log-probs agree with rollout
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass
class PackedBatch:
    """Right-padded token ids and, for each predicting position, the response-token bookkeeping."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L-1] token predicted at each position
    response_mask: torch.Tensor  # [B, L-1] 1 where the target is a response token
    loss_mask: torch.Tensor  # [B, L-1] 1 where the target is trainable
    rollout_logprobs: torch.Tensor  # [B, L-1]
    advantages: torch.Tensor  # [B] per trajectory


def pack(trajs: Sequence[Trajectory], advantages: Sequence[float], pad_id: int, device: torch.device) -> PackedBatch:
    width = max(len(t.tokens) for t in trajs)
    b = len(trajs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp = torch.zeros((b, width - 1))
    loss = torch.zeros((b, width - 1))
    rollout = torch.zeros((b, width - 1))
    for i, t in enumerate(trajs):
        n, p, r = len(t.tokens), len(t.prompt_ids), t.response_length
        ids[i, :n] = torch.tensor(t.tokens)
        attn[i, :n] = 1
        # position p-1 predicts the first response token
        resp[i, p - 1:p - 1 + r] = 1
        loss[i, p - 1:p - 1 + r] = torch.tensor(t.loss_mask, dtype=torch.float32)
        rollout[i, p - 1:p - 1 + r] = torch.tensor(t.rollout_logprobs, dtype=torch.float32)
    return PackedBatch(
        input_ids=ids.to(device), attention_mask=attn.to(device), targets=ids[:, 1:].to(device),
        response_mask=resp.to(device), loss_mask=loss.to(device), rollout_logprobs=rollout.to(device),
        advantages=torch.tensor(list(advantages), dtype=torch.float32, device=device),
    )


def _slice(batch: PackedBatch, rows: slice) -> PackedBatch:
    return PackedBatch(*(getattr(batch, f)[rows] for f in PackedBatch.__dataclass_fields__))


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
        self.ref_model = None
        if config.kl_coef > 0:
            self.ref_model = (reference if reference is not None else copy.deepcopy(model)).eval().requires_grad_(False)

    # -- log-probs ---------------------------------------------------------------------------
    def _logprobs(self, model: torch.nn.Module, batch: PackedBatch, *, truncate: bool = True,
                  with_entropy: bool = False, with_full: bool = False) -> dict[str, torch.Tensor]:
        """Per-position log-probs of the targets: `logp` under the sampling distribution (truncated
        when `truncate`), `entropy` of that distribution, and `full` under temperature alone."""
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = out.logits[:, :-1]
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
                           truncate: bool = True) -> torch.Tensor:
        model = model or self.model
        was_training = model.training
        model.eval()
        parts = []
        mbs = self.config.micro_batch_size
        for start in range(0, batch.input_ids.shape[0], mbs):
            parts.append(self._logprobs(model, _slice(batch, slice(start, start + mbs)), truncate=truncate)["logp"])
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
        """Sum gradients over ranks (each rank's loss is already divided by the global token count)."""
        if self.group is None:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in self.model.parameters():  # a rank with an empty minibatch still sends a full (zero) buffer
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, trajs: Sequence[Trajectory]) -> dict[str, Any]:
        c = self.config
        trajs = [t for t in trajs if t.response_length > 0]
        if not trajs:
            raise ValueError("no trajectory has a response to train on")
        adv = group_advantages([float(t.reward or 0.0) for t in trajs], [t.group for t in trajs],
                               normalise_std=c.advantage_std_norm)
        if c.shuffle_minibatches and c.num_minibatches > 1:
            order = torch.randperm(len(trajs)).tolist()
            trajs, adv = [trajs[i] for i in order], [adv[i] for i in order]
        batch = pack(trajs, adv, self.pad_id, self.device)
        old_logp = self.recompute_logprobs(batch)
        mask = batch.loss_mask
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
        n = len(trajs)
        k = max(1, c.num_minibatches)
        sums = {"loss": 0.0, "entropy": 0.0, "ref_kl": 0.0, "ppo_kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
        updates = 0
        # exactly k optimizer steps, whatever n is: every data-parallel rank joins the same collectives
        bounds = [round(i * n / k) for i in range(k + 1)]
        for mb_start, mb_stop in zip(bounds, bounds[1:]):
            mb_rows = slice(mb_start, mb_stop)
            mb_tokens = max(1.0, self._all_reduce([float(mask[mb_rows].sum())])[0])
            self.optimizer.zero_grad(set_to_none=True)
            stats = {k: 0.0 for k in sums if k != "grad_norm"}
            for start in range(mb_rows.start, mb_rows.stop, c.micro_batch_size):
                rows = slice(start, min(mb_rows.stop, start + c.micro_batch_size))
                micro = _slice(batch, rows)
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
                loss.backward()
                stats["loss"] += float(loss.detach())
                stats["entropy"] += float((entropy.detach() * m).sum()) / mb_tokens
                stats["ppo_kl"] += float(((old - logp.detach()) * m).sum()) / mb_tokens
                stats["clip_fraction"] += float((clipped * m).sum()) / mb_tokens
            self._reduce_gradients()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            for k, v in zip(stats, self._all_reduce(list(stats.values()))):
                sums[k] += v
            sums["grad_norm"] += float(grad_norm)
            updates += 1
        self.scheduler.step()
        self.model.eval()
        means = {k: v / updates for k, v in sums.items()}
        diff_sum, kl_sum, count = self._all_reduce([float(diff.sum()), float(mismatch_kl.sum()), float(diff.numel())])
        (diff_max,) = self._all_reduce([float(diff.max()) if diff.numel() else 0.0], op="max")
        return {
            **means,
            "ref_kl": means["ref_kl"] if ref_logp is not None else None,
            "kl": kl_sum / count if count else 0.0,
            "logprob_abs_diff_mean": diff_sum / count if count else 0.0,
            "logprob_abs_diff_max": diff_max,
            "logprob_worst_token": worst,
            "trainable_tokens": int(mask.sum()),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "advantage_abs_mean": float(batch.advantages.abs().mean()),
        }

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
