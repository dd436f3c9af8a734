"""A client of the running service's /predict and /feedback, as the demo's loop stage
(and any script) uses them: JSON batches of 28x28 images, labels by request id."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import numpy as np

from mnistops.errors import MnistopsError
from mnistops.settings import Settings


class ServiceError(MnistopsError):
    """The service refused a request or could not be reached."""


@dataclass(frozen=True)
class Answered:
    request_id: str
    model_version: str
    digits: list[int]


def _headers(settings: Settings) -> dict[str, str]:
    key = settings.serve.api_key
    return {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}


class ServiceClient:
    """Requests to the running service over one connection (a new httpx client per
    request made each of the demo's 124 labels take 30 ms)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = httpx.Client(headers=_headers(settings), timeout=60)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.http.close()

    def post(self, path: str, body: object) -> dict[str, object]:
        url = f"{self.settings.local_serve_url}{path}"
        try:
            answer = self.http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise ServiceError(
                f"the prediction service at {self.settings.local_serve_url} did not answer"
                f" {path} ({exc.__class__.__name__}): is it running? `mnistops serve --detach`"
            ) from None
        if answer.status_code != 200:
            raise ServiceError(f"{url} answered {answer.status_code}: {answer.text[:300]}")
        found: dict[str, object] = answer.json()
        return found

    def predict_batch(self, images: np.ndarray) -> Answered:
        """The service's digits for (n, 28, 28) uint8 images, sent as one JSON batch."""
        found = self.post("/predict", images.astype(int).tolist())
        predictions = found["predictions"]
        assert isinstance(predictions, list)
        return Answered(
            str(found["request_id"]),
            str(found["model_version"]),
            [int(p["digit"]) for p in predictions],
        )

    def label(self, request_id: str, item: int, digit: int) -> None:
        """Tell the service the right digit of image `item` of an answer."""
        self.post("/feedback", {"request_id": request_id, "item": item, "digit": digit})
