"""Mixture-of-experts routing: find a model's routers, capture the experts they choose, replay a recorded choice.

Routed experts are laid out as SGLang returns them (`return_routed_experts`): one row per forwarded token,
`[tokens, num_hidden_layers, top_k]` int32, -1 in layers without experts. The engine captures them while it
generates; the trainer replays them (rollout routing replay, R3): in each MoE layer the top-k selection is
replaced by the recorded experts, while their weights are re-normalised over the training router's own
probabilities, so the router still gets gradients.

A router here is a module with `top_k` and `num_experts` whose forward returns `(router_logits, weights,
indices)`: the contract of transformers' Qwen3-MoE family (`Qwen3MoeTopKRouter`). Capture works for any such
router. Replay recomputes the weights as a softmax over the router logits, taken at the chosen experts: each
replayed pass first checks that this reproduces the router's own weights for its own choice, and refuses a
router that scores otherwise (sigmoid scores with a bias, as DeepSeek-V3's) rather than replay it wrongly. An
MoE model whose routers cannot be hooked at all runs without capture; asking to replay it is an error.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import UserError

EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


class RoutingError(RuntimeError):
    """Recorded routes that do not fit the forward pass they were meant for."""


@dataclass(frozen=True)
class MoeSpec:
    num_layers: int  # every decoder layer: routes have one slot per layer, -1 where a layer has no experts
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    norm_topk_prob: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "moe_layers": list(self.moe_layers), "norm_topk_prob": self.norm_topk_prob}


def checkpoint_is_moe(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's config.json describes a mixture-of-experts model."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return any(int(text.get(key) or 0) > 0 for key in EXPERT_KEYS)


def model_dir_is_moe(path: str | Path) -> bool:
    try:
        return checkpoint_is_moe(json.loads((Path(path) / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def routes_shape(model_dir: str | Path) -> tuple[int, int] | None:
    """(num_hidden_layers, experts per token) of an MoE checkpoint from its config.json — the shape of each
    token's recorded routes, for servers that do not describe their experts; None for a dense one."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    top_k = config.get("num_experts_per_tok")
    return (int(config["num_hidden_layers"]), int(top_k)) if top_k and "num_hidden_layers" in config else None


def model_is_moe(name_or_path: str) -> bool:
    """Whether a tiny model name or a checkpoint dir names a mixture-of-experts model (without loading it)."""
    from .tiny import TINY_MODELS

    if name_or_path in TINY_MODELS:
        return checkpoint_is_moe(TINY_MODELS[name_or_path])
    return model_dir_is_moe(Path(name_or_path).expanduser())


def routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router module) of every MoE layer, in layer order."""
    layers = decoder_layers(model)
    found = []
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "top_k") and hasattr(module, "num_experts") and isinstance(
                    getattr(module, "weight", None), torch.Tensor):
                found.append((index, module))
                break
    return found


def moe_spec(model: torch.nn.Module) -> MoeSpec | None:
    """The routing layout of `model`, or None for a dense model."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    if text is None or not any(int(getattr(text, key, 0) or 0) > 0 for key in EXPERT_KEYS):
        return None
    if _layers(model) is None:  # not a transformers decoder (Megatron's GPTModel): its routers are its own
        return None
    found = routers(model)
    if not found:  # served and trained as it is, without routed-expert capture (the trainer refuses replay)
        return None
    first = found[0][1]
    return MoeSpec(num_layers=len(decoder_layers(model)), num_experts=int(first.num_experts), top_k=int(first.top_k),
                   moe_layers=tuple(i for i, _ in found),
                   norm_topk_prob=bool(getattr(first, "norm_topk_prob", getattr(text, "norm_topk_prob", True))))


def _layers(model: torch.nn.Module) -> Any:
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    return getattr(inner, "layers", None)


def decoder_layers(model: torch.nn.Module) -> Any:
    layers = _layers(model)
    if layers is None:
        raise UserError(f"{type(model).__name__}: no decoder layers found (model.model.layers)")
    return layers


@dataclass
class RoutingStats:
    """What the routers did over the valid (non-padding) tokens of one pass."""

    num_experts: int
    top_k: int
    load: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> tokens routed to each expert
    entropy_sum: float = 0.0  # router entropy (nats), summed over (token, layer)
    entropy_count: int = 0
    nonfinite_router_logits: int = 0  # tokens whose router logits hold NaN or Inf
    agree: int = 0  # (token, layer) pairs where the router's own top-k set equals the recorded one
    compared: int = 0

    def add(self, other: RoutingStats) -> None:
        for layer, load in other.load.items():
            self.load[layer] = self.load.get(layer, torch.zeros_like(load)) + load
        self.entropy_sum += other.entropy_sum
        self.entropy_count += other.entropy_count
        self.nonfinite_router_logits += other.nonfinite_router_logits
        self.agree += other.agree
        self.compared += other.compared

    def summary(self) -> dict[str, Any]:
        """Per-step health numbers: the worst layer for load balance, totals for the rest."""
        loads = [load.double() for _, load in sorted(self.load.items())]
        cvs = [float(x.std(unbiased=False) / x.mean()) if x.sum() > 0 else math.inf for x in loads]
        ratios = [float(x.max() / x.min()) if x.min() > 0 else math.inf for x in loads]
        dead = sum(int((x == 0).sum()) for x in loads)
        total = self.num_experts * len(loads)
        # the CV of a total collapse (every token on the same top_k experts) is sqrt(E/k - 1): 1.0 = collapsed
        collapsed = math.sqrt(max(self.num_experts / self.top_k - 1.0, 1e-12))
        return {
            "moe_load_cv": max(cvs, default=0.0),
            "moe_load_imbalance": max(cvs, default=0.0) / collapsed,
            "moe_load_max_min": max(ratios, default=1.0),
            "moe_dead_experts": dead,
            "moe_dead_fraction": dead / total if total else 0.0,
            "moe_router_entropy": self.entropy_sum / self.entropy_count if self.entropy_count else 0.0,
            "moe_router_entropy_max": math.log(self.num_experts),
            "moe_nonfinite_router_logits": self.nonfinite_router_logits,
            "moe_route_agreement": self.agree / self.compared if self.compared else None,
            "moe_expert_load": {str(layer): load.tolist() for layer, load in sorted(self.load.items())},
        }


class RoutingSession:
    """The hooks' state during one forward pass of a batch of N = B*T tokens.

    capture   keep each MoE layer's chosen experts (the engine)
    recorded  [N, num_layers, top_k] routes to replay or to compare with; `use` [N] marks rows that have one
    replay    replace the router's choice with the recorded one where `use` is set
    valid     [N] the tokens the statistics count (not padding); None = no statistics
    """

    def __init__(self, spec: MoeSpec, *, capture: bool = False, recorded: torch.Tensor | None = None,
                 use: torch.Tensor | None = None, replay: bool = False, valid: torch.Tensor | None = None,
                 corrupt: int = 0):
        if replay and recorded is None:
            raise RoutingError("replay needs recorded routes")
        if recorded is not None and tuple(recorded.shape[1:]) != (spec.num_layers, spec.top_k):
            raise RoutingError(f"recorded routes have shape {tuple(recorded.shape)}, the model routes "
                               f"[tokens, {spec.num_layers}, {spec.top_k}]")
        if recorded is not None and use is None:
            use = torch.ones(recorded.shape[0], dtype=torch.bool)
        if recorded is not None and use.shape[0] != recorded.shape[0]:
            raise RoutingError(f"{use.shape[0]} use flags for {recorded.shape[0]} recorded routes")
        self.spec = spec
        self.capture = capture
        self.recorded = recorded
        self.use = use
        self.replay = replay
        self.valid = valid
        self.corrupt = corrupt  # a fault: replayed ids shifted by this much (mod num_experts)
        self.captured: dict[int, torch.Tensor] = {}
        self.calls: dict[int, int] = {}
        self.stats = RoutingStats(spec.num_experts, spec.top_k) if valid is not None else None

    def on_route(self, layer: int, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Any:
        logits, weights, indices = output
        self.calls[layer] = self.calls.get(layer, 0) + 1
        n = logits.shape[0]
        if self.recorded is not None and n != self.recorded.shape[0]:
            raise RoutingError(f"layer {layer} routed {n} tokens, but {self.recorded.shape[0]} recorded routes "
                               "were given for this pass")
        chosen = indices
        if self.replay:
            recorded = self.recorded[:, layer].to(indices.device, torch.long)
            use = self.use.to(indices.device)[:, None]
            if bool(((recorded < 0) & use).any()):
                raise RoutingError(f"recorded routes hold -1 in MoE layer {layer}: they were recorded for a "
                                   "model with a different layer layout")
            if self.corrupt:
                recorded = (recorded + self.corrupt) % self.spec.num_experts
            probs = torch.softmax(logits.float(), dim=-1)
            self._check_softmax_weights(layer, probs, weights, indices)
            chosen = torch.where(use, recorded, indices)
            weights = self._weights(probs, chosen).to(weights.dtype)
            output = (logits, weights, chosen)
        if self.capture:
            self.captured[layer] = chosen.detach().to("cpu", torch.int32)
        if self.stats is not None:
            self._count(layer, logits.detach(), indices.detach(), chosen.detach())
        return output if self.replay else None

    def _weights(self, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        top = probs.gather(-1, chosen)
        return top / top.sum(-1, keepdim=True) if self.spec.norm_topk_prob else top

    def _check_softmax_weights(self, layer: int, probs: torch.Tensor, weights: torch.Tensor,
                               indices: torch.Tensor) -> None:
        """Replay's weights, computed for the router's own choice, must be the router's own weights."""
        finite = torch.isfinite(probs).all(-1)
        mine = self._weights(probs[finite], indices[finite])
        theirs = weights.detach()[finite].float()
        if not torch.allclose(mine, theirs, rtol=2e-2, atol=1e-3):
            raise RoutingError(f"the router of MoE layer {layer} does not weight its experts by a softmax over its "
                               f"logits{' renormalised over the top-k' if self.spec.norm_topk_prob else ''}; replay "
                               "would give the recorded experts wrong weights (sigmoid or biased routers are not "
                               "supported)")

    def _count(self, layer: int, logits: torch.Tensor, natural: torch.Tensor, chosen: torch.Tensor) -> None:
        valid = self.valid.to(logits.device)
        finite = torch.isfinite(logits).all(-1)
        s = self.stats
        s.nonfinite_router_logits += int((valid & ~finite).sum())
        keep = valid & finite
        s.load[layer] = s.load.get(layer, torch.zeros(self.spec.num_experts, dtype=torch.long)) + torch.bincount(
            chosen[keep].reshape(-1).cpu(), minlength=self.spec.num_experts)[: self.spec.num_experts]
        logp = torch.log_softmax(logits[keep].float(), dim=-1)
        s.entropy_sum += float(-(logp.exp() * logp).sum())
        s.entropy_count += int(keep.sum())
        if self.recorded is not None:
            compare = keep & self.use.to(logits.device)
            recorded = self.recorded[:, layer].to(logits.device, torch.long)[compare].sort(-1).values
            s.agree += int((natural[compare].sort(-1).values == recorded).all(-1).sum())
            s.compared += int(compare.sum())

    def routes(self) -> torch.Tensor:
        """[N, num_layers, top_k] int32 of the captured choice, -1 in layers without experts."""
        if not self.captured:
            raise RoutingError("no MoE layer ran during capture")
        n = next(iter(self.captured.values())).shape[0]
        out = torch.full((n, self.spec.num_layers, self.spec.top_k), -1, dtype=torch.int32)
        for layer, ids in self.captured.items():
            out[:, layer] = ids
        return out

    def check_complete(self) -> None:
        """Every MoE layer routed exactly once: recorded routes were all consumed, none twice."""
        wrong = {layer: self.calls.get(layer, 0) for layer in self.spec.moe_layers if self.calls.get(layer, 0) != 1}
        if wrong:
            detail = ", ".join(f"layer {layer}: {count} times" for layer, count in sorted(wrong.items()))
            raise RoutingError(f"each MoE layer must route once per forward pass; {detail} (gradient checkpointing "
                               "re-runs layers outside the replay and is not supported with it)")


@contextlib.contextmanager
def routing(model: torch.nn.Module, spec: MoeSpec, **session: Any) -> Iterator[RoutingSession]:
    """Hook every router of `model` for one forward pass (see RoutingSession for the options)."""
    state = RoutingSession(spec, **session)
    handles = [module.register_forward_hook(lambda _m, _a, out, layer=layer: state.on_route(layer, out))
               for layer, module in routers(model)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
    state.check_complete()
