"""Micro-batching: the images of concurrent requests go through the model together.

Requests queue their images, or the bytes of an upload; one task takes what is waiting
(up to `max_batch` images), converts the uploads together on the event loop, starts one
forward pass in the inference thread and hands each request its rows when it is done.
Under no load a request is answered alone, at once; under load, one conversion and one
pass serve many requests, which is where the throughput comes from.

Up to three batches are in flight at once: while one runs in the inference thread, the
next are converted on the event loop and queued. Taking everything that waits into one
batch would put the clients in step (all answered, all sending, all converted, then the
loop idle while the model runs), so while the model is idle a batch takes half of what
waits and leaves the rest to be converted while it runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from mnistops.data.conversion import images_from_bytes
from mnistops.loop.records import as_pixels
from mnistops.predict import logits, softmax
from mnistops.serving.champion import Holder, Served


class Found(NamedTuple):
    """What the model found for one request: the N images it saw as the log keeps them
    ((N, 784) uint8, `records.as_pixels`), their logits and probabilities, and the
    model. (Tuples: made once a request, they cost a third of a frozen dataclass.)"""

    pixels: np.ndarray
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
IN_FLIGHT = 3
"""batches between conversion and answer at once (measured: 3 answered 5 % more requests
at 32 concurrent clients than 2, and 4 no more than 3)"""
SPLIT_FROM = 12
"""fewer waiting requests are one batch even while the model is idle: for a few, the
costs of a second conversion and forward pass outweigh the overlap (measured: at 8
concurrent clients, halves answered a tenth fewer requests than whole batches; at 32,
as many)"""


class Batcher:
    def __init__(self, holder: Holder, max_batch: int = 256) -> None:
        self.holder = holder
        self.max_batch = max_batch
        self.queue: asyncio.Queue[Waiting] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.task: asyncio.Task[None] | None = None
        self.running = 0
        """batches in the inference thread or waiting for it"""

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
        room = asyncio.Semaphore(IN_FLIGHT)
        while True:
            await room.acquire()
            waiting = await self._take()
            try:
                started = self._start(waiting)
            except Exception as exc:  # noqa: BLE001  the batcher outlives any one batch
                _fail(waiting, exc)
                started = None
            if started is None:
                room.release()
                continue
            self.running += 1
            started.add_done_callback(lambda _job: self._finished(room))

    async def _take(self) -> list[Waiting]:
        """The next batch: what waits, up to `max_batch` images; while no batch runs
        and at least `SPLIT_FROM` requests wait, the first half of them (the rest is
        the next batch)."""
        waiting = [await self.queue.get()]
        size = _count(waiting[0][0])
        queued = self.queue.qsize() + 1
        share = queued if self.running or queued < SPLIT_FROM else (queued + 1) // 2
        while size < self.max_batch and len(waiting) < share and not self.queue.empty():
            item = self.queue.get_nowait()
            waiting.append(item)
            size += _count(item[0])
        return waiting

    def _finished(self, room: asyncio.Semaphore) -> None:
        self.running -= 1
        room.release()

    def _start(self, waiting: list[Waiting]) -> asyncio.Future[Answers] | None:
        """The batch converted here and its forward pass started in the inference
        thread, which hands each request its rows when it is done (None when no request
        of the batch is left to answer)."""
        served = self.holder.current
        if served is None:
            _fail(waiting, NoModel())
            return None
        ready = _images_of(waiting)
        if not ready:
            return None
        batch = np.concatenate([images for images, _ in ready])
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self.pool, answers, served.module, batch)
        job.add_done_callback(lambda done: _hand_out(done, ready, served))
        return job


Answers = tuple[np.ndarray, np.ndarray, np.ndarray]


def _hand_out(
    job: asyncio.Future[Answers],
    ready: list[tuple[np.ndarray, asyncio.Future[Found]]],
    served: Served,
) -> None:
    """Each request of a finished forward pass its rows, or the pass's error."""
    try:
        found, probs, pixels = job.result()
        start = 0
        for images, future in ready:
            end = start + len(images)
            if not future.done():
                answer = Found(pixels[start:end], found[start:end], probs[start:end], served)
                future.set_result(answer)
            start = end
    except BaseException as exc:  # noqa: BLE001  no request is left waiting
        _fail(ready, NoModel() if isinstance(exc, asyncio.CancelledError) else exc)


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


def answers(model: object, batch: np.ndarray) -> Answers:
    """A batch's logits, probabilities and pixels as the log keeps them, in the
    inference thread: once a batch, not once a request on the event loop or in the
    log's thread (rows are independent, so each request's rows are what it would get
    alone)."""
    found = logits(model, batch)
    return found, softmax(found), as_pixels(batch)
