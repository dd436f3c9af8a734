"""The API key (when set) and the request metrics, in front of everything the service
answers, as plain ASGI: Starlette's `BaseHTTPMiddleware` costs a task and a stream per
request, a third of the time of a small prediction."""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnistops.serving.metrics import Metrics

OPEN_PATHS = {"/", "/health", "/ping", "/v2/health/live", "/v2/health/ready"}
"""answered without the API key: the page (it asks for the key) and the health checks"""


MLFLOW_CODES = {401: "UNAUTHENTICATED", 503: "TEMPORARILY_UNAVAILABLE"}


def mlflow_code(status: int) -> str:
    """The `error_code` MLflow's scoring protocol gives an HTTP status."""
    return MLFLOW_CODES.get(status, "BAD_REQUEST")


def refusal(path: str, message: str, status: int) -> dict[str, str]:
    """A refusal as the path's protocol words it: V2's `error`, MLflow's `error_code` and
    `message`, FastAPI's `detail` elsewhere."""
    if path.startswith("/v2"):
        return {"error": message}
    if path == "/invocations":
        return {"error_code": mlflow_code(status), "message": message}
    return {"detail": message}


class GuardAndMeasure:
    """Refuses a request without the API key (401) and measures every answer."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: set[str], key: bytes | None) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        path = scope["path"] if scope["path"] in self.paths else "other"
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._allowed(scope):
            key_needed = "an API key is required: Authorization: Bearer KEY"
            await _refused(scope, 401, key_needed, {"WWW-Authenticate": "Bearer"})(
                scope, receive, send
            )
            self.metrics.observe(path, 401, time.perf_counter() - began)
            return
        status = {"code": 500, "started": False}

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except asyncio.CancelledError:
            # uvicorn cancels what is still being answered once its graceful shutdown
            # (5 s) is over: a 503 for each, not a traceback in the log for each
            if not status["started"]:
                stopping = "the service is stopping: try again"
                await _refused(scope, 503, stopping, {"Retry-After": "1"})(scope, receive, sent)
        finally:
            self.metrics.observe(path, status["code"], time.perf_counter() - began)

    def _allowed(self, scope: Scope) -> bool:
        assert self.key is not None
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def _refused(scope: Scope, status: int, message: str, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(refusal(scope["path"], message, status), status, headers)
