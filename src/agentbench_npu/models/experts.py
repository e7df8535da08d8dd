"""A mixture-of-experts model's expert weights as checkpoints store them and as transformers holds them.

Checkpoints (and Megatron, and SGLang) name each expert's projections apart:
    model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight        [I, H], [I, H], [H, I]
transformers 5 holds one tensor per projection for all of a layer's experts:
    model.layers.L.mlp.experts.gate_up_proj   [E, 2I, H]   (each expert's gate rows, then its up rows)
    model.layers.L.mlp.experts.down_proj      [E, H, I]
Weights synced to an engine and checksummed go by the names the transformers model holds (`fuse_experts`); a
checkpoint is written with the per-expert names (`split_experts`).
"""

from __future__ import annotations

import re
from typing import Collection, Iterable

import torch

PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
FUSED = re.compile(r"^(?P<experts>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)$")

Named = list[tuple[str, torch.Tensor]]


def fuse_experts(named: Iterable[tuple[str, torch.Tensor]], held: Collection[str]) -> Named:
    """`named` with each layer's per-expert tensors stacked into the fused ones that `held` (the names a
    transformers model holds) lists; everything else, and experts a model holds apart, pass through in order."""
    out: Named = []
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in named:
        match = PER_EXPERT.match(name)
        if match is None or f"{match['experts']}.down_proj" not in held:
            out.append((name, tensor))
            continue
        layer = experts.setdefault(match["experts"], {})
        if not layer:
            out.append((match["experts"], tensor))  # a placeholder keeps the layer where its first expert was
        layer.setdefault(match["proj"], {})[int(match["index"])] = tensor
    fused: Named = []
    for name, tensor in out:
        if name not in experts:
            fused.append((name, tensor))
            continue
        parts = experts[name]
        count = len(parts["down_proj"])
        if any(sorted(parts.get(p, {})) != list(range(count)) for p in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"{name}: the per-expert tensors are incomplete ({ {p: len(v) for p, v in parts.items()} })")
        fused.append((f"{name}.gate_up_proj", torch.stack([torch.cat([parts["gate_proj"][e], parts["up_proj"][e]])
                                                           for e in range(count)])))
        fused.append((f"{name}.down_proj", torch.stack([parts["down_proj"][e] for e in range(count)])))
    return fused


def split_experts(named: Iterable[tuple[str, torch.Tensor]]) -> Named:
    """The inverse of `fuse_experts`: fused expert tensors as per-expert checkpoint tensors."""
    out: Named = []
    for name, tensor in named:
        match = FUSED.match(name)
        if match is None:
            out.append((name, tensor))
        elif match["proj"] == "gate_up_proj":
            for e, both in enumerate(tensor):
                gate, up = both.chunk(2)
                out += [(f"{match['experts']}.{e}.gate_proj.weight", gate), (f"{match['experts']}.{e}.up_proj.weight", up)]
        else:
            out += [(f"{match['experts']}.{e}.down_proj.weight", down) for e, down in enumerate(tensor)]
    return out


def transformers_weight_names(config: object) -> set[str]:
    """The parameter and buffer names the transformers model of `config` holds (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
