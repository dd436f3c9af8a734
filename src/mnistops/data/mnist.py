"""The four original MNIST IDX files: where they come from, checked by SHA-256, decoded."""

from __future__ import annotations

import gzip
import shutil
import struct
import tempfile
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mnistops.checksums import read_sums, sha256_of
from mnistops.errors import BadInput, MnistopsError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class SourceError(MnistopsError):
    """The MNIST files are missing, damaged or not what they claim to be."""


class SourceRefused(SourceError, BadInput):
    """The folder or files given as MNIST's are missing or are not MNIST's."""


@dataclass(frozen=True)
class Mnist:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def packaged_dir() -> Path:
    return Path(str(resources.files("mnistops") / "resources" / "mnist"))


def expected_checksums() -> dict[str, str]:
    """file name -> sha256, from the SHA256SUMS shipped with the package."""
    return read_sums(packaged_dir() / "SHA256SUMS")


def verify(folder: Path) -> None:
    sums = expected_checksums()
    for name in FILES.values():
        path = folder / name
        if not path.is_file():
            raise SourceRefused(
                f"{path}: missing (need the four MNIST .gz files: {', '.join(FILES.values())})"
            )
        actual = sha256_of(path)
        if actual != sums[name]:
            raise SourceRefused(
                f"{path}: SHA-256 {actual} does not match the expected {sums[name]};"
                " the file is damaged or not the original MNIST file"
            )


def download(url: str, target: Path) -> Path:
    """Fetch the four files from a mirror (URL of the folder holding them) into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        source = url.rstrip("/") + "/" + name
        try:
            with (
                urllib.request.urlopen(source, timeout=60) as response,
                tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp,
            ):
                shutil.copyfileobj(response, tmp)
        except OSError as exc:
            raise SourceError(f"cannot download {source}: {exc}") from None
        Path(tmp.name).replace(target / name)
    verify(target)
    return target


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or dims != expected_dims:
        raise SourceRefused(
            f"{path}: not an IDX file of unsigned bytes with {expected_dims} dimensions"
        )
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(folder: Path) -> Mnist:
    """Verify the checksums, then decode the four files."""
    verify(folder)
    return Mnist(
        train_images=_read_idx(folder / FILES["train_images"], 3),
        train_labels=_read_idx(folder / FILES["train_labels"], 1),
        test_images=_read_idx(folder / FILES["test_images"], 3),
        test_labels=_read_idx(folder / FILES["test_labels"], 1),
    )
