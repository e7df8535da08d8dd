"""Weight sync: push the trainer's weights into the engine and prove the engine holds them."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .checksum import weights_checksum


def named_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A trainer's weights under Hugging Face names, whole: a transformers model's parameters, or what a model
    split over ranks gathers (Megatron's `named_hf_weights`; every rank of it must call this together)."""
    gather = getattr(model, "named_hf_weights", None)
    if gather is not None:
        return gather()
    return [(name, param.detach()) for name, param in model.named_parameters()]


@dataclass(frozen=True)
class SyncResult:
    transport: str
    seconds: float
    bytes: int
    tensors: int
    trainer_checksum: str
    engine_checksum: str
    weight_version: int

    @property
    def checksums_match(self) -> bool:
        return self.trainer_checksum == self.engine_checksum

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checksums_match": self.checksums_match}


class ColocateSync:
    """Trainer and engine in one process: tensors are copied in memory, cast to the engine's dtype.

    The trainer-side checksum is taken over exactly the tensors sent (after the cast), the
    engine-side one over what the engine holds after the update; a sync is done only when they match.
    """

    name = "colocate"

    def push(self, model: torch.nn.Module, engine: Any) -> SyncResult:
        start = time.perf_counter()
        if hasattr(engine, "cast_for_update"):  # a server engine: it says what it holds (dtype, host memory)
            named = engine.cast_for_update(named_weights(model))
        else:
            engine_params = dict(engine.named_weights())
            named = []
            for name, tensor in named_weights(model):
                target = engine_params.get(name)
                if target is not None:
                    tensor = tensor.to(device=target.device, dtype=target.dtype)
                named.append((name, tensor))
        version = engine.update_weights_from_tensors(named)
        trainer_sum = weights_checksum(named)
        engine_sum = engine.checksum()
        return SyncResult(
            transport=getattr(engine, "colocated_transport", self.name),
            seconds=time.perf_counter() - start,
            bytes=sum(t.numel() * t.element_size() for _, t in named),
            tensors=len(named),
            trainer_checksum=trainer_sum,
            engine_checksum=engine_sum,
            weight_version=version,
        )
