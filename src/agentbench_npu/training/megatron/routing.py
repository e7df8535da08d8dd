"""What Megatron's routers did in a forward, as the routing statistics the trainer reports (models/moe.py).

Megatron routes with its own TopKRouter, not with the transformers modules whose routing the harness hooks and
replays (models/moe.py). Here a forward hook on each router reads its logits and the experts it chose, over the
tokens that are not padding, so that the moe_health gate sees a Megatron run as it sees a torch one. Replaying
recorded routes (R3) through Megatron's routers is not done: the trainer refuses routing_replay with it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ...models.moe import MoeSpec, RoutingStats


def routers(gpt: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, TopKRouter) of every MoE layer of a Megatron GPTModel, in layer order."""
    found = []
    for index, layer in enumerate(gpt.decoder.layers):
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None:
            found.append((index, router))
    return found


def routing_spec(gpt: torch.nn.Module, layout: Any) -> MoeSpec | None:
    """The routing layout of a Megatron GPTModel (None when it is dense)."""
    found = routers(gpt)
    if not layout.num_experts or not found:
        return None
    return MoeSpec(num_layers=len(gpt.decoder.layers), num_experts=layout.num_experts, top_k=int(gpt.config.moe_router_topk),
                   moe_layers=tuple(i for i, _ in found), norm_topk_prob=not gpt.config.moe_router_pre_softmax)


@contextlib.contextmanager
def observed(gpt: torch.nn.Module, valid: torch.Tensor, stats: RoutingStats, *, tp_rank: int = 0,
             tp: int = 1) -> Iterator[None]:
    """Add to `stats` what every router does during the forward inside the block. `valid` [rows, width]: the
    tokens that count, in the shape the model runs (padding included). Megatron's routers see tokens sequence-major
    ([width, rows] flattened), with sequence parallelism only this TP rank's slice of the sequence: then each
    router's counts are summed over the TP ranks (they run every forward together) before they are added."""
    seen = valid.t()
    split = bool(gpt.config.sequence_parallel) and tp > 1
    if split:
        seen = seen.chunk(tp)[tp_rank]
    counted = seen.reshape(-1).to("cpu")

    def hook(layer: int):
        def record(module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
            with torch.no_grad():
                logits = module.gating(inputs[0]).reshape(-1, stats.num_experts).float().to("cpu")
                chosen = output[1].reshape(-1, stats.num_experts).to("cpu")
            logits, chosen = logits[counted], chosen[counted]
            finite = torch.isfinite(logits).all(-1)
            probs = torch.softmax(logits[finite], dim=-1)
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
            counts = torch.cat([chosen.sum(0).double(), torch.stack([
                (~finite).sum().double(), entropy.double(), finite.sum().double()])])
            if split:
                counts = _summed_over_tp(counts, next(module.parameters()).device)
            load = counts[:-3].round().long()
            stats.load[layer] = stats.load.get(layer, torch.zeros_like(load)) + load
            stats.nonfinite_router_logits += int(counts[-3])
            stats.entropy_sum += float(counts[-2])
            stats.entropy_count += int(counts[-1])
        return record

    handles = [router.register_forward_hook(hook(layer)) for layer, router in routers(gpt)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _summed_over_tp(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    on_device = counts.to(device, torch.float32)  # counts per forward stay far below 2**24; hccl takes no float64
    torch.distributed.all_reduce(on_device, group=ps.get_tensor_model_parallel_group())
    return on_device.to("cpu", torch.float64)
