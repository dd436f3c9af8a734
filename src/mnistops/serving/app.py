"""The HTTP API: /predict, /health, /model, /metrics, the draw-a-digit page at /, and
FastAPI's OpenAPI docs at /docs.

Bad input gets a 4xx whose `detail` names the problem; nothing a request sends can make
the service read a file or a URL: an upload is bytes, decoded in memory with the same
caps as `mnistops predict` (pixels, body size, batch size).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnistops.predict import PredictError, image_from_bytes
from mnistops.serving.batching import Batcher, NoModel
from mnistops.serving.champion import Follower, Holder
from mnistops.serving.metrics import Metrics
from mnistops.settings import Settings

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
    return app


class Predictor:
    """A body in, an answer out: what POST /predict does, whichever way it arrives."""

    def __init__(self, settings: Settings, metrics: Metrics, state: dict[str, Any]) -> None:
        self.limit = settings.serve.max_body_bytes
        self.max_batch = settings.serve.max_batch
        self.metrics = metrics
        self.state = state

    async def answer(self, kind: str, body: bytes) -> tuple[int, bytes]:
        """(HTTP status, JSON body) for a request body of content type `kind`."""
        try:
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
            token = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(token, self.key):
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


def _images_in(kind: str, body: bytes, max_batch: int) -> tuple[np.ndarray, bool]:
    """(N, 1, 28, 28) float32 images of a request body, and whether it sent one image."""
    if not body:
        raise Refused(400, "the body is empty: send a PNG or JPEG, or JSON images")
    if kind in ("application/json", "text/json"):
        return _json_images(body, max_batch), False
    return _converted(body, "the upload")[None], True


async def _uploaded_file(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
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
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(422, f"{where}: not base64") from None
        return _converted(data, where)
    try:
        array = np.asarray(item, dtype=np.float64)
    except (ValueError, TypeError):
        raise Refused(422, f"{where}: not a 28x28 array of numbers") from None
    if array.shape != (28, 28):
        raise Refused(422, f"{where}: shape {list(array.shape)}, expected 28x28")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise Refused(422, f"{where}: values must be numbers from 0 to 255")
    return (array / 255.0).astype(np.float32)[None]


def _answer(probs: np.ndarray) -> dict[str, Any]:
    digit = int(probs.argmax())
    return {
        "digit": digit,
        "confidence": round(float(probs[digit]), 6),
        "probabilities": [round(float(p), 6) for p in probs],
    }
