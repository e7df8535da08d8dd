"""The embedded reference engine: in-process torch decoding with a KV cache and exact log-probs.

Concurrent `generate` calls from many agent loops are gathered into one batch per decoding pass
(engines/batching.py; left-padded prefill, then step-by-step decode); the compute runs in a worker
thread so the event loop (tools, sandboxes, HTTP) stays responsive.

On MoE models the engine records the experts every forwarded token was routed to, for the requests that
ask (`return_routed_experts`, or the engine's own flag of that name). A row whose logits turn non-finite
(NaN weights, an overflow) stops there with finish reason "abort" instead of sampling from NaN.

Like SGLang's `release_memory_occupation` for colocated training, the engine can give its weights' memory back
and take it again: after `resume_memory_occupation` the weights are uninitialised until the next update.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..models.moe import decoder_layers, moe_spec, routing
from ..sync.checksum import weights_checksum
from ..types import GenerateRequest, GenerateResult, SamplingParams
from .base import EngineClient
from .batching import RequestBatcher
from .model_runner import HFRunner, runner_for
from .sampling import RowNoise, sample_rows, sampling_logprobs


class ReferenceEngine(EngineClient):
    name = "reference"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, model_path: str = "", seed: int = 0,
                 max_batch: int = 256, lean: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self.max_batch = max_batch
        self.weight_version = 0
        self.runner = runner_for(self.model, prefer_lean=lean)
        self._lock = threading.Lock()  # one forward pass or weight update at a time
        self._unseeded = torch.Generator().manual_seed(seed)  # for requests that bring no seed
        self._batcher = RequestBatcher(lambda batch: asyncio.to_thread(self.generate_batch, batch), max_batch)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.moe = moe_spec(self.model)
        self._released: dict[str, tuple[torch.Size, torch.dtype]] | None = None  # shapes while memory is released

    @classmethod
    def create(cls, model_dir: Path, *, tokenizer: Any, dtype: str, device: torch.device, seed: int = 0,
               attn_implementation: str = "sdpa", options: Any = None) -> ReferenceEngine:
        """The engine's own copy of the weights in `model_dir`, on `device` in `dtype` (`options`, the run's
        [engine] section, are for server backends)."""
        from ..models.loading import load_causal_lm

        model = load_causal_lm(model_dir, dtype, device, attn_implementation)
        return cls(model.requires_grad_(False), tokenizer, model_path=str(model_dir), seed=seed)

    # -- async API ----------------------------------------------------------------------------
    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return await self._batcher.submit(requests)

    async def update_weights_from_disk(self, path: str | Path) -> int:
        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        return await asyncio.to_thread(self.update_weights_from_tensors, tensors.items())

    async def weights_checksum(self) -> str:
        return await asyncio.to_thread(self.checksum)

    async def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "weight_version": self.weight_version,
            "architecture": type(self.model).__name__,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(self.device),
            "runner": type(self.runner).__name__,
            **({"moe": self.moe.to_dict()} if self.moe is not None else {}),
        }

    # -- in-process API (colocated trainer) ---------------------------------------------------
    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.named_parameters())

    def checksum(self) -> str:
        with self._lock:
            self._need_memory("a weights checksum")
            return weights_checksum(self.named_weights())

    # -- memory, for colocated training ------------------------------------------------------
    @property
    def memory_released(self) -> bool:
        return self._released is not None

    def release_memory_occupation(self) -> None:
        """Free the weights' storage (the parameters stay, empty); generation is refused until resumed."""
        with self._lock:
            if self._released is not None:
                return
            self._released = {}
            for name, param in self.model.named_parameters():
                self._released[name] = (param.shape, param.dtype)
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def resume_memory_occupation(self) -> None:
        """Allocate the weights again, uninitialised: load or send weights before generating."""
        with self._lock:
            if self._released is None:
                return
            for name, param in self.model.named_parameters():
                shape, dtype = self._released[name]
                param.data = torch.empty(shape, dtype=dtype, device=self.device)
            self._released = None

    def _need_memory(self, what: str) -> None:
        if self._released is not None:
            raise RuntimeError(f"the engine's memory is released (release_memory_occupation); resume it before "
                               f"{what}")

    def update_weights_from_tensors(self, named: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        self._need_memory("a weight update")
        params = dict(self.model.named_parameters())
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        updates = []
        for name, tensor in named:  # check everything first: a refused update changes nothing
            if name not in params:
                if name in tied:
                    continue
                raise KeyError(f"engine model has no parameter '{name}'")
            target = params[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"'{name}': engine shape {tuple(target.shape)} != update {tuple(tensor.shape)}")
            updates.append((target, tensor))
        with self._lock, torch.no_grad():
            self._need_memory("a weight update")
            for target, tensor in updates:
                target.copy_(tensor)
            self.weight_version = self.weight_version + 1 if version is None else version
        return self.weight_version

    # -- the decoding loop ---------------------------------------------------------------------
    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        with self._lock:
            self._need_memory("generating")
            return self._generate_locked(requests)

    def _generate_locked(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        n = len(requests)
        if n == 0:
            return []
        params = [r.sampling for r in requests]
        prompt_lens = [len(r.input_ids) for r in requests]
        if min(prompt_lens) == 0:
            raise ValueError("every request needs at least one input token")
        width = max(prompt_lens)
        budget = max(p.max_new_tokens for p in params)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((n, width), pad, dtype=torch.long)
        key_valid = torch.zeros((n, width + budget), dtype=torch.bool)
        for i, r in enumerate(requests):
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids, dtype=torch.long)
            key_valid[i, width - len(r.input_ids):width] = True
        ids, key_valid = ids.to(self.device), key_valid.to(self.device)
        positions = (key_valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)
        vocab = self.model.config.vocab_size
        noises = [None if p.temperature == 0 else RowNoise(self._generator(p), vocab, self.device) for p in params]
        stops = [set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids) for p in params]
        out_ids: list[list[int]] = [[] for _ in range(n)]
        out_lps: list[list[float]] = [[] for _ in range(n)]
        finish: list[tuple[str, Any] | None] = [None if p.max_new_tokens > 0 else ("length", None) for p in params]

        capture = self.moe is not None and (self.return_routed_experts or any(r.return_routed_experts for r in requests))
        routes: list[list[torch.Tensor]] = [[] for _ in range(n)]
        state = self.runner.start(n, width + budget)
        with self._padding_kept_finite(~key_valid[:, :width]):
            logits, captured = self._forward(state, ids, positions, key_valid, capture)
        if captured is not None:
            captured = captured.view(n, width, *captured.shape[1:])
            for i in range(n):
                routes[i].append(captured[i, width - prompt_lens[i]:])
        next_pos = positions[:, -1:] + 1
        for step in range(budget):
            finite = torch.isfinite(logits).all(-1).tolist()
            for i in range(n):
                if finish[i] is None and not finite[i]:
                    finish[i] = ("abort", None)
            active = [i for i in range(n) if finish[i] is None]
            if not active:
                break
            tokens = torch.full((n,), pad, dtype=torch.long, device=self.device)
            rows = torch.tensor(active, device=self.device)
            groups: dict[tuple[float, float, int], list[int]] = {}
            for j, i in enumerate(active):
                p = params[i]
                groups.setdefault((p.temperature, p.top_p, p.top_k), []).append(j)
            for (temp, top_p, top_k), members in groups.items():
                sel = rows[members]
                lp = sampling_logprobs(logits[sel], temp, top_p, top_k)
                chosen = sample_rows(lp, [noises[active[j]] for j in members])
                chosen_lp = self._reported_logprobs(logits[sel], lp, chosen).tolist()
                tokens[sel] = chosen
                for k, token in enumerate(chosen.tolist()):
                    i = active[members[k]]
                    out_ids[i].append(token)
                    out_lps[i].append(chosen_lp[k])
            for i in active:
                finish[i] = self._check_stop(out_ids[i], params[i], stops[i])
            if all(f is not None for f in finish):
                break
            key_valid[:, width + step] = True
            logits, captured = self._forward(state, tokens[:, None], next_pos, key_valid, capture)
            if captured is not None:
                for i in active:
                    routes[i].append(captured[i:i + 1])
            next_pos = next_pos + 1

        results = []
        for i in range(n):
            reason, matched = finish[i] or ("length", None)
            text = self.tokenizer.decode(out_ids[i], skip_special_tokens=True)
            if isinstance(matched, str):
                cut = text.find(matched)
                text = text[:cut] if cut >= 0 else text
            wanted = capture and (self.return_routed_experts or requests[i].return_routed_experts)
            results.append(GenerateResult(
                output_ids=tuple(out_ids[i]), output_logprobs=tuple(out_lps[i]), text=text,
                finish_reason=reason, prompt_tokens=prompt_lens[i], weight_version=self.weight_version,
                matched_stop=matched,
                # every forwarded token but the last sampled one (which no forward pass read)
                routed_experts=torch.cat(routes[i])[:prompt_lens[i] + len(out_ids[i]) - 1] if wanted else None,
            ))
        return results

    @contextlib.contextmanager
    def _padding_kept_finite(self, pad: torch.Tensor) -> Iterator[None]:
        """Zero the hidden states of left padding after every layer of a prefill through the HF forward. Masked
        keys get attention weight 0, but 0 x NaN is NaN: a pad token routed to a NaN expert would otherwise abort
        its batch mates, and whether a request survives would depend on what it was batched with."""
        if not bool(pad.any()) or not isinstance(self.runner, HFRunner):
            yield
            return

        def zero_padding(_module: Any, _args: Any, out: Any) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            hidden.masked_fill_(pad[..., None], 0.0)

        handles = [layer.register_forward_hook(zero_padding) for layer in decoder_layers(self.model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward(self, state: Any, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                 capture: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the last position, and with `capture` the routes of every token of `ids` [B*T, layers, k]."""
        if not capture:
            return self.runner.forward(state, ids, positions, key_valid), None
        with routing(self.model, self.moe, capture=True) as session:
            logits = self.runner.forward(state, ids, positions, key_valid)
        return logits, session.routes()

    def _reported_logprobs(self, logits: torch.Tensor, logprobs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The log-probs reported for the chosen tokens: those of the distribution sampled from."""
        return logprobs.gather(-1, chosen[:, None])[:, 0]

    def _generator(self, params: SamplingParams) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        if params.seed is not None:
            return gen.manual_seed(int(params.seed) % (2**63))
        return gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._unseeded)))

    def _check_stop(self, out: list[int], params: SamplingParams, stop_ids: set[int]) -> tuple[str, Any] | None:
        last = out[-1]
        if last in stop_ids:
            return ("stop", last)
        if params.stop:
            # a stop string of c characters spans at most 4c byte-level tokens
            window = 4 * max(len(s) for s in params.stop) + 1
            tail = self.tokenizer.decode(out[-window:], skip_special_tokens=False)
            for s in params.stop:
                if s in tail:
                    return ("stop", s)
        if len(out) >= params.max_new_tokens:
            return ("length", None)
        return None


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
