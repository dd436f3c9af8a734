"""Test-set predictions kept with each run, so the gate never re-runs an old model.

Every run logs its test predictions as `evaluation/test_predictions/<test set digest>.npz`
(one digit per test image, and the labels; int8). The digest names the exact test images
and labels, so predictions are only ever paired with predictions on the same images. A champion from
before this existed, or one scored on other test images, is scored once on these images
and the result is stored the same way on its run.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

ARTIFACT_DIR = "evaluation/test_predictions"


@dataclass(frozen=True)
class LabelledImages:
    """Labelled test images (uint8, N x 28 x 28) and their digest."""

    images: np.ndarray
    labels: np.ndarray

    @cached_property
    def digest(self) -> str:
        """Hashed once: the gate and the logging steps ask for it many times."""
        return test_set_digest(self.images, self.labels)


def test_set_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """16 hex digits naming these exact test images and labels, in this order."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def artifact_path(digest: str) -> str:
    return f"{ARTIFACT_DIR}/{digest}.npz"


def accuracy_metric(digest: str) -> str:
    """The run metric that vouches for its stored predictions on the test set `digest`."""
    return f"test_accuracy_on_{digest}"


def log_predictions(
    client: MlflowClient, run_id: str, test: LabelledImages, predicted: np.ndarray
) -> None:
    """Store the predictions, then their accuracy as a metric (what they are checked
    against when read: a file replaced by hand no longer matches it)."""
    with tempfile.TemporaryDirectory(prefix="predictions-") as tmp:
        path = Path(tmp) / f"{test.digest}.npz"
        np.savez(
            path,
            predicted=np.asarray(predicted, dtype=np.int8),
            labels=np.asarray(test.labels, dtype=np.int8),
        )
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    accuracy = float((np.asarray(predicted) == test.labels).mean()) if len(test.labels) else 0.0
    client.log_metric(run_id, accuracy_metric(test.digest), accuracy)


def _digits(values: np.ndarray) -> bool:
    return (
        values.ndim == 1
        and values.dtype.kind in "iu"
        and bool(((values >= 0) & (values <= 9)).all())
    )


MAX_STORED_BYTES = 64 * 1024 * 1024
"""the most a stored predictions file may hold unpacked (10,000 images take 20 KB)"""


def _small_zip(path: Path) -> bool:
    """Whether an .npz (a zip) unpacks to a sane size: anyone who can write to MLflow can
    put a file here, and a zip bomb must not fill the gate's memory."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist()) <= MAX_STORED_BYTES


def read_stored(
    client: MlflowClient, run_id: str, digest: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(predicted, labels) a run stored for the test set `digest`, or None when there are
    none usable (missing, unreadable, or not digits of the same length)."""
    import mlflow

    from mnistops.clients import mlflow_tracking_uri

    with tempfile.TemporaryDirectory(prefix="predictions-") as tmp:
        try:
            with mlflow_tracking_uri(client.tracking_uri):
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id,
                    artifact_path=artifact_path(digest),
                    dst_path=tmp,
                    tracking_uri=client.tracking_uri,
                )
            if not _small_zip(Path(local)):
                return None
            with np.load(local, allow_pickle=False) as saved:
                predicted, labels = saved["predicted"], saved["labels"]
        except Exception:  # noqa: BLE001  missing or unreadable: none usable
            return None
    if not (_digits(predicted) and _digits(labels) and predicted.shape == labels.shape):
        return None
    return predicted.astype(np.int64), labels.astype(np.int64)


def stored_digests(client: MlflowClient, run_id: str) -> list[str]:
    """The test sets (digests) a run has stored predictions for."""
    try:
        listed = client.list_artifacts(run_id, ARTIFACT_DIR)
    except Exception:  # noqa: BLE001
        return []
    names = [a.path.rsplit("/", 1)[-1] for a in listed if not a.is_dir]
    return [n.removesuffix(".npz") for n in names if n.endswith(".npz")]


def verified(
    client: MlflowClient, run_id: str, digest: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """`read_stored`, kept only when the predictions' accuracy is the one the run recorded
    when it stored them (`accuracy_metric`): a file put there by anyone else, or half
    written, is not used."""
    found = read_stored(client, run_id, digest)
    if found is None:
        return None
    try:
        recorded = client.get_run(run_id).data.metrics.get(accuracy_metric(digest))
    except Exception:  # noqa: BLE001
        return None
    predicted, labels = found
    accuracy = float((predicted == labels).mean()) if len(labels) else 0.0
    if recorded is None or abs(accuracy - recorded) > 0.5 / max(len(labels), 1):
        return None
    return found


def stored_predictions(
    client: MlflowClient, run_id: str, test: LabelledImages
) -> np.ndarray | None:
    """The run's stored predictions on `test`, or None (then the model is scored again)."""
    found = verified(client, run_id, test.digest)
    if found is None or not np.array_equal(found[1], test.labels):
        return None
    return found[0]


ChampionPredictions = Callable[[ModelVersion], np.ndarray]
Loader = Callable[[ModelVersion], Any]


def predict_digits(model: Any, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """A loaded model's digit for each uint8 image (N x 28 x 28)."""
    import torch

    digits = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start : start + batch, None].astype(np.float32) / 255.0)
            digits.append(model(x).argmax(1).numpy())
    return np.concatenate(digits) if digits else np.zeros(0, np.int64)


def champion_predictions(
    client: MlflowClient, test: LabelledImages, load: Loader
) -> ChampionPredictions:
    """A function giving a version's predictions on `test`: stored ones, else the model
    (`load`: `tracking.model_fetch.load_registered`, the one checked way) scored once and
    stored on the version's run for the next gate."""

    def predictions_of(version: ModelVersion) -> np.ndarray:
        if version.run_id:
            stored = stored_predictions(client, version.run_id, test)
            if stored is not None:
                return stored
        predicted = predict_digits(load(version), test.images)
        if version.run_id:
            log_predictions(client, version.run_id, test, predicted)
        return predicted

    return predictions_of
