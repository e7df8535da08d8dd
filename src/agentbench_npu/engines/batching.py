"""Gather concurrent generate calls into batches, deterministically.

Agent loops call `generate` one request at a time from many coroutines. Requests submitted in the same
event-loop turn form one batch, in submission order, so the batch make-up (and with it every padded
forward pass) is the same from run to run: that is what keeps reproducibility bitwise.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence

from ..types import GenerateRequest, GenerateResult

RunBatch = Callable[[list[GenerateRequest]], Awaitable[list[GenerateResult]]]


class RequestBatcher:
    def __init__(self, run_batch: RunBatch, max_batch: int = 256):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self._pending: list[tuple[GenerateRequest, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        loop = asyncio.get_running_loop()
        futures = []
        for request in requests:
            future = loop.create_future()
            self._pending.append((request, future))
            futures.append(future)
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._worker = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            try:
                results = await self.run_batch([r for r, _ in batch])
            except BaseException as exc:  # hand the failure to every waiter of this batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
