"""Micro-batching: the images of concurrent requests go through the model together.

Requests queue their images; one task takes everything that is waiting (up to
`max_batch` images), runs one forward pass in a thread and hands each request its
rows. Under no load a request is answered alone, at once; under load, one pass serves
many requests, which is where the throughput comes from.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mnistops.predict import logits
from mnistops.serving.champion import Holder, Served


class NoModel(Exception):
    """No champion has loaded yet."""


class Batcher:
    def __init__(self, holder: Holder, max_batch: int = 256) -> None:
        self.holder = holder
        self.max_batch = max_batch
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[tuple[np.ndarray, Served]]]]
        self.queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=False)

    async def predict(self, images: np.ndarray) -> tuple[np.ndarray, Served]:
        """(N, 10) logits of (N, 1, 28, 28) images, and the model that answered."""
        if self.holder.current is None:
            raise NoModel
        future: asyncio.Future[tuple[np.ndarray, Served]] = (
            asyncio.get_running_loop().create_future()
        )
        await self.queue.put((images, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            size = len(waiting[0][0])
            while size < self.max_batch and not self.queue.empty():
                item = self.queue.get_nowait()
                waiting.append(item)
                size += len(item[0])
            served = self.holder.current
            if served is None:
                for _images, future in waiting:
                    if not future.done():
                        future.set_exception(NoModel())
                continue
            batch = np.concatenate([images for images, _ in waiting])
            try:
                found = await loop.run_in_executor(self.pool, logits, served.module, batch)
            except Exception as exc:  # noqa: BLE001  handed to every waiting request
                for _images, future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for images, future in waiting:
                if not future.done():
                    future.set_result((found[start : start + len(images)], served))
                start += len(images)
