"""Lockstep batching: multi-turn agent loops decode in waves whose make-up does not depend on timing.

With tools in the loop, which requests meet in one decoding batch depends on how fast each tool call
returned, and a different batch make-up changes the padded forward passes and so the low bits of every
log-prob: two runs with one seed would sample different tokens. `Lockstep` holds each agent loop's request
until every live loop is either waiting on the engine or finished, then sends them all as one batch in
the loops' fixed order. A wave therefore waits for its slowest tool call; for the reproducibility the
gates demand on a small engine that is the right trade (`rollout.batching = "free"` turns it off).

Each agent loop runs inside `participant(key)`; engine calls made outside any participant pass straight
through.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import Any, AsyncIterator, Sequence

from ..types import GenerateRequest, GenerateResult
from .base import EngineClient

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("lockstep_participant", default=None)


class Lockstep(EngineClient):
    def __init__(self, inner: EngineClient):
        self.inner = inner
        self._alive: set[Any] = set()
        self._waiting: dict[Any, tuple[list[GenerateRequest], asyncio.Future]] = {}
        self.waves = 0
        self._tasks: set[asyncio.Task] = set()

    @contextlib.asynccontextmanager
    async def participant(self, key: Any) -> AsyncIterator[None]:
        """Run one agent loop as a member of the waves; `key` orders it within each wave."""
        token = _current.set(key)
        self._alive.add(key)
        try:
            yield
        finally:
            self._alive.discard(key)
            self._waiting.pop(key, None)  # a loop that failed while waiting leaves no request behind
            _current.reset(token)
            self._maybe_flush()

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        key = _current.get()
        if key is None or key not in self._alive:
            return await self.inner.generate(requests)
        if key in self._waiting:
            raise RuntimeError("an agent loop under lockstep batching made two engine calls at once; "
                               "await one before the next, or set rollout.batching=free")
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = (list(requests), future)
        self._maybe_flush()
        try:
            return await future
        except asyncio.CancelledError:
            entry = self._waiting.get(key)
            if entry is not None and entry[1] is future:  # not sent yet: take it out of the next wave
                del self._waiting[key]
            raise

    def _maybe_flush(self) -> None:
        if not self._waiting or len(self._waiting) < len(self._alive):
            return
        wave = sorted(self._waiting.items(), key=lambda item: item[0])
        self._waiting = {}
        self.waves += 1
        task = asyncio.get_running_loop().create_task(self._run_wave(wave))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _run_wave(self, wave: list[tuple[Any, tuple[list[GenerateRequest], asyncio.Future]]]) -> None:
        batch = [r for _, (requests, _) in wave for r in requests]
        try:
            results = await self.inner.generate(batch)
        except BaseException as exc:
            for _, (_, future) in wave:
                if not future.done():
                    future.set_exception(exc)
            return
        at = 0
        for _, (requests, future) in wave:
            if not future.done():
                future.set_result(results[at:at + len(requests)])
            at += len(requests)

    # everything else is the inner engine's
    async def update_weights_from_disk(self, path: Any) -> int:
        return await self.inner.update_weights_from_disk(path)

    async def weights_checksum(self) -> str:
        return await self.inner.weights_checksum()

    async def model_info(self) -> dict[str, Any]:
        return await self.inner.model_info()

    async def flush_cache(self) -> None:
        await self.inner.flush_cache()

    async def health(self) -> bool:
        return await self.inner.health()
