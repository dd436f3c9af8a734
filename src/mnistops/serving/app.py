"""The HTTP API: /predict, /health, /model, /metrics, the draw-a-digit page at /, and
FastAPI's OpenAPI docs at /docs.

Bad input gets a 4xx whose `detail` names the problem; nothing a request sends can make
the service read a file or a URL: an upload is bytes, decoded in memory with the same
caps as `mnistops predict` (pixels, body size, batch size).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from mnistops.serving.batching import Batcher
from mnistops.serving.bodies import Predictor, uploaded_file
from mnistops.serving.champion import Follower, Holder
from mnistops.serving.fast_path import PredictFastPath
from mnistops.serving.guard import GuardAndMeasure
from mnistops.serving.metrics import Metrics
from mnistops.settings import Settings


class Answer(BaseModel):
    """The champion's answer for one image."""

    digit: int
    confidence: float
    probabilities: list[float]
    model_name: str
    model_version: str


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


class Problem(BaseModel):
    """Why a request was not answered."""

    detail: str


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
        data = await uploaded_file(request, serve.max_body_bytes)
        status, body = await predictor.answer("image/*", data)
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
    # Outermost last: the key and the metrics first, then the fast path of /predict.
    app.add_middleware(PredictFastPath, predictor=predictor)
    app.add_middleware(GuardAndMeasure, metrics=metrics, paths=paths, key=key)
    app.state.metrics = metrics
    return app


PAGE = files("mnistops.serving").joinpath("page.html").read_text()
