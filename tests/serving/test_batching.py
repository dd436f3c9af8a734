"""The batcher as pure logic: the uploads of concurrent requests converted together,
each answered as it would be alone, and no upload or batch that breaks stops it."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from mnistops.data import mnist
from mnistops.data.conversion import image_from_bytes
from mnistops.errors import ImageUnusable
from mnistops.loop.records import as_pixels
from mnistops.serving import batching
from mnistops.serving.batching import Batcher, Found, Upload
from mnistops.serving.champion import Holder, Served
from mnistops.train.runtime import NumpyNet

pytestmark = pytest.mark.unit


class Linear(NumpyNet):
    """A stand-in model on the NumPy runtime's path: fixed random weights; while
    `broken`, a batch raises."""

    def __init__(self) -> None:
        super().__init__("linear", [])
        self.weights = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32)
        self.broken = False

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.broken:
            raise RuntimeError("the model broke")
        found: np.ndarray = batch.reshape(len(batch), -1) @ self.weights
        return found


@pytest.fixture
def uploads() -> list[bytes]:
    bodies = []
    for image in mnist.load(mnist.packaged_dir()).test_images[:12]:
        png = io.BytesIO()
        Image.fromarray(image).save(png, "PNG")
        bodies.append(png.getvalue())
    return bodies


def holder_of(model: Linear) -> Holder:
    holder = Holder()
    holder.current = Served("m", "1", model, None, None, None, None)
    return holder


async def all_answered(batcher: Batcher, items: list) -> list[Found | BaseException]:
    batcher.start()
    try:
        answers = asyncio.gather(*(batcher.predict(i) for i in items), return_exceptions=True)
        return await asyncio.wait_for(answers, 30)  # a batcher that died would never answer
    finally:
        await batcher.stop()


def test_uploads_batched_together_get_what_they_get_alone(uploads: list[bytes]) -> None:
    model = Linear()
    items = [Upload(body, f"upload {i}") for i, body in enumerate(uploads)]
    items.insert(5, Upload(b"not an image", "the bad one"))
    items.insert(2, (np.zeros((3, 1, 28, 28), np.float32)))
    found = asyncio.run(all_answered(Batcher(holder_of(model)), items))
    bad = found.pop(6)
    assert isinstance(bad, ImageUnusable) and "the bad one: not an image" in str(bad)
    arrays = found.pop(2)
    assert isinstance(arrays, Found) and arrays.logits.shape == (3, 10)
    for body, answer in zip(uploads, found, strict=True):
        assert isinstance(answer, Found)
        alone = image_from_bytes(body)[None, None]
        assert np.array_equal(answer.pixels, as_pixels(alone))
        assert np.allclose(answer.logits, model(alone), rtol=1e-5, atol=1e-4)
        assert np.allclose(answer.probabilities.sum(1), 1)


def test_an_upload_that_breaks_the_conversion_fails_alone(
    uploads: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion that fails in a way it does not name (a Pillow bug on a crafted
    file, say) fails only the request that sent that upload; the batcher goes on."""
    poison = b"\x89PNG crafted"
    real = batching.images_from_bytes

    def converting(batch: list[tuple[bytes, str]]) -> list:
        if any(data == poison for data, _ in batch):
            raise RuntimeError("a reader's bug")
        return real(batch)

    monkeypatch.setattr(batching, "images_from_bytes", converting)
    items = [Upload(body, "u") for body in uploads[:6]] + [Upload(poison, "p")]
    found = asyncio.run(all_answered(Batcher(holder_of(Linear())), items))
    assert isinstance(found[-1], RuntimeError)
    assert all(isinstance(answer, Found) for answer in found[:-1])


def test_a_batch_the_model_fails_fails_its_requests_and_the_next_is_answered(
    uploads: list[bytes],
) -> None:
    model = Linear()
    batcher = Batcher(holder_of(model))

    async def scenario() -> tuple[list, list]:
        batcher.start()
        try:
            model.broken = True
            first = await asyncio.gather(
                *(batcher.predict(Upload(b, "u")) for b in uploads[:4]), return_exceptions=True
            )
            model.broken = False
            second = await asyncio.gather(
                *(batcher.predict(Upload(b, "u")) for b in uploads[4:8]), return_exceptions=True
            )
            return first, second
        finally:
            await batcher.stop()

    first, second = asyncio.run(scenario())
    assert all(isinstance(e, RuntimeError) for e in first)
    assert all(isinstance(answer, Found) for answer in second)


class Gated(Linear):
    """A stand-in model that holds each forward pass until `go` is set, noting the
    batch sizes it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.go.wait(30)
        return super().__call__(batch)


@pytest.mark.parametrize(("count", "batches"), [(12, [6, 6]), (4, [4])])
def test_the_next_batch_is_converted_while_one_runs(
    uploads: list[bytes], monkeypatch: pytest.MonkeyPatch, count: int, batches: list[int]
) -> None:
    """Twelve uploads waiting while the model is idle: the first half is one batch, and
    the second is converted and queued while the first is still in the model (not after
    it: the event loop would sit idle while the model runs). Fewer than
    `SPLIT_FROM` are one batch."""
    converted: list[int] = []
    real = batching.images_from_bytes

    def converting(batch: list[tuple[bytes, str]]) -> list:
        converted.append(len(batch))
        return real(batch)

    monkeypatch.setattr(batching, "images_from_bytes", converting)
    model = Gated()
    batcher = Batcher(holder_of(model))

    async def scenario() -> tuple[list[int], list[int], list[Found]]:
        batcher.start()
        try:
            requests = asyncio.gather(*(batcher.predict(Upload(b, "u")) for b in uploads[:count]))
            for _ in range(500):
                if sum(converted) == count:
                    break
                await asyncio.sleep(0.01)
            seen, sizes = list(converted), list(model.sizes)
            model.go.set()
            return seen, sizes, await asyncio.wait_for(requests, 30)
        finally:
            model.go.set()
            await batcher.stop()

    seen, sizes, found = asyncio.run(scenario())
    assert seen == batches and sizes == batches[:1]
    assert model.sizes == batches
    for body, answer in zip(uploads, found, strict=False):
        assert np.array_equal(answer.pixels, as_pixels(image_from_bytes(body)[None, None]))
