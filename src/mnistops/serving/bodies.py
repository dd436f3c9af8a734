"""What a /predict request holds, and the answer made of it.

The body of a request is bytes: a PNG or JPEG (converted the MNIST way, by the same
function as `mnistops predict`), a multipart upload of one, or JSON images. Everything
here is decoded in memory with caps (body size, batch size, pixels): nothing a request
sends is used as a file name or a URL. `Predictor.answer` turns a body into the HTTP
status and JSON that both the fast path and the route send.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import orjson
from fastapi import HTTPException, Request
from PIL import Image
from starlette.requests import ClientDisconnect

from mnistops.data.conversion import image_from_bytes
from mnistops.data.decoding import MAX_PIXELS, PNG_SIGNATURE
from mnistops.errors import ImageUnusable, PredictError
from mnistops.loop.feedback import FeedbackBook
from mnistops.loop.log_writer import PredictionLog
from mnistops.loop.records import Answered, RequestIds
from mnistops.serving.batching import NoModel, Upload
from mnistops.serving.champion import Served
from mnistops.serving.metrics import Metrics
from mnistops.settings import Settings


class Refused(HTTPException):
    """A request the service will not answer; `detail` says why."""


class Busy(Refused):
    """The service holds as many large bodies as it takes at once: try again soon."""

    def __init__(self, held: int, more: int, limit: int) -> None:
        super().__init__(
            503,
            f"the service holds {held / MIB:.1f} MiB of large request bodies already and"
            f" {more / MIB:.1f} MiB more would pass the {limit / MIB:.1f} MiB it holds at"
            " once (32 x serve.max_body_bytes, for all clients together): try again in a"
            " second",
            headers={"Retry-After": "1"},
        )


MIB = 1 << 20
HELD_BODIES = 32
"""at most this many times `serve.max_body_bytes` of large bodies are held at once (256
MiB by default)"""
LARGE_BODY = 64 << 10
"""bodies of this many bytes or more count against `HeldBodies` (a digit's PNG takes
well under 1 KB, the page's drawings a few)"""


class HeldBodies:
    """The bytes of large request bodies the service holds at once: read, waiting for a
    decoding thread, or being decoded. Past `limit` a new one is refused (503, try
    again) rather than queued: each waits with its body in memory, so 1,000 concurrent
    photo uploads took 9 GB, and clients that had gone away left 90 s of decoding
    behind them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def holding(self) -> Hold:
        """A hold on bodies' bytes, given back at the end of its `with`."""
        return Hold(self)


class Hold:
    """Called with the size a body has reached: that much is held (Busy when it does
    not fit). (A class, not a generator's context manager: one is made per request.)"""

    __slots__ = ("bodies", "taken")

    def __init__(self, bodies: HeldBodies) -> None:
        self.bodies = bodies
        self.taken = 0

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.bodies.held -= self.taken

    def __call__(self, size: int) -> None:
        more = size - self.taken if size >= LARGE_BODY else 0
        if more <= 0:
            return
        bodies = self.bodies
        if bodies.held + more > bodies.limit:
            raise Busy(bodies.held, more, bodies.limit)
        bodies.held += more
        self.taken += more


class Answers(NamedTuple):
    """A request's answers: the model's logits, their probabilities, the model that gave
    them, and the request id that /feedback takes. (A tuple: one is made per request.)"""

    logits: np.ndarray
    probabilities: np.ndarray
    served: Served
    request_id: str


class Predictor:
    """A body in, an answer out: what POST /predict does, whichever way it arrives."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        state: dict[str, Any],
        log: PredictionLog | None,
        book: FeedbackBook,
    ) -> None:
        self.limit = settings.serve.max_body_bytes
        self.max_batch = settings.serve.max_batch
        self.metrics = metrics
        self.state = state
        self.log = log
        self.book = book
        self.decoding = ThreadPoolExecutor(2, thread_name_prefix="decode")
        self.held = HeldBodies(HELD_BODIES * self.limit)
        self.request_ids = RequestIds()

    async def answered(self, images: np.ndarray | Upload) -> Answers:
        """The champion's answers for (N, 1, 28, 28) images in [0, 1] or an upload,
        whichever protocol asked: counted in /metrics, remembered for /feedback, handed
        to the log. NoModel before a champion has loaded; Refused (400) for an upload
        that cannot be converted."""
        try:
            found = await self.state["batcher"].predict(images)
        except ImageUnusable as exc:
            raise Refused(400, str(exc)) from None
        digits = found.probabilities.argmax(axis=1).tolist()
        self.metrics.predicted(digits)
        request_id = self.request_ids.next()
        served = found.served
        self.book.remember(request_id, served.version, digits)
        if self.log is not None:
            self.log.record(
                Answered(
                    time.time(),
                    request_id,
                    served.name,
                    served.version,
                    found.pixels,
                    found.probabilities,
                )
            )
        return Answers(found.logits, found.probabilities, served, request_id)

    async def answer(self, kind: str, body: bytes) -> tuple[int, bytes, str | None]:
        """(HTTP status, JSON body, request id of an answer) for a request body of
        content type `kind`. Every answer gets a request id (in its JSON and the
        `X-Request-Id` header), is remembered for /feedback and is handed to the log.

        A small image is converted by the batcher, together with the uploads of
        concurrent requests; a JSON batch or a large image in a thread, so that it never
        holds up the other requests."""
        try:
            if heavy(kind, body):
                images, single = await asyncio.get_running_loop().run_in_executor(
                    self.decoding, images_in, kind, body, self.max_batch
                )
                answered = await self.answered(images)
            else:
                single = True
                answered = await self.answered(upload(body))
        except HTTPException as exc:
            return exc.status_code, orjson.dumps({"detail": exc.detail}), None
        except NoModel:
            return 503, orjson.dumps({"detail": "no champion is loaded yet"}), None
        rows = [answer_row(p) for p in answered.probabilities]
        served, request_id = answered.served, answered.request_id
        model = {"model_name": served.name, "model_version": served.version}
        answer = {**rows[0], **model} if single else {"predictions": rows, **model}
        return 200, orjson.dumps({**answer, "request_id": request_id}), request_id


async def capped_body(
    request: Request, limit: int, hold: Callable[[int], None] | None = None
) -> bytes:
    """A request's body, read with a cap: Refused (413) past `limit` bytes; `hold` is
    told the size it reaches as it arrives (`HeldBodies`)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the body is {int(declared)} bytes: at most {limit} are accepted")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Refused(413, f"the body is over {limit} bytes: at most {limit} are accepted")
            if hold is not None:
                hold(len(body))
    except ClientDisconnect:
        raise Refused(400, "the client went away before its body arrived") from None
    return bytes(body)


def too_large(what: str, limit: int) -> bytes:
    return orjson.dumps({"detail": f"{what}: at most {limit} are accepted"})


INLINE_PIXELS = 262_144
"""images up to this size (512x512: digits, the page's 280x280 drawings) are converted
by the batcher with the uploads of concurrent requests; larger ones in a thread. The
batcher converts on the event loop, all of a batch at once: with a million pixels here,
64 concurrent 1000x1000 uploads held a small request up to 1.5 s (0.3 s now)"""


def heavy(kind: str, body: bytes) -> bool:
    """A JSON batch, or an image that declares more than INLINE_PIXELS."""
    if kind in ("application/json", "text/json"):
        return True
    return declared_pixels(body) > INLINE_PIXELS


def declared_pixels(data: bytes) -> int:
    """The pixels an image declares in its header, read without decoding it; 0 for what
    is no image (refused where it is converted)."""
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width * height)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001  not an image: refused quickly where it is read
        return 0
    return int(width * height)


class PixelBudget:
    """The pixels the encoded images of one request may declare in all: MAX_PIXELS, what
    one image may have. Without it a JSON batch of 85 images of 36 million pixels each
    (8 MB of PNG) kept a decoding thread busy for 16 s."""

    def __init__(self) -> None:
        self.left = MAX_PIXELS

    def take(self, data: bytes, where: str) -> bytes:
        """`data` when its pixels fit in what is left; Refused (413) otherwise. Every
        image of a batch is weighed before any is decoded. (One image over MAX_PIXELS
        on its own is left to the conversion, which refuses it as a decompression bomb
        whichever way it was sent.)"""
        pixels = declared_pixels(data)
        if pixels > MAX_PIXELS:
            return data
        if pixels > self.left:
            raise Refused(
                413,
                f"{where}: {pixels:,} pixels would pass the {MAX_PIXELS:,} that the images"
                " of one request may have in all: send large images in requests of their"
                " own, or scale them down first",
            )
        self.left -= pixels
        return data


def upload(body: bytes) -> Upload:
    """A small upload, for the batcher to convert."""
    if not body:
        raise Refused(400, "the body is empty: send a PNG or JPEG, or JSON images")
    return Upload(body, "the upload")


def images_in(kind: str, body: bytes, max_batch: int) -> tuple[np.ndarray, bool]:
    """(N, 1, 28, 28) float32 images of a request body, and whether it sent one image."""
    if not body:
        raise Refused(400, "the body is empty: send a PNG or JPEG, or JSON images")
    if kind in ("application/json", "text/json"):
        return _json_images(body, max_batch), False
    return _converted(body, "the upload")[None], True


async def uploaded_file(request: Request, limit: int, hold: Callable[[int], None]) -> bytes:
    """The one file of a multipart upload, held (`HeldBodies`) by its declared size once
    the form has read it."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise Refused(
            411, "a multipart upload needs a Content-Length (or send the image as the body)"
        )
    if int(declared) > limit:
        raise Refused(413, f"the body is {int(declared)} bytes: at most {limit} are accepted")
    try:
        form = await request.form(max_files=1, max_fields=10, max_part_size=limit)
    except Exception as exc:  # noqa: BLE001  a malformed multipart body
        raise Refused(400, f"the multipart body cannot be read ({exc})") from None
    uploads = [v for v in form.values() if hasattr(v, "read")]
    if len(uploads) != 1 or len(form) != 1:
        raise Refused(
            400, "send one file and nothing else in the multipart form (curl -F file=@digit.png)"
        )
    hold(int(declared))  # read in: the form spools a large file to disk until now
    data = await uploads[0].read()
    if len(data) > limit:
        raise Refused(413, f"the file is over {limit} bytes")
    return bytes(data)


def _converted(data: bytes, name: str) -> np.ndarray:
    try:
        return image_from_bytes(data, name)[None].astype(np.float32)
    except PredictError as exc:
        raise Refused(400, str(exc)) from None


def _json_images(body: bytes, max_batch: int) -> np.ndarray:
    try:
        document = json.loads(body)
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # valid JSON, but Python's digit cap
            raise Refused(422, "a number of over 4,300 digits: values must be 0-255") from None
        raise Refused(400, "the body is not JSON") from None
    except RecursionError:
        raise Refused(400, "the body is not JSON") from None
    items = document.get("images") if isinstance(document, dict) else document
    if not isinstance(items, list) or not items:
        raise Refused(
            422,
            'expected a non-empty list of images (or {"images": [...]}): each a 28x28'
            " array of numbers 0-255, or a base64-encoded PNG or JPEG",
        )
    if len(items) > max_batch:
        raise Refused(413, f"a batch of {len(items)} images: at most {max_batch} are accepted")
    budget = PixelBudget()
    encoded = [
        budget.take(_base64(item, f"images[{i}]"), f"images[{i}]")
        if isinstance(item, str)
        else item
        for i, item in enumerate(items)
    ]
    return np.stack([_json_image(item, i) for i, item in enumerate(encoded)])


def _json_image(item: object, index: int) -> np.ndarray:
    """One image of a JSON batch: an encoded image's bytes (base64 undone), or an array."""
    where = f"images[{index}]"
    if isinstance(item, bytes):
        return _converted(item, where)
    try:
        array = np.asarray(item)
    except (ValueError, TypeError, OverflowError):
        raise Refused(422, f"{where}: not a 28x28 array of numbers") from None
    if array.dtype.kind not in "iuf" or _has_bool(item):
        raise Refused(422, f"{where}: not a 28x28 array of numbers (JSON numbers 0-255)")
    array = array.astype(np.float64)
    if array.shape != (28, 28):
        raise Refused(422, f"{where}: shape {list(array.shape)}, expected 28x28")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise Refused(422, f"{where}: values must be numbers from 0 to 255")
    return (array / 255.0).astype(np.float32)[None]


def _has_bool(item: object) -> bool:
    """JSON true/false among the rows (NumPy reads them as 1 and 0 beside numbers)."""
    return isinstance(item, list) and any(
        isinstance(v, bool) for row in item if isinstance(row, list) for v in row
    )


def _base64(text: str, where: str) -> bytes:
    """The bytes of base64 text: standard or URL-safe, wrapped or not, or a data: URL."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    compact = "".join(text.split())
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(compact, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    raise Refused(422, f"{where}: not base64")


def answer_row(probs: np.ndarray) -> dict[str, Any]:
    rounded = [round(p, 6) for p in probs.tolist()]
    digit = int(probs.argmax())
    return {"digit": digit, "confidence": rounded[digit], "probabilities": rounded}
