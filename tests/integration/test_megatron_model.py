"""The Megatron trainer's model against real megatron-core, on the CPU over gloo (tests/support/megatron_cpu.py).

What the name mapping (convert.py) claims is checked where it matters: Megatron-core's own GPTModel takes every
tensor with no name or shape left over, computes the logits transformers computes from the same checkpoint, and
gives the checkpoint back bit for bit, on one rank and split over tensor or expert parallel ranks; a training
step through it (gradients summed where TP ranks hold partial ones, the norm taken over all shards) moves the
weights as the same step does in transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from agentbench_npu.models.loading import load_causal_lm, resolve_model_dir
from tests.support.megatron_cpu import spawn_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA host runs Megatron on its GPU (tests/device/)")

TOKENS = torch.randint(0, 512, (3, 14), generator=torch.Generator().manual_seed(0))


def _megatron(name: str, tp: int, ep: int, world: int):
    from agentbench_npu.training.megatron.config import Parallel
    from agentbench_npu.training.megatron.model import initialize, load_megatron_lm

    parallel = Parallel.for_world(world, tp=tp, ep=ep)
    initialize(parallel, "cpu")
    return load_megatron_lm(resolve_model_dir(name), parallel)


def logits_and_export(rank: int, name: str, tp: int, ep: int, world: int) -> tuple[torch.Tensor, dict]:
    model = _megatron(name, tp, ep, world).eval()
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    return logits, model.hf_state_dict()


def one_sgd_step(rank: int, name: str, tp: int, ep: int, world: int) -> tuple[dict, float]:
    from megatron.core import parallel_state as ps

    model = _megatron(name, tp, ep, world).train()
    tokens = _shard(rank, ep)
    _loss(model(input_ids=tokens).logits, tokens, _total(ep)).backward()
    model.finish_gradients()
    # what the trainer's data-parallel reduction does with a model split over ranks
    dp = ps.get_data_parallel_group() if ps.get_data_parallel_world_size() > 1 else None
    for group, params in model.gradient_groups(dp):
        for p in params:
            if group is not None and p.grad is not None:
                torch.distributed.all_reduce(p.grad, group=group)
    norm = float(model.clip_grad_norm_(1e9))  # the whole model's gradient norm (nothing is scaled at 1e9)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    return model.hf_state_dict(), norm


# with EP, each data rank trains on its own rows, of its own shape (the forward evens them out over the EP group)
SHARDS = [TOKENS[:2], TOKENS[2:, :9]]


def _shard(rank: int, ep: int) -> torch.Tensor:
    return SHARDS[rank] if ep > 1 else TOKENS  # TP ranks share their data


def _total(ep: int) -> int:
    return sum(t[:, 1:].numel() for t in (SHARDS if ep > 1 else [TOKENS]))


def _loss(logits: torch.Tensor, tokens: torch.Tensor = TOKENS, total: int | None = None) -> torch.Tensor:
    """Token cross-entropy summed over `tokens` and divided by the whole batch's count (so ranks' losses add up)."""
    summed = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               tokens[:, 1:].reshape(-1), reduction="sum")
    return summed / (total or tokens[:, 1:].numel())


def _reference(name: str):
    path = resolve_model_dir(name)
    return load_causal_lm(path), load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("name, tp, ep, world", [("tiny", 1, 1, 1), ("tiny", 2, 1, 2), ("tiny-moe", 1, 1, 1),
                                                 ("tiny-moe", 1, 2, 2)])
def test_megatron_computes_the_logits_transformers_does_and_gives_the_checkpoint_back(name, tp, ep, world):
    hf_model, saved = _reference(name)
    with torch.no_grad():
        expected = hf_model(TOKENS).logits
    results = spawn_ranks(world, logits_and_export, name, tp, ep, world)
    for rank, (logits, _) in enumerate(results):
        assert (logits - expected).abs().max() < 1e-5, f"rank {rank}"
    exported = results[0][1]  # gathered on the first rank only: the others send their parts
    assert set(exported) == set(saved) and all(not other for _, other in results[1:])
    for key, tensor in saved.items():
        assert torch.equal(exported[key], tensor), key


@pytest.mark.parametrize("name, tp, ep, world", [("tiny", 1, 1, 1), ("tiny", 2, 1, 2), ("tiny-moe", 1, 1, 1),
                                                 ("tiny-moe", 1, 2, 2)])
def test_a_gradient_step_through_megatron_moves_the_weights_as_in_transformers(name, tp, ep, world, tmp_path):
    hf_model, saved = _reference(name)
    for rank in range(world if ep > 1 else 1):  # the whole batch, as the data ranks hold it between them
        tokens = _shard(rank, ep)
        _loss(hf_model(tokens).logits, tokens, _total(ep)).backward()
    hf_norm = float(torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1e9))
    with torch.no_grad():
        for p in hf_model.parameters():
            p -= 0.5 * p.grad
    hf_model.save_pretrained(tmp_path)  # under the checkpoint's names (transformers fuses experts in memory)
    expected = load_file(str(tmp_path / "model.safetensors"))
    results = spawn_ranks(world, one_sgd_step, name, tp, ep, world)
    for rank, (_, norm) in enumerate(results):
        # each TP rank counts its shards and the replicated tensors once, each EP rank its experts: the same
        # norm as the unsplit model's
        assert norm == pytest.approx(hf_norm, rel=1e-5), f"rank {rank}"
    stepped = results[0][0]
    assert set(stepped) == set(saved)
    worst = max((stepped[k] - v).abs().max().item() for k, v in expected.items())
    assert worst < 1e-5, f"weights differ by {worst}"
    # and the step moved them (every expert too): comparing untouched weights would pass trivially
    unmoved = [k for k, v in saved.items() if torch.equal(stepped[k], v) and k in expected]
    assert not unmoved, f"{unmoved[:3]} did not move"


def checksums_before_and_after_drift(rank: int, name: str, tp: int, ep: int, world: int) -> tuple[str, str]:
    model = _megatron(name, tp, ep, world)
    before = model.shard_checksum()
    if rank == world - 1:  # the last rank's copy of a replicated tensor drifts
        with torch.no_grad():
            model.gpt.decoder.final_layernorm.weight.add_(1e-3)
    return before, model.shard_checksum()


@pytest.mark.parametrize("name, tp, ep, world", [("tiny", 1, 1, 2), ("tiny", 2, 1, 2), ("tiny-moe", 1, 2, 2)])
def test_the_shard_checksum_agrees_across_ranks_in_step_and_catches_a_drifted_replica(name, tp, ep, world):
    results = spawn_ranks(world, checksums_before_and_after_drift, name, tp, ep, world)
    befores = {before for before, _ in results}
    assert len(befores) == 1  # data-parallel replicas, TP peers and EP peers in step: one digest
    after_first, after_last = results[0][1], results[-1][1]
    if tp > 1:  # TP peers share digests: the drifted tensor is one they all should hold alike, and all see it
        assert after_first == after_last != results[0][0]
    else:  # a replica (DP, or EP peers' dense layers) drifted on its own: its digest leaves the others'
        assert after_first == results[0][0] and after_last != after_first


def test_a_checkpoint_megatron_does_not_hold_is_refused_naming_the_tensors(tmp_path):
    path = resolve_model_dir("tiny")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    state = load_file(str(path / "model.safetensors"))
    state.pop("model.layers.1.self_attn.k_norm.weight")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(AssertionError, match=r"model.layers.1.self_attn.k_norm.weight"):
        spawn_ranks(1, _load_dir, str(tmp_path))


def _load_dir(rank: int, path: str):
    from pathlib import Path

    from agentbench_npu.training.megatron.config import Parallel
    from agentbench_npu.training.megatron.model import initialize, load_megatron_lm

    initialize(Parallel(), "cpu")
    load_megatron_lm(Path(path), Parallel())
    return json.dumps({"loaded": True})
