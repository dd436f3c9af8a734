"""Micro-batching: the images of concurrent requests go through the model together.

Requests queue their images, or the bytes of an upload; one task takes everything that
is waiting (up to `max_batch` images), converts the uploads together, runs one forward
pass in a thread and hands each request its rows. Under no load a request is answered
alone, at once; under load, one conversion and one pass serve many requests, which is
where the throughput comes from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from mnistops.data.conversion import images_from_bytes
from mnistops.predict import logits, softmax
from mnistops.serving.champion import Holder, Served


class Found(NamedTuple):
    """What the model found for one request: the (N, 1, 28, 28) images it saw, their
    logits and probabilities, and the model. (Tuples: made once a request, they cost
    a third of a frozen dataclass.)"""

    images: np.ndarray
    logits: np.ndarray
    probabilities: np.ndarray
    served: Served


class Upload(NamedTuple):
    """An image's bytes, converted the MNIST way with the others waiting; `name` is what
    a refusal calls it."""

    data: bytes
    name: str


class NoModel(Exception):
    """No champion has loaded yet."""


Waiting = tuple[np.ndarray | Upload, "asyncio.Future[Found]"]


class Batcher:
    def __init__(self, holder: Holder, max_batch: int = 256) -> None:
        self.holder = holder
        self.max_batch = max_batch
        self.queue: asyncio.Queue[Waiting] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=False)

    async def predict(self, images: np.ndarray | Upload) -> Found:
        """What the champion finds in (N, 1, 28, 28) images in [0, 1], or in an upload
        (ImageUnusable when it cannot be converted). NoModel before a champion loads."""
        if self.holder.current is None:
            raise NoModel
        future: asyncio.Future[Found] = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def _run(self) -> None:
        while True:
            waiting = [await self.queue.get()]
            size = _count(waiting[0][0])
            while size < self.max_batch and not self.queue.empty():
                item = self.queue.get_nowait()
                waiting.append(item)
                size += _count(item[0])
            try:
                await self._answer(waiting)
            except Exception as exc:  # noqa: BLE001  the batcher outlives any one batch
                _fail(waiting, exc)

    async def _answer(self, waiting: list[Waiting]) -> None:
        served = self.holder.current
        if served is None:
            _fail(waiting, NoModel())
            return
        ready = _images_of(waiting)
        if not ready:
            return
        batch = np.concatenate([images for images, _ in ready])
        pool, loop = self.pool, asyncio.get_running_loop()
        found, probs = await loop.run_in_executor(pool, answers, served.module, batch)
        start = 0
        for images, future in ready:
            end = start + len(images)
            if not future.done():
                future.set_result(Found(images, found[start:end], probs[start:end], served))
            start = end


def _count(item: np.ndarray | Upload) -> int:
    return 1 if isinstance(item, Upload) else len(item)


def _fail(waiting: Sequence[Waiting], exc: BaseException) -> None:
    for _item, future in waiting:
        if not future.done():
            future.set_exception(exc)


def _images_of(waiting: list[Waiting]) -> list[tuple[np.ndarray, asyncio.Future[Found]]]:
    """The waiting requests with their images: uploads converted together (one that
    cannot be gets its ImageUnusable and leaves the batch). Should the conversion fail in
    a way it does not name, the uploads are converted one by one, so that only the one
    that broke it fails (as it would have alone)."""
    uploads = [(item.data, item.name) for item, _ in waiting if isinstance(item, Upload)]
    try:
        converted: list[np.ndarray | Exception] = list(images_from_bytes(uploads))
    except Exception:  # noqa: BLE001  retried one by one just below
        converted = [_alone(upload) for upload in uploads]
    images = iter(converted)
    ready = []
    for item, future in waiting:
        if not isinstance(item, Upload):
            ready.append((item, future))
            continue
        image = next(images)
        if isinstance(image, Exception):
            if not future.done():
                future.set_exception(image)
        else:
            ready.append((image[None, None], future))
    return ready


def _alone(upload: tuple[bytes, str]) -> np.ndarray | Exception:
    try:
        return images_from_bytes([upload])[0]
    except Exception as exc:  # noqa: BLE001  handed to its request
        return exc


def answers(model: object, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch's logits and probabilities, in the inference thread (softmax once a
    batch, not once a request on the event loop: rows are independent, so each
    request's rows are what it would get alone)."""
    found = logits(model, batch)
    return found, softmax(found)
