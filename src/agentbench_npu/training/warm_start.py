"""Supervised warm start on a scenario's demonstrations, so a tiny policy's rewards are not all zero.

The result is an ordinary checkpoint dir in the cache, keyed by everything that shapes it (base
model, scenario, its options, the SFT settings): the second run of a scenario skips it.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..models.loading import load_causal_lm, load_tokenizer
from ..conversation import chat_segments
from ..errors import UserError
from ..paths import atomic_directory, cache_root

WARM_START_VERSION = 1


def warm_start_dir(base: Path, scenario: str, options: Mapping[str, Any], settings: Mapping[str, Any], seed: int) -> Path:
    key = hashlib.sha256(json.dumps(
        {"base": str(Path(base).resolve()), "scenario": scenario, "options": dict(options),
         "settings": dict(settings), "seed": seed, "v": WARM_START_VERSION, "torch": torch.__version__.split("+")[0]},
        sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root() / "warm-start" / f"{scenario}-{key}"


# (messages, response) or (messages, response, tools): tools render into the prompt as the agent loop renders them;
# or {"messages": [...], "tools": [...]}: a whole chat, trained on its assistant turns
Demonstration = Any


def encode_demonstrations(tokenizer: Any, demos: list[Demonstration]) -> list[tuple[list[int], list[int], list[bool]]]:
    """(prompt ids, response ids ending with end-of-turn, which response ids are trained) per demonstration.

    A response is a string (all of it trained) or a list of (text, trained) segments: a multi-turn agent's
    tool observations are segments with trained=False, encoded on their own exactly as the agent loop
    appends them, so warm start and rollout see the same token boundaries. A third element, a list of tool
    schemas, renders into the prompt the way the chat template renders tools. A chat demonstration (a dict
    with `messages` and `tools`) is cut into prompt and segments by the template, as `ChatEpisode` cuts a rollout.
    """
    eos = tokenizer.eos_token_id
    out = []
    for demo in demos:
        if isinstance(demo, dict):
            try:
                text, segments = chat_segments(tokenizer, demo["messages"], demo.get("tools"))
            except ValueError as exc:
                raise UserError(f"warm start: demonstration {len(out) + 1}: {exc}") from None
            closing: list[int] = []  # the last assistant turn already ends with end-of-turn
        else:
            messages, response, *rest = demo
            tools = rest[0] if rest else None
            text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
            segments = [(response, True)] if isinstance(response, str) else list(response)
            closing = [eos]
        prompt = tokenizer.encode(text, add_special_tokens=False)
        ids: list[int] = []
        trained: list[bool] = []
        for segment, train in segments:
            piece = tokenizer.encode(segment, add_special_tokens=False)
            ids += piece
            trained += [bool(train)] * len(piece)
        out.append((prompt, ids + closing, trained + [True] * len(closing)))
    return out


def supervised_finetune(model: torch.nn.Module, examples: list[tuple[list[int], list[int], list[bool]]], *, steps: int,
                        batch_size: int, lr: float, seed: int, pad_id: int,
                        progress: Callable[[int, float], None] | None = None) -> float:
    """Cross-entropy on response tokens only; returns the mean loss of the last 20 steps."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    recent: list[float] = []
    for step in range(steps):
        rows = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        width = max(len(p) + len(r) for p, r, _ in rows)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attn = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (p, r, trained) in enumerate(rows):
            seq = p + r
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor([t if keep else -100 for t, keep in zip(r, trained)])
            attn[i, :len(seq)] = 1
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device), use_cache=False)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [float(out.loss.detach())])[-20:]
        if progress is not None:
            progress(step + 1, recent[-1])
    model.eval()
    return sum(recent) / max(1, len(recent))


def ensure_warm_start(base: Path, scenario: Any, options: Mapping[str, Any], settings: Mapping[str, Any], seed: int,
                      progress: Callable[[int, float], None] | None = None) -> Path:
    """The warm-started checkpoint dir for (base, scenario, options, settings), built if missing."""
    final = warm_start_dir(base, scenario.name, options, settings, seed)
    if (final / "config.json").exists():
        return final
    tokenizer = load_tokenizer(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_causal_lm(base, "float32", "cpu")
        demos = scenario.demonstrations(options, int(settings["demonstrations"]), seed)
        examples = encode_demonstrations(tokenizer, demos)
        loss = supervised_finetune(model, examples, steps=int(settings["steps"]), batch_size=int(settings["batch_size"]),
                                   lr=float(settings["lr"]), seed=seed, pad_id=tokenizer.pad_token_id, progress=progress)
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (base / extra).exists() and not (tmp / extra).exists():
                shutil.copy(base / extra, tmp / extra)
        (tmp / "warm_start.json").write_text(json.dumps(
            {"base": str(base), "scenario": scenario.name, "options": dict(options), "settings": dict(settings),
             "seed": seed, "final_loss": loss}, indent=2, default=str))
    return final
