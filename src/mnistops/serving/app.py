"""The HTTP API: /predict, /health, /model, /metrics, the draw-a-digit page at /, and
FastAPI's OpenAPI docs at /docs.

Bad input gets a 4xx whose `detail` names the problem; nothing a request sends can make
the service read a file or a URL: an upload is bytes, decoded in memory with the same
caps as `mnistops predict` (pixels, body size, batch size).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import struct
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from PIL import Image
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnistops.predict import PredictError, image_from_bytes
from mnistops.serving.batching import Batcher, NoModel
from mnistops.serving.champion import Follower, Holder
from mnistops.serving.metrics import Metrics
from mnistops.settings import Settings


class Answer(BaseModel):
    """The champion's answer for one image."""

    digit: int
    confidence: float
    probabilities: list[float]
    model_name: str
    model_version: str


class BatchAnswer(BaseModel):
    """The champion's answers for a JSON batch, in its order."""

    predictions: list[dict[str, Any]]
    model_name: str
    model_version: str


_IMAGE = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {
    "required": True,
    "content": {
        "image/png": _IMAGE,
        "image/jpeg": _IMAGE,
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "application/json": {
            "schema": {
                "oneOf": [
                    {"type": "array", "items": {}},
                    {"type": "object", "properties": {"images": {"type": "array", "items": {}}}},
                ],
                "description": "28x28 arrays of numbers 0-255, or base64 PNG/JPEG strings",
            }
        },
    },
}

OPEN_PATHS = {"/", "/health"}
"""answered without the API key: the page (it asks for the key) and the health check"""


class Refused(HTTPException):
    """A request the service will not answer; `detail` says why."""


def create_app(settings: Settings, holder: Holder | None = None) -> FastAPI:
    """The application; with its lifespan, a follower of `champion` and the batcher."""
    holder = holder or Holder()
    metrics = Metrics()
    serve = settings.serve
    state: dict[str, Any] = {}
    predictor = Predictor(settings, metrics, state)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        follower = Follower(settings, holder, serve.poll_s)
        follower.start()
        batcher = Batcher(holder, serve.max_batch)
        batcher.start()
        state["batcher"] = batcher
        yield
        follower.stopping.set()
        await batcher.stop()

    app = FastAPI(
        title="mnistops serve",
        summary=f"The champion of {settings.model_registry.name}, following the registry.",
        lifespan=lifespan,
    )

    @app.post(
        "/predict",
        summary="The champion's digit for one image or a batch",
        description=(
            "Body: a PNG or JPEG (any size or colour; `Content-Type: image/png`, or a"
            ' multipart upload), or JSON: a list (or `{"images": [...]}`) of 28x28 arrays'
            " of 0-255 or of base64-encoded images."
        ),
        openapi_extra={"requestBody": PREDICT_BODY},
        responses={
            200: {"model": Answer, "description": "one image (a batch: `BatchAnswer`)"},
            400: {"description": "not an image, truncated, blank, a bomb, not JSON"},
            413: {"description": "the body or the batch is too large"},
            422: {"description": "JSON of the wrong shape or values"},
            503: {"description": "no champion is loaded yet"},
        },
    )
    async def predict(request: Request) -> Response:
        # Only multipart uploads reach this route: the other bodies are answered by
        # `GuardAndMeasure` before FastAPI (the same functions, without its overhead).
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            data = await _uploaded_file(request, serve.max_body_bytes)
            status, body = await predictor.answer("image/*", data)
        else:
            status, body = await predictor.answer(kind, await _body(request, serve.max_body_bytes))
        return Response(body, status_code=status, media_type="application/json")

    @app.get("/health", summary="Ready (200) only when a model is loaded")
    async def health() -> JSONResponse:
        served = holder.current
        if served is None:
            return JSONResponse({"status": "loading", "model_version": None}, status_code=503)
        return JSONResponse({"status": "ready", "model_version": served.version})

    @app.get("/model", summary="The model that answers: version, data, accuracy, run")
    async def model() -> dict[str, Any]:
        served = holder.current
        if served is None:
            raise HTTPException(503, "no champion is loaded yet")
        return {**served.describe(), "refused_versions": holder.refused}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        served = holder.current
        text = metrics.render(
            settings.model_registry.name, served.version if served else None, holder.swaps
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", summary="Draw a digit", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    paths = {route.path for route in app.routes if hasattr(route, "path")}
    key = serve.api_key.get_secret_value().encode() if serve.api_key is not None else None
    app.add_middleware(GuardAndMeasure, metrics=metrics, paths=paths, key=key, predictor=predictor)
    app.state.metrics = metrics
    return app


class Predictor:
    """A body in, an answer out: what POST /predict does, whichever way it arrives."""

    def __init__(self, settings: Settings, metrics: Metrics, state: dict[str, Any]) -> None:
        self.limit = settings.serve.max_body_bytes
        self.max_batch = settings.serve.max_batch
        self.metrics = metrics
        self.state = state
        self.decoding = ThreadPoolExecutor(2, thread_name_prefix="decode")

    async def answer(self, kind: str, body: bytes) -> tuple[int, bytes]:
        """(HTTP status, JSON body) for a request body of content type `kind`.

        A small image is converted right here (a fraction of a millisecond); a batch or a
        large image in a thread, so that it never holds up the other requests."""
        try:
            if _heavy(kind, body):
                images, single = await asyncio.get_running_loop().run_in_executor(
                    self.decoding, _images_in, kind, body, self.max_batch
                )
            else:
                images, single = _images_in(kind, body, self.max_batch)
            probs, served = await self.state["batcher"].predict(images)
        except HTTPException as exc:
            return exc.status_code, orjson.dumps({"detail": exc.detail})
        except NoModel:
            return 503, orjson.dumps({"detail": "no champion is loaded yet"})
        rows = [_answer(p) for p in probs]
        self.metrics.predicted([row["digit"] for row in rows])
        model = {"model_name": served.name, "model_version": served.version}
        return 200, orjson.dumps({**rows[0], **model} if single else {"predictions": rows, **model})


class GuardAndMeasure:
    """The API key (when set) and the request metrics, as plain ASGI: Starlette's
    `BaseHTTPMiddleware` costs a task and a stream per request, a third of the time of a
    small prediction."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        paths: set[str],
        key: bytes | None,
        predictor: Predictor,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths
        self.key = key
        self.predictor = predictor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        path = scope["path"] if scope["path"] in self.paths else "other"
        status = {"code": 500}
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                refused = JSONResponse(
                    {"detail": "an API key is required: Authorization: Bearer KEY"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await refused(scope, receive, send)
                self.metrics.observe(path, 401, time.perf_counter() - began)
                return

        if scope["path"] == "/predict" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            kind = headers.get(b"content-type", b"").decode("latin-1")
            kind = kind.split(";")[0].strip().lower()
            if kind != "multipart/form-data":
                status["code"], body = await self._predict(kind, headers, receive)
                await send(
                    {
                        "type": "http.response.start",
                        "status": status["code"],
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                self.metrics.observe(path, status["code"], time.perf_counter() - began)
                return

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.observe(path, status["code"], time.perf_counter() - began)

    async def _predict(
        self, kind: str, headers: dict[bytes, bytes], receive: Receive
    ) -> tuple[int, bytes]:
        limit = self.predictor.limit
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return 413, _too_large(f"the body is {int(declared)} bytes", limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, orjson.dumps({"detail": "the client went away"})
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413, _too_large(f"the body is over {limit} bytes", limit)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return await self.predictor.answer(kind, b"".join(chunks))


PAGE = files("mnistops.serving").joinpath("page.html").read_text()


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused past `limit` bytes (memory stays bounded)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the body is {int(declared)} bytes: at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is over {limit} bytes: at most {limit} are accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(what: str, limit: int) -> bytes:
    return orjson.dumps({"detail": f"{what}: at most {limit} are accepted"})


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INLINE_PIXELS = 1_000_000
"""images up to this size are converted on the event loop; larger ones in a thread"""


def _heavy(kind: str, body: bytes) -> bool:
    """A JSON batch, or an image that declares more than INLINE_PIXELS (read from its
    header, without decoding it)."""
    if kind in ("application/json", "text/json"):
        return True
    if body[:8] == PNG_SIGNATURE and body[12:16] == b"IHDR":
        width, height = struct.unpack(">II", body[16:24])
        return width * height > INLINE_PIXELS
    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001  not an image: refused quickly where it is read
        return False
    return width * height > INLINE_PIXELS


def _images_in(kind: str, body: bytes, max_batch: int) -> tuple[np.ndarray, bool]:
    """(N, 1, 28, 28) float32 images of a request body, and whether it sent one image."""
    if not body:
        raise Refused(400, "the body is empty: send a PNG or JPEG, or JSON images")
    if kind in ("application/json", "text/json"):
        return _json_images(body, max_batch), False
    return _converted(body, "the upload")[None], True


async def _uploaded_file(request: Request, limit: int) -> bytes:
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
    if len(uploads) != 1:
        raise Refused(400, "send one file in the multipart form (e.g. curl -F file=@digit.png)")
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
    except (ValueError, RecursionError):
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
    return np.stack([_json_image(item, i) for i, item in enumerate(items)])


def _json_image(item: object, index: int) -> np.ndarray:
    where = f"images[{index}]"
    if isinstance(item, str):
        return _converted(_base64(item, where), where)
    try:
        array = np.asarray(item, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise Refused(422, f"{where}: not a 28x28 array of numbers") from None
    if array.shape != (28, 28):
        raise Refused(422, f"{where}: shape {list(array.shape)}, expected 28x28")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise Refused(422, f"{where}: values must be numbers from 0 to 255")
    return (array / 255.0).astype(np.float32)[None]


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


def _answer(probs: np.ndarray) -> dict[str, Any]:
    digit = int(probs.argmax())
    return {
        "digit": digit,
        "confidence": round(float(probs[digit]), 6),
        "probabilities": [round(float(p), 6) for p in probs],
    }
