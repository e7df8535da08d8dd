"""A Megatron-core GPT model holding a Hugging Face checkpoint, and the way back to Hugging Face names.

    initialize(parallel)                 Megatron's parallel groups over the default process group
    build(hf_config, parallel, ...)      this rank's GPTModel, its weights loaded from the HF state dict
    MegatronCausalLM                     that model behind the interface the GRPO trainer and the checkpoint
                                         code use: `model(input_ids=..., attention_mask=...).logits`,
                                         `hf_state_dict()` (gathered over TP and EP), `save_pretrained(dir)`,
                                         and the hooks the trainer asks a split model for: `finish_gradients`,
                                         `gradient_groups`, `clip_grad_norm_`, `lockstep`, `observe_routing`

The layer spec is Transformer Engine's where it is installed (fused norms, sequence parallelism with TP) and
Megatron-core's local one elsewhere: the local spec's torch norms take no sequence parallelism, so with it
MoE models cannot train with TP > 1 (Megatron's MoE layer requires sequence parallelism then) and we refuse it.
Pipeline parallelism needs Megatron's pipeline schedule, which this wrapper does not drive: pp must be 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ...errors import ConfigError
from ...models.experts import fuse_experts, split_experts, transformers_weight_names
from ...sync.checksum import weights_checksum
from .config import Parallel, model_options, require_megatron, transformer_config
from .convert import Layout, Shards, hf_to_megatron, layout_from_hf, megatron_to_hf
from .routing import observed, routing_spec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def initialize(parallel: Parallel, device: str = "cuda", seed: int = 0) -> None:
    """Megatron's TP / PP / EP / DP groups over the already initialised default process group."""
    require_megatron(device)
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep)
    if device != "cpu":  # the RNG streams Megatron's on-device initialisation forks (its weights are overwritten)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def check_split(hf: Mapping[str, Any], parallel: Parallel) -> None:
    """Refuse what Megatron-core cannot train with the layer spec at hand: its MoE layer trains with TP > 1 only
    under sequence parallelism, which the local spec (no Transformer Engine) lacks."""
    if layout_from_hf(hf).num_experts and parallel.tp > 1 and not has_transformer_engine():
        raise ConfigError("a mixture-of-experts model with megatron.tensor_parallel > 1 trains only with sequence "
                          "parallelism, which needs Transformer Engine (not installed): use tensor_parallel 1 and "
                          "split the experts with megatron.expert_parallel")


def _spec_and_layout(hf: Mapping[str, Any], parallel: Parallel, fused: bool) -> tuple[Any, Layout]:
    from megatron.core.models.gpt import gpt_layer_specs as specs

    layout = replace(layout_from_hf(hf), fused_norms=fused)
    experts = layout.num_experts or None
    if fused:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=False, qk_layernorm=layout.qk_norm)
    else:
        check_split(hf, parallel)
        spec = specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                              qk_layernorm=layout.qk_norm, normalization="RMSNorm")
    return spec, layout


def build(hf: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None, parallel: Parallel, *,
          dtype: str = "float32", device: torch.device | str = "cpu") -> MegatronCausalLM:
    """This rank's share of the model described by config.json `hf`, holding `state` (a full HF state dict)."""
    if parallel.pp != 1:
        raise ConfigError(f"pipeline parallel {parallel.pp}: the Megatron trainer runs pp = 1 (no pipeline "
                          "schedule yet); use tensor or expert parallelism")
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype {dtype!r}: one of {', '.join(TORCH_DTYPES)}")
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    fused = has_transformer_engine()
    spec, layout = _spec_and_layout(hf, parallel, fused)
    options = transformer_config(hf, parallel, dtype=dtype)
    options.update(
        activation_func=torch.nn.functional.silu, params_dtype=TORCH_DTYPES[dtype],
        sequence_parallel=parallel.tp > 1 and fused,
        # initialised and then overwritten by the checkpoint: Megatron marks which tensors TP splits only while
        # initialising them, and the gradient norm and the optimizer read those marks
        use_cpu_initialization=torch.device(device).type == "cpu", perform_initialization=True,
    )
    if torch.device(device).type == "cpu" or not fused:  # the fused kernels are CUDA's, from TE or apex
        options.update(bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                       masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
    gpt = GPTModel(config=TransformerConfig(**options), transformer_layer_spec=spec, **model_options(hf),
                   parallel_output=False)  # every TP rank gets the whole vocabulary's logits
    if state is not None:
        rank = (0, parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank())
        try:
            mine = hf_to_megatron(state, layout, tp=parallel.tp, pp=1, ep=parallel.ep, only=rank)[rank]
        except KeyError as exc:
            raise ConfigError(f"the checkpoint has no tensor {exc.args[0]!r}, which a {hf.get('model_type')} model "
                              f"with this config.json has") from None
        _load_exactly(gpt, mine)
    return MegatronCausalLM(gpt.to(device), hf, layout, parallel)


def _load_exactly(gpt: torch.nn.Module, shard: Mapping[str, torch.Tensor]) -> None:
    """Load a rank's shard; every parameter must be covered and every tensor used, with matching shapes."""
    own = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(own) - set(shard)), sorted(set(shard) - set(own))
    wrong = [f"{k} {tuple(shard[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & shard.keys()
             if tuple(shard[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ConfigError("the checkpoint does not fit Megatron's model: "
                          + "; ".join(f"{what}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
                                      for what, names in (("missing", missing), ("unexpected", unexpected),
                                                          ("shape", wrong)) if names))
    gpt.load_state_dict(dict(shard), strict=False)  # strict would also ask for TE's _extra_state


class _Output:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class MegatronCausalLM(torch.nn.Module):
    """A Megatron GPTModel that reads and writes as a Hugging Face causal LM."""

    def __init__(self, gpt: torch.nn.Module, hf: Mapping[str, Any], layout: Layout, parallel: Parallel):
        super().__init__()
        from transformers import AutoConfig

        self.gpt = gpt
        self.layout = layout
        self.parallel = parallel
        self.hf_config = dict(hf)
        rest = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version")}
        self.config = AutoConfig.for_model(str(hf["model_type"]), **rest)
        self._held: set[str] | None = None  # the names the transformers model holds (experts fused or not)
        self._observe: tuple[torch.Tensor, Any] | None = None  # (valid tokens, RoutingStats) while observing
        self.routing_spec = routing_spec(gpt, layout)  # None when dense

    @contextlib.contextmanager
    def observe_routing(self, valid: torch.Tensor, stats: Any) -> Iterator[None]:
        """Add what the routers do in the forwards inside the block to `stats` (models/moe.RoutingStats), over the
        tokens `valid` [batch, seq] marks (routing.py)."""
        self._observe = (valid, stats)
        try:
            yield
        finally:
            self._observe = None

    @property
    def lockstep(self) -> bool:
        """Whether this rank's forwards exchange tokens with other data ranks (experts split over EP ranks): then
        every EP rank must run every forward, with as many rows (the trainer evens them out, `even_rows`)."""
        return bool(self.layout.num_experts) and self.parallel.ep > 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> _Output:
        """Logits [batch, seq, vocab] for right-padded rows (pads only ever follow the tokens that matter, so
        a causal mask is the whole mask)."""
        b, n = input_ids.shape
        rows, width = (b, n) if not self.lockstep else self._agreed_shape(b, n)
        split = self.parallel.tp if self.gpt.config.sequence_parallel else 1
        width = -(-width // split) * split  # sequence parallelism splits the sequence over TP ranks: pad to fit
        if (rows, width) != (b, n):  # padding after the last token changes nothing before it (causal)
            input_ids = torch.nn.functional.pad(input_ids, (0, width - n, 0, rows - b))
        positions = torch.arange(width, device=input_ids.device).expand(rows, width)
        causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).triu(1)[None, None]  # True = hidden
        watch: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self._observe is not None:
            valid = torch.nn.functional.pad(self._observe[0].bool(), (0, width - n, 0, rows - b), value=False)
            watch = observed(self.gpt, valid, self._observe[1], tp_rank=_tp_rank(), tp=self.parallel.tp)
        with watch:
            return _Output(self.gpt(input_ids, positions, attention_mask=causal)[:b, :n])

    def _agreed_shape(self, rows: int, width: int) -> tuple[int, int]:
        """The largest (rows, width) of this forward over the EP group: Megatron's token dispatcher gathers the
        tokens of every EP rank in tensors of one shape."""
        from megatron.core import parallel_state as ps

        shape = torch.tensor([rows, width], dtype=torch.long, device=self.gpt.embedding.word_embeddings.weight.device)
        torch.distributed.all_reduce(shape, op=torch.distributed.ReduceOp.MAX,
                                     group=ps.get_expert_model_parallel_group())
        return int(shape[0]), int(shape[1])

    def finish_gradients(self) -> None:
        """Sum over the TP ranks the gradients that each rank holds only a part of: the q/k layernorms (shared
        by all heads, each rank sees its own heads) and, with sequence parallelism, every replicated tensor
        (each rank sees its slice of the sequence). Megatron's finalize_model_grads does the same. Call after
        backward, before the data-parallel reduction."""
        if self.parallel.tp == 1:
            return
        from megatron.core import parallel_state
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for name, p in self.gpt.named_parameters()
                 if p.grad is not None and (getattr(p, "sequence_parallel", False)
                                            or "q_layernorm" in name or "k_layernorm" in name)]
        if grads:
            flat = _flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)

    def gradient_groups(self, data_parallel: Any) -> list[tuple[Any, list[torch.nn.Parameter]]]:
        """Which group sums which gradients across data ranks: the dense parameters over the data-parallel group,
        the experts over the ranks holding the same experts (expert-data-parallel; none when EP spans every data
        rank). Megatron marks its experts `allreduce = False`."""
        from megatron.core import parallel_state as ps

        dense = [p for p in self.gpt.parameters() if getattr(p, "allreduce", True)]
        experts = [p for p in self.gpt.parameters() if not getattr(p, "allreduce", True)]
        expert_group = ps.get_expert_data_parallel_group() if ps.get_expert_data_parallel_world_size() > 1 else None
        return [(data_parallel, dense), (expert_group if experts else None, experts)]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that the whole model's norm is at most `max_norm`; returns the norm before.
        Each TP rank counts its shards and, once over the ranks, the tensors they all hold; each EP rank its
        experts."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        grads = [p.grad for p in self.gpt.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        zero = torch.zeros((), device=grads[0].device)
        squares = {"dense": zero.clone(), "experts": zero.clone()}
        for p in self.gpt.parameters():
            if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
                squares["dense" if getattr(p, "allreduce", True) else "experts"] += p.grad.detach().float().pow(2).sum()
        if self.parallel.tp > 1:
            torch.distributed.all_reduce(squares["dense"], group=ps.get_tensor_model_parallel_group())
        if self.layout.num_experts and ps.get_expert_tensor_and_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(squares["experts"], group=ps.get_expert_tensor_and_model_parallel_group())
        norm = (squares["dense"] + squares["experts"]).sqrt()
        scale = max_norm / (norm + 1e-6)
        if torch.isfinite(norm) and scale < 1:
            for g in grads:
                g.mul_(scale.to(g.dtype))
        return norm

    # -- back to Hugging Face ---------------------------------------------------------------------------
    @property
    def first_rank(self) -> bool:
        """Whether this rank is the first of the TP x EP ranks holding one model between them: the one that
        receives the gathered weights (trainer rank 0 for replica 0)."""
        from megatron.core import parallel_state as ps

        return ((self.parallel.tp == 1 or ps.get_tensor_model_parallel_rank() == 0)
                and (self.parallel.ep == 1 or ps.get_expert_model_parallel_rank() == 0))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model under Hugging Face names, gathered from every TP and EP rank into the first rank's host
        memory (every rank must call this together; the others get {}): one tensor at a time passes through
        the device, the whole model never does."""
        shards = self._gathered_shards()
        return megatron_to_hf(shards, self.layout) if shards is not None else {}

    def _gathered_shards(self) -> Shards | None:
        from megatron.core import parallel_state as ps

        tp, ep = self.parallel.tp, self.parallel.ep
        first = self.first_rank
        shards: Shards = {(0, t, e): {} for t in range(tp) for e in range(ep)}
        for name, tensor in self._own().items():
            expert = ".experts." in name
            by_tp = _gather_to_first(tensor, ps.get_expert_tensor_parallel_group() if expert
                                     else ps.get_tensor_model_parallel_group(), tp)
            if by_tp is None:
                continue
            for t, part in enumerate(by_tp):  # experts: the first ETP rank of each EP rank passes its parts on
                by_ep = _gather_to_first(part, ps.get_expert_model_parallel_group(), ep) if expert else [part] * ep
                if first and by_ep is not None:
                    for e, piece in enumerate(by_ep):
                        shards[(0, t, e)][name] = piece.to("cpu")
        return shards if first else None

    def _own(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.gpt.state_dict().items()
                if not k.endswith("_extra_state") and torch.is_tensor(v)}

    def shard_checksum(self) -> str:
        """A digest of the model as this rank holds it with its TP and EP peers, with no weight gathered: each rank
        digests its own dense shards and its experts, and only the digests travel (dense over TP, experts over
        TP x EP). Data-parallel replicas in step get equal digests; a rank whose replicated weights drifted does
        not (the ranks gate)."""
        from megatron.core import parallel_state as ps

        own = self._own()
        dense = weights_checksum([(k, v) for k, v in own.items() if ".experts." not in k])
        experts = weights_checksum([(k, v) for k, v in own.items() if ".experts." in k])
        tp, ep = self.parallel.tp, self.parallel.ep
        device = next(self.gpt.parameters()).device
        digests = (_gather_digests(dense, ps.get_tensor_model_parallel_group(), tp, device)
                   + (_gather_digests(experts, ps.get_expert_tensor_and_model_parallel_group(), tp * ep, device)
                      if self.layout.num_experts else []))
        return hashlib.sha256("|".join(digests).encode()).hexdigest()[:16]

    def named_hf_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The gathered weights under the names the transformers model holds them by (what the torch trainer syncs
        and checksums): a MoE layer's experts fused where transformers fuses them (models/experts.py)."""
        if self._held is None:
            self._held = transformers_weight_names(self.config) if self.layout.num_experts else set()
        return fuse_experts(self.hf_state_dict().items(), self._held)

    def save_pretrained(self, path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None,
                        **_: Any) -> None:
        """config.json and model.safetensors, as a Hugging Face checkpoint. Without `state_dict` every rank of
        the model gathers it, and the first writes."""
        from safetensors.torch import save_file

        state = self.hf_state_dict() if state_dict is None else dict(split_experts(state_dict.items()))
        if state_dict is None and not self.first_rank:
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.hf_config, indent=2))
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path / "model.safetensors"))


def _tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def _gather_to_first(tensor: torch.Tensor, group: Any, size: int) -> list[torch.Tensor] | None:
    """Every rank's `tensor` of `group`, in group order, on the group's first rank; None on the others."""
    if size == 1:
        return [tensor]
    first = torch.distributed.get_global_rank(group, 0)
    if torch.distributed.get_rank() != first:
        torch.distributed.gather(tensor.contiguous(), None, dst=first, group=group)
        return None
    parts = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.gather(tensor.contiguous(), parts, dst=first, group=group)
    return parts


def _gather_digests(digest: str, group: Any, size: int, device: torch.device) -> list[str]:
    """A 16-hex-digit digest from every rank of `group`, in group order, on every rank."""
    if size == 1:
        return [digest]
    mine = torch.tensor([int(digest[:8], 16), int(digest[8:], 16)], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(size)]
    torch.distributed.all_gather(parts, mine, group=group)
    return [f"{int(p[0]):08x}{int(p[1]):08x}" for p in parts]


def load_megatron_lm(path: Path, parallel: Parallel, dtype: str = "float32",
                     device: torch.device | str = "cpu") -> MegatronCausalLM:
    """A Hugging Face checkpoint dir (config.json + safetensors) as this rank's MegatronCausalLM."""
    from safetensors.torch import load_file

    hf = json.loads((Path(path) / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise ConfigError(f"{path}: no *.safetensors weights to load into the Megatron trainer")
    return build(hf, state, parallel, dtype=dtype, device=device)
