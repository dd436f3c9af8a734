"""The HTTP API: /predict, /feedback, /health, /model, /metrics, the draw-a-digit page
at /, and the OpenAPI docs at /docs (Swagger UI) and /redoc, served from files in the
package so that they work offline.

Bad input gets a 4xx whose `detail` names the problem; nothing a request sends can make
the service read a file or a URL: an upload is bytes, decoded in memory with the same
caps as `mnistops predict` (pixels, body size, batch size).
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel

from mnistops.loop.feedback import FeedbackBook, FeedbackRefused
from mnistops.loop.log_writer import PredictionLog
from mnistops.serving.batching import Batcher
from mnistops.serving.bodies import Predictor, Refused, capped_body, uploaded_file
from mnistops.serving.champion import Follower, Holder
from mnistops.serving.fast_path import PredictFastPath
from mnistops.serving.guard import GuardAndMeasure
from mnistops.serving.metrics import CONTENT_TYPE, Metrics, exposition, labelled
from mnistops.serving.protocols import add_routes
from mnistops.settings import Settings


class Answer(BaseModel):
    """The champion's answer for one image."""

    digit: int
    confidence: float
    probabilities: list[float]
    model_name: str
    model_version: str
    request_id: str


class Digit(BaseModel):
    """One image's answer within a batch."""

    digit: int
    confidence: float
    probabilities: list[float]


class BatchAnswer(BaseModel):
    """The champion's answers for a JSON batch, in its order."""

    predictions: list[Digit]
    model_name: str
    model_version: str
    request_id: str


class FeedbackBody(BaseModel):
    """The right digit for an answer of /predict (`item`: the image's index in a batch)."""

    request_id: str
    digit: int
    item: int = 0


class FeedbackAnswer(BaseModel):
    """A label taken; `replaced` is the earlier, different label of the same image, if
    any (labelling an image again with the same digit replaces nothing)."""

    request_id: str
    item: int
    digit: int
    predicted: int
    replaced: int | None
    detail: str


class Problem(BaseModel):
    """Why a request was not answered."""

    detail: str


_IMAGE = {"schema": {"type": "string", "format": "binary"}}
_PIXELS = {"type": "number", "minimum": 0, "maximum": 255}


def _rows(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "minItems": 28, "maxItems": 28, "items": items}


def predict_body(max_batch: int) -> dict[str, Any]:
    """/predict's request body as the service takes it (`bodies.images_in`): the schema
    a client generator reads is what is refused (422, 413) or answered."""
    one = {
        "oneOf": [
            {"type": "string", "description": "a base64 PNG or JPEG (or a data: URL)"},
            _rows(_rows(_PIXELS)),
        ]
    }
    images = {"type": "array", "minItems": 1, "maxItems": max_batch, "items": one}
    wrapped = {"type": "object", "required": ["images"], "properties": {"images": images}}
    as_json = {
        "schema": {
            "oneOf": [images, wrapped],
            "description": "28x28 arrays of numbers 0-255, or base64 PNG/JPEG strings",
        }
    }
    return {
        "required": True,
        "content": {
            "image/png": _IMAGE,
            "image/jpeg": _IMAGE,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "additionalProperties": {"type": "string", "format": "binary"},
                    "minProperties": 1,
                    "maxProperties": 1,
                    "description": "one file and nothing else, as `file` (any field name is taken)",
                }
            },
            "application/json": as_json,
            "text/json": as_json,
            "*/*": {
                **_IMAGE,
                "description": "any other content type: the body is an image file's bytes",
            },
        },
    }


def create_app(settings: Settings, holder: Holder | None = None) -> FastAPI:
    """The application; with its lifespan, a follower of `champion` and the batcher. The
    server runs `app.state.asgi`: the API key check and the metrics around everything,
    and /predict answered before FastAPI's routing."""
    holder = holder or Holder()
    name = settings.model_registry.name
    metrics = Metrics(frozenset({"/predict", "/invocations", f"/v2/models/{name}/infer"}))
    serve = settings.serve
    state: dict[str, Any] = {}
    log = PredictionLog(settings) if serve.log.enabled else None
    book = FeedbackBook(settings)
    predictor = Predictor(settings, metrics, state, log, book)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        follower = Follower(settings, holder, serve.poll_s)
        follower.start()
        batcher = Batcher(holder, serve.max_batch)
        batcher.start()
        state["batcher"] = batcher
        for started in (log,) if log is not None else ():
            started.start()
        # What is loaded by now (torch, MLflow, the app: about a million objects) lives
        # as long as the service: out of the collector's full passes, which the log's
        # buffered records would otherwise trigger every few seconds.
        gc.freeze()
        yield
        follower.stopping.set()
        await batcher.stop()
        for started in (log,) if log is not None else ():
            started.close()

    # /docs and /redoc load Swagger UI and ReDoc from the package's files, not a CDN.
    app = FastAPIOffline(
        swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io
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
        openapi_extra={"requestBody": predict_body(serve.max_batch)},
        responses={
            200: {"model": Answer | BatchAnswer, "description": "one image, or a batch"},
            400: {"model": Problem, "description": "not an image, truncated, blank, a bomb"},
            401: {"model": Problem, "description": "the API key is required (serve.api_key)"},
            411: {"model": Problem, "description": "a multipart upload without Content-Length"},
            413: {"model": Problem, "description": "the body or the batch is too large"},
            422: {"model": Problem, "description": "JSON of the wrong shape or values"},
            503: {"model": Problem, "description": "no champion is loaded yet"},
        },
    )
    async def predict(request: Request) -> Response:
        # Only multipart uploads reach this route: every other body is answered by
        # `PredictFastPath` (wired below) with the same `Predictor.answer`.
        with predictor.held.holding() as hold:
            data = await uploaded_file(request, serve.max_body_bytes, hold)
            status, body, request_id = await predictor.answer("image/*", data)
        headers = {"X-Request-Id": request_id} if request_id else None
        return Response(body, status_code=status, media_type="application/json", headers=headers)

    @app.post(
        "/feedback",
        summary="The right digit for an answer of /predict",
        description=(
            'Body: `{"request_id": "<from the answer>", "digit": 7}` (and `"item": i` for'
            " the i-th image of a batch). The labelled image becomes training data with"
            " `mnistops data add --feedback`. Labelling an image again replaces its label."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackBody.model_json_schema()}},
            }
        },
        responses={
            200: {"model": FeedbackAnswer, "description": "the label was taken"},
            400: {"model": Problem, "description": "the body is not JSON"},
            404: {"model": Problem, "description": "unknown or expired request_id"},
            413: {"model": Problem, "description": "the body is over 4 KiB"},
            422: {"model": Problem, "description": "a field is missing or wrong"},
            429: {"model": Problem, "description": "too many labels this minute"},
        },
    )
    async def feedback(request: Request) -> JSONResponse:
        return await feedback_answer(request, book, log)

    @app.get("/health", summary="Ready (200) only when a model is loaded")
    async def health() -> JSONResponse:
        return health_answer(holder)

    @app.get("/model", summary="The model that answers: version, data, accuracy, run")
    async def model() -> dict[str, Any]:
        served = holder.current
        if served is None:
            raise HTTPException(503, nothing_loaded(holder.refusals()))
        return {**served.describe(), "refused_versions": holder.refusals()}

    rendered = exposition(
        lambda: service_families(metrics, holder, name), lambda: loop_families(log, book)
    )

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(rendered(), media_type=CONTENT_TYPE)

    @app.get("/", summary="Draw a digit", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    standard = add_routes(app, predictor, holder, name)
    paths = standard | {route.path for route in app.routes if hasattr(route, "path")}
    key = serve.api_key.get_secret_value().encode() if serve.api_key is not None else None
    # What the server runs: the key and the metrics first, then the fast path of
    # /predict, both in front of FastAPI's own layers (its telemetry check, Starlette's
    # error middleware: a tenth of the service's time per prediction), then FastAPI.
    app.state.asgi = GuardAndMeasure(PredictFastPath(app, predictor), metrics, paths, key)
    app.state.metrics = metrics
    return app


FEEDBACK_BYTES = 4096


def nothing_loaded(refused: dict[str, str]) -> str:
    """Why /model has no model to describe: still loading, or the champion refused."""
    if not refused:
        return "no champion is loaded yet"
    reasons = "; ".join(f"v{version}: {why}" for version, why in refused.items())
    return f"no champion is loaded: refused {reasons}"


def health_answer(holder: Holder) -> JSONResponse:
    """Ready with the version it serves; else loading, or refused: it refused the
    champion, and nothing loads until the alias moves (`stack up` stops waiting). Which
    version and why stay behind the API key, in /model: /health is open to all."""
    served = holder.current
    if served is not None:
        return JSONResponse({"status": "ready", "model_version": served.version})
    status = "refused" if holder.refusals() else "loading"
    return JSONResponse({"status": status, "model_version": None}, 503)


async def feedback_answer(
    request: Request, book: FeedbackBook, log: PredictionLog | None
) -> JSONResponse:
    """A /feedback request taken into the book and the log, or refused with its 4xx."""
    try:
        document = await feedback_document(request)
        label, replaced = book.take(document)
    except FeedbackRefused as exc:
        wait = exc.retry_after_s
        headers = {"Retry-After": str(wait)} if wait is not None else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)
    if log is not None:
        log.label(label)
    detail = f"labelled {label.digit}"
    if replaced == label.digit:
        detail += ", as before"
        replaced = None
    elif replaced is not None:
        detail += f", replacing the earlier label {replaced}: the later label wins"
    if log is None:
        detail += " (serve.log.enabled is false: not recorded)"
    answer = FeedbackAnswer(
        request_id=label.request_id,
        item=label.item,
        digit=label.digit,
        predicted=label.predicted,
        replaced=replaced,
        detail=detail,
    )
    return JSONResponse(answer.model_dump())


async def feedback_document(request: Request) -> object:
    """The JSON of a /feedback body, read with a 4 KiB cap."""
    try:
        body = await capped_body(request, FEEDBACK_BYTES)
    except Refused:
        raise FeedbackRefused(413, f"the body is over {FEEDBACK_BYTES} bytes") from None
    try:
        return json.loads(body, object_pairs_hook=_once_each)
    except _Repeated as exc:
        raise FeedbackRefused(422, f"{exc}: give each field once") from None
    except (ValueError, RecursionError):
        raise FeedbackRefused(
            400, 'the body is not JSON: send {"request_id": "...", "digit": 7}'
        ) from None


class _Repeated(Exception):
    """A JSON object that names one field twice (which one would win is a guess)."""


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _Repeated(f"the field {key[:40]!r} is given twice")
        found[key] = value
    return found


def service_families(metrics: Metrics, holder: Holder, name: str) -> list[Metric]:
    """The service's own families of /metrics, with the version it serves now."""
    served = holder.current
    return metrics.families(name, served.version if served else None, holder.swaps)


def loop_families(log: PredictionLog | None, book: FeedbackBook) -> list[Metric]:
    """The prediction log's and /feedback's families of /metrics."""
    feedback = labelled(
        "mnistops_feedback",
        "Labels sent to /feedback: taken, or refused for their rate.",
        "outcome",
        {"taken": book.accepted, "rate_limited": book.refused},
    )
    if log is None:
        return [feedback]
    counts = log.counts
    records = labelled(
        "mnistops_prediction_log_records",
        "Answered images: written to the object store, or shed because the log's buffer was full.",
        "outcome",
        {"written": counts.written, "shed": counts.shed},
    )
    cpu = labelled(
        "mnistops_prediction_log_cpu_seconds",
        "CPU the log used: its thread in the service, and its writer process.",
        "part",
        {"thread": log.thread_cpu_s, "writer": log.writer.cpu_seconds()},
    )
    return [
        feedback,
        records,
        GaugeMetricFamily(
            "mnistops_prediction_log_buffered", "Records waiting to be written.", log.waiting
        ),
        CounterMetricFamily(
            "mnistops_prediction_log_write_errors",
            "Batches the store refused (kept and tried again).",
            counts.write_errors,
        ),
        cpu,
    ]


PAGE = files("mnistops.serving").joinpath("page.html").read_text()
