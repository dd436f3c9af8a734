"""Predict digits with the champion model, from images of any size or colour.

Images are converted the MNIST way: to grayscale (transparent parts on white); inverted
when the background is light, so the digit is white on black; cropped to the digit;
scaled so its longer side is 20 px; placed in a 28x28 black square with its centre of
mass at the centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mnistops.data.conversion import decode, mnist_like, upright
from mnistops.data.decoding import MAX_PIXELS
from mnistops.data.images import ImageRefused, read_regular, shown_name
from mnistops.errors import ImageUnusable, PredictError
from mnistops.settings import Settings
from mnistops.tracking import model_fetch, model_files, model_record
from mnistops.train.onnx_graph import OnnxNet
from mnistops.train.runtime import NumpyNet

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from mnistops.tracking.champion import AliasedVersion

    Registered = ModelVersion | AliasedVersion
    """a registered version, as MLflow's client or the alias reader gives it"""

__all__ = ["MAX_PIXELS", "PredictError", "Prediction", "load_images", "mnist_like", "predict"]


class ModelUnreachable(PredictError):
    """A version's files could not be downloaded now (a server down, a timeout): worth
    another try, unlike a version whose files are damaged."""


@dataclass(frozen=True)
class Prediction:
    file: str
    digit: int
    confidence: float
    model_version: str

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "digit": self.digit,
            "confidence": round(self.confidence, 6),
            "model_version": self.model_version,
        }


def _open(path: Path) -> Image.Image:
    """The image at `path`, decoded; only a regular file is read, and a decompression bomb
    is refused before its pixels are decoded (the same rules as the dataset's)."""
    try:
        data = read_regular(path)
    except FileNotFoundError:
        raise ImageUnusable(f"{path}: no such file") from None
    except ImageRefused as exc:
        raise ImageUnusable(f"{path}: {exc}") from None
    return decode(data, str(path))


def load_images(paths: list[Path]) -> np.ndarray:
    """(N, 1, 28, 28) float32 batch; PredictError names the first file that cannot be used."""
    arrays = []
    for path in paths:
        if not str(path).isprintable():
            raise ImageUnusable(
                f"{shown_name(str(path))}: the file name is not valid UTF-8 or holds a"
                " control character; rename it"
            )
        with _open(path) as image:
            arrays.append(mnist_like(upright(image), str(path)))
    return np.stack(arrays)[:, None].astype(np.float32)


def runtime_of(model: Any) -> str:
    """What runs a model of `model_files.load_for_answers`: onnxruntime, numpy or pytorch."""
    if isinstance(model, OnnxNet):
        return "onnxruntime"
    return "numpy" if isinstance(model, NumpyNet) else "pytorch"


def logits(model: Any, batch: np.ndarray) -> np.ndarray:
    """(N, 10) float32 logits of a (N, 1, 28, 28) float32 batch in [0, 1] (no gradients),
    from a model of `model_files.load_for_answers`: ONNX Runtime's, NumPy's or PyTorch's."""
    if isinstance(model, OnnxNet | NumpyNet):
        return model(batch)
    import torch

    with torch.inference_mode():
        found: np.ndarray = model(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).numpy()
        return found


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, 10) float64 probabilities of (N, 10) logits."""
    shifted = logits.astype(np.float64)
    shifted -= shifted.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    found: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return found


def probabilities(model: Any, batch: np.ndarray) -> np.ndarray:
    """(N, 10) probabilities of a (N, 1, 28, 28) float32 batch in [0, 1]."""
    return softmax(logits(model, batch))


def champion_version(settings: Settings) -> AliasedVersion:
    """The version the registry's `champion` alias names."""
    from mnistops.tracking.champion import champion_of

    name = settings.model_registry.name
    version = champion_of(settings)
    if version is None:
        raise PredictError(
            f"no model '{name}' has the alias champion yet at {settings.mlflow_uri};"
            " train one first (`mnistops train`)"
        )
    return version


def model_cache(settings: Settings, version: str) -> Path:
    """Where this machine keeps a registered version's model files (checked against the
    version's signed record at every load, so a damaged copy is fetched again)."""
    return settings.home / "cache" / "models" / settings.model_registry.name / version


def _fetch(settings: Settings, version: Registered, record: dict[str, str], folder: Path) -> None:
    """The version's files into `folder`, whole or not at all (a hidden folder beside it,
    renamed into place): over MLflow's REST API where it can (`fetch_recorded`), else
    with MLflow's client."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=folder.parent))
    try:
        if not model_fetch.fetch_recorded(settings, str(version.source), record, partial):
            from mnistops.clients import mlflow_client

            uri = f"models:/{version.name}/{version.version}"
            model_fetch.download(mlflow_client(settings), uri, partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_version(settings: Settings, version: Registered, threads: int = 1) -> Any:
    """A registered version's model, in eval mode, loaded the one checked way
    (`tracking.model_files`): from this machine's cache, or downloaded once through the
    MLflow server (no S3 keys needed). Nothing from the registry is deserialized before
    the version's signed record and its files are checked. PredictError names the version
    and why it is refused; ModelUnreachable, a download that failed now."""
    import shutil

    from mnistops.clients import model_signing_key

    key = model_signing_key(settings)
    tags, source = version.tags or {}, str(version.source)
    unusable = f"{settings.model_registry.name} v{version.version} cannot be loaded"
    folder = model_cache(settings, str(version.version))
    try:
        record = model_record.signed_record(tags, key, source, str(version.version))
        if not folder.is_dir():
            _fetch(settings, version, record, folder)
        try:
            model = model_files.load_for_answers(folder, tags, key, source, threads)
        except model_files.ModelRefused:
            _fetch(settings, version, record, folder)  # a damaged local copy: once more, fresh
            model = model_files.load_for_answers(folder, tags, key, source, threads)
        probabilities(model, np.zeros((1, 1, 28, 28), np.float32))
    except model_files.ModelUnavailable as exc:
        raise ModelUnreachable(f"{unusable}: {exc}") from None
    except model_files.ModelRefused as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise PredictError(f"{unusable}: {exc}") from None
    return model


def load_champion(settings: Settings) -> tuple[Any, str]:
    """(the champion's model, its version), from the local cache or downloaded once.

    A champion that cannot be loaded is named with the reason: the next model the gate
    registers replaces it, or promote another version.
    """
    version = champion_version(settings)
    try:
        return load_version(settings, version), str(version.version)
    except PredictError as exc:
        raise PredictError(
            f"the champion {exc}; the next registered model that loads replaces it"
            " (`mnistops train`, or a retraining run), or promote another version"
            " (`mnistops models promote VERSION`)"
        ) from None


def predict(settings: Settings, paths: list[Path]) -> list[Prediction]:
    """The champion's digit and confidence for each image (loaded the MNIST way)."""
    from mnistops.tracking.server import check_tracking_server

    batch = load_images(paths)
    check_tracking_server(settings)
    model, version = load_champion(settings)
    probs = probabilities(model, batch)
    return [
        Prediction(str(path), int(p.argmax()), float(p.max()), version)
        for path, p in zip(paths, probs, strict=True)
    ]
