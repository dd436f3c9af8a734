"""The fast path of POST /predict: every body but a multipart upload is answered here,
as plain ASGI, before FastAPI's routing, request parsing and response validation (about
half the time of a small prediction). It calls the same `Predictor.answer` as the
documented route in `app.py`, which answers multipart uploads and describes /predict in
the OpenAPI schema; `app.create_app` wires this in, in one place."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from mnistops.serving.bodies import Busy, Predictor, too_large


class PredictFastPath:
    """Answers POST /predict (not multipart) itself; passes everything else on."""

    def __init__(self, app: ASGIApp, predictor: Predictor) -> None:
        self.app = app
        self.predictor = predictor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        encoding = content_encoding(scope["headers"])
        if kind == "multipart/form-data" and encoding is None:
            await self.app(scope, receive, send)
            return
        told: Mapping[str, str] = {}
        try:
            if encoding is not None:
                status, body, request_id = 415, not_unpacked(encoding), None
            else:
                with self.predictor.held.holding() as hold:
                    status, body, request_id = await self._answer(kind, headers, receive, hold)
        except Busy as exc:
            status, body, request_id = 503, orjson.dumps({"detail": exc.detail}), None
            told = exc.headers or {}
        sent = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if request_id is not None:
            sent.append((b"x-request-id", request_id.encode()))
        sent += [(name.lower().encode(), value.encode()) for name, value in told.items()]
        await send({"type": "http.response.start", "status": status, "headers": sent})
        await send({"type": "http.response.body", "body": body})

    async def _answer(
        self, kind: str, headers: dict[bytes, bytes], receive: Receive, hold: Callable[[int], None]
    ) -> tuple[int, bytes, str | None]:
        """The body read with the service's size cap, then answered; a large one is
        held as it arrives (`hold`: Busy when the service holds too many)."""
        limit = self.predictor.limit
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return 413, too_large(f"the body is {int(declared)} bytes", limit), None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, orjson.dumps({"detail": "the client went away"}), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413, too_large(f"the body is over {limit} bytes", limit), None
            hold(size)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return await self.predictor.answer(kind, b"".join(chunks))


def content_encoding(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's Content-Encoding, every such header read (HTTP joins them with
    commas), when it names anything but identity; None when the body comes as it is."""
    said = ", ".join(v.decode("latin-1").strip() for k, v in headers if k == b"content-encoding")
    codings = [c.strip().lower() for c in said.split(",") if c.strip()]
    return said if any(c != "identity" for c in codings) else None


def not_unpacked(encoding: str) -> bytes:
    """Why a /predict body with a Content-Encoding is refused (it would be read as the
    image or JSON itself: "not JSON" said nothing of the cause)."""
    return orjson.dumps(
        {
            "detail": f"Content-Encoding {encoding[:20]!r} is not taken by /predict: send the"
            " image or JSON as it is (/invocations and /v2/models/.../infer take gzip)"
        }
    )
