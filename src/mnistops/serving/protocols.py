"""The standard protocols beside /predict, for clients nobody here wrote:

- MLflow's scoring protocol, `POST /invocations`: what `mlflow models serve` answers for
  this model, so that a client written for it only changes its URL;
- the Open Inference Protocol (V2) of KServe and Triton, `/v2/...`, with its binary
  tensor extension (what `tritonclient` sends by default).

Both take the model's own input, as its MLflow signature says: (N, 1, 28, 28) pixels
scaled to [0, 1] (V2 also takes UINT8 pixels 0-255), and answer with its logits. Every
answer goes through `Predictor.answered`, as /predict's do: the same batcher, /metrics,
/feedback book (the `X-Request-Id` header) and prediction log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from enum import Enum
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException

from mnistops.serving.batching import NoModel
from mnistops.serving.bodies import Answers, Predictor, Refused, capped_body
from mnistops.serving.champion import Holder
from mnistops.serving.guard import mlflow_code
from mnistops.serving.tensors import (
    HEADER_LENGTH,
    V2_INPUT,
    V2_OUTPUTS,
    Unusable,
    decompressed,
    mlflow_answer,
    mlflow_images,
    v2_answer,
    v2_images,
    v2_output_names,
    v2_request,
)


def model_metadata(holder: Holder, name: str) -> dict[str, Any]:
    served = holder.current
    return {
        "name": name,
        "versions": [served.version] if served is not None else [],
        "platform": "mnistops",
        "inputs": [{"name": V2_INPUT, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": output, "datatype": kind, "shape": [-1, 10] if output != "digit" else [-1]}
            for output, kind in V2_OUTPUTS.items()
        ],
    }


def _error(
    status: int, message: str, mlflow: bool, headers: Mapping[str, str] | None = None
) -> Response:
    """An error as each protocol words it: MLflow's `error_code`/`message`, V2's `error`."""
    content = (
        {"error_code": mlflow_code(status), "message": message} if mlflow else {"error": message}
    )
    return Response(orjson.dumps(content), status, headers, media_type="application/json")


def _unpacked_images(
    images_of: Callable[[bytes], np.ndarray], body: bytes, encoding: str | None, limit: int
) -> np.ndarray:
    return images_of(decompressed(body, encoding, limit))


async def _answered(
    request: Request, predictor: Predictor, images_of: Callable[[bytes], np.ndarray], mlflow: bool
) -> Answers | Response:
    """The answers for the images of the request's body, or the protocol's error."""
    try:
        with predictor.held.holding() as hold:
            body = await capped_body(request, predictor.limit, hold)
            encoding = request.headers.get("content-encoding")
            if encoding is not None:
                hold(predictor.limit)  # what it may unpack to
            # unpacked and parsed in a thread, as /predict's JSON: a large body never
            # holds up the others
            images = await asyncio.get_running_loop().run_in_executor(
                predictor.decoding, _unpacked_images, images_of, body, encoding, predictor.limit
            )
            return await predictor.answered(images)
    except Unusable as exc:
        return _error(exc.status, str(exc), mlflow)
    except Refused as exc:
        return _error(exc.status_code, str(exc.detail), mlflow, exc.headers)
    except NoModel:
        return _error(503, "no champion is loaded yet", mlflow)


TAGS: list[str | Enum] = ["standard protocols"]


def add_routes(app: FastAPI, predictor: Predictor, holder: Holder, name: str) -> set[str]:
    """/invocations and the V2 routes; returns their paths (for /metrics' labels)."""
    add_mlflow_routes(app, predictor, holder)
    return {"/invocations", "/ping", "/version", *add_v2_routes(app, predictor, holder, name)}


def add_mlflow_routes(app: FastAPI, predictor: Predictor, holder: Holder) -> None:
    """/invocations, and the checks of readiness and version that MLflow's client uses."""

    def images_of(body: bytes) -> np.ndarray:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise Unusable("the body is not JSON") from None
        return mlflow_images(document, predictor.max_batch)

    @app.post(
        "/invocations",
        summary="MLflow's scoring protocol (as `mlflow models serve`)",
        description=(
            "Body: `inputs` or `instances` (N images of 1x28x28 pixels in [0, 1]), or"
            " `dataframe_split`/`dataframe_records` (a column of 784 pixels per image, or"
            ' 784 columns). Answer: `{"predictions": [[10 logits], ...]}`.'
        ),
        tags=TAGS,
    )
    async def invocations(request: Request) -> Response:
        answers = await _answered(request, predictor, images_of, mlflow=True)
        if isinstance(answers, Response):
            return answers
        headers = {"X-Request-Id": answers.request_id}
        return Response(mlflow_answer(answers), media_type="application/json", headers=headers)

    @app.get("/ping", summary="MLflow's readiness check: a model is loaded", tags=TAGS)
    async def ping() -> Response:
        return Response(b"\n", 200 if holder.current is not None else 503)

    @app.get("/version", summary="The server's version (as MLflow's /version)", tags=TAGS)
    async def version() -> Response:
        return Response(f"mnistops {package_version('mnistops')}", media_type="text/plain")


async def v2_worded(request: Request, exc: Exception) -> Response:
    """FastAPI's own 404s and 405s, in V2's words under /v2 (tritonclient reads `error`)."""
    assert isinstance(exc, StarletteHTTPException)
    if not request.url.path.startswith("/v2"):
        return await http_exception_handler(request, exc)
    return _error(exc.status_code, str(exc.detail), mlflow=False)


def add_v2_routes(app: FastAPI, predictor: Predictor, holder: Holder, name: str) -> set[str]:
    """The Open Inference Protocol's routes for the one model this service serves."""
    model_path = f"/v2/models/{name}"
    app.add_exception_handler(StarletteHTTPException, v2_worded)

    @app.get("/v2", summary="V2: the server's metadata", tags=TAGS)
    async def server_metadata() -> dict[str, Any]:
        return {"name": "mnistops", "version": "2", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="V2: live", tags=TAGS)
    async def live() -> dict[str, bool]:
        return {"live": True}

    def ready_answer() -> Response:
        ready = holder.current is not None
        return Response(orjson.dumps({"ready": ready}), 200 if ready else 503)

    @app.get("/v2/health/ready", summary="V2: a model is loaded", tags=TAGS)
    async def ready() -> Response:
        return ready_answer()

    def unknown(model: str, version: str | None) -> Response | None:
        if model != name:
            return _error(404, f"unknown model {model[:60]!r}: this service serves {name!r}", False)
        served = holder.current
        if version is not None and (served is None or version != served.version):
            now = f"v{served.version} is champion" if served else "no version is loaded yet"
            return _error(404, f"{name} version {version[:20]!r} is not served ({now})", False)
        return None

    @app.get("/v2/models/{model}", summary="V2: the model's metadata", tags=TAGS)
    @app.get("/v2/models/{model}/versions/{version}", include_in_schema=False)
    async def metadata(model: str, version: str | None = None) -> Response:
        return unknown(model, version) or Response(
            orjson.dumps(model_metadata(holder, name)), media_type="application/json"
        )

    @app.get("/v2/models/{model}/ready", summary="V2: the model is loaded", tags=TAGS)
    @app.get("/v2/models/{model}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(model: str, version: str | None = None) -> Response:
        return unknown(model, version) or ready_answer()

    @app.post("/v2/models/{model}/infer", summary="V2: inference", tags=TAGS)
    @app.post("/v2/models/{model}/versions/{version}/infer", include_in_schema=False)
    async def infer(request: Request, model: str, version: str | None = None) -> Response:
        return unknown(model, version) or await v2_inference(request, predictor)

    return {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        model_path,
        f"{model_path}/ready",
        f"{model_path}/infer",
    }


async def v2_inference(request: Request, predictor: Predictor) -> Response:
    """POST .../infer: JSON, or a JSON header and binary tensors after it."""
    parsed: dict[str, Any] = {}

    def images_of(body: bytes) -> np.ndarray:
        document, binary = v2_request(body, request.headers.get(HEADER_LENGTH))
        parsed.update(document)
        v2_output_names(document)
        return v2_images(document, binary, predictor.max_batch)

    answers = await _answered(request, predictor, images_of, mlflow=False)
    if isinstance(answers, Response):
        return answers
    body, header = v2_answer(parsed, answers)
    headers = {"X-Request-Id": answers.request_id}
    if header is None:
        return Response(body, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(header)
    return Response(body, media_type="application/octet-stream", headers=headers)
