"""The one definition of "the distribution the engine sampled from", shared by engine and trainer.

Applied, in this order, to the model's raw next-token logits (computed in float32):
  1. temperature: logits / T   (T = 0 means greedy decoding; log-probs are then those of T = 1)
  2. top-k: all but the k largest scaled logits set to -inf   (top_k = -1: off)
  3. top-p: the smallest set of tokens whose probability mass reaches top_p is kept, the rest -inf
     (the most likely token is always kept; top_p = 1.0: off)
  4. log_softmax over what is left.
The engine samples from exactly this distribution and reports log p(token) under it; the trainer
recomputes log-probs with this same function, so on CPU fp32 the two differ only by float reordering.
"""

from __future__ import annotations

import torch


def effective_temperature(temperature: float) -> float:
    return temperature if temperature > 0 else 1.0


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = -1) -> torch.Tensor:
    """Log-probs [..., V] of the distribution sampled from, for raw logits [..., V]."""
    scores = logits.float() / effective_temperature(temperature)
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


class RowNoise:
    """The random stream of one request: -log E with E ~ Exp(1), drawn from the request's own generator.

    argmax(log p - log E) samples exactly from softmax(log p) (the exponential race). Noise is drawn in
    blocks whose size depends only on the vocabulary size, so a request's tokens depend on its seed
    alone, not on which other requests share its batch.
    """

    def __init__(self, generator: torch.Generator, vocab: int, device: torch.device):
        self.generator = generator
        self.vocab = vocab
        self.device = device
        self.block = max(1, min(32, (1 << 20) // vocab))
        self._buffer: torch.Tensor | None = None
        self._next = 0

    def next(self) -> torch.Tensor:
        if self._buffer is None or self._next == self.block:
            draws = torch.empty((self.block, self.vocab), dtype=torch.float32, device=self.device)
            self._buffer = -draws.exponential_(generator=self.generator).log()
            self._next = 0
        row = self._buffer[self._next]
        self._next += 1
        return row


def sample_rows(logprobs: torch.Tensor, noises: list[RowNoise | None]) -> torch.Tensor:
    """One token per row of logprobs [N, V]: argmax where noise is None (greedy), else the race."""
    if all(n is None for n in noises):
        return torch.argmax(logprobs, dim=-1)
    gumbel = torch.stack([
        n.next() if n is not None else torch.zeros(logprobs.shape[-1], device=logprobs.device) for n in noises
    ])
    return torch.argmax(logprobs + gumbel, dim=-1)
