"""The request bodies of the standard protocols read into images, and their answers
written: MLflow's scoring protocol (`inputs`, `instances`, `dataframe_split`,
`dataframe_records`) and the Open Inference Protocol (V2) with its binary tensor
extension. Every size is bounded before anything is computed from it; what cannot be
used is `Unusable`, with the HTTP status to answer. `protocols.py` has the routes."""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import numpy as np
import orjson

from mnistops.serving.bodies import Answers

PIXELS = 28 * 28
MLFLOW_KEYS = ("inputs", "instances", "dataframe_split", "dataframe_records")
V2_TYPES = {"FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8}
V2_INPUT = "images"
V2_OUTPUTS = {
    "logits": "FP32",
    "probabilities": "FP32",
    "digit": "INT64",
}
HEADER_LENGTH = "inference-header-content-length"


class Unusable(Exception):
    """A request of a standard protocol that cannot be answered; the message says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def scaled_images(array: np.ndarray, where: str, max_batch: int) -> np.ndarray:
    """(N, 1, 28, 28) float32 images of an array of N items of 784 pixels in [0, 1]."""
    if array.ndim == 0 or len(array) == 0:
        raise Unusable(f"{where}: no images (send N images of 28x28 pixels)")
    if len(array) > max_batch:
        raise Unusable(f"{where}: {len(array)} images, at most {max_batch} are accepted", 413)
    if array.size != len(array) * PIXELS:
        shape = list(array.shape[1:])
        raise Unusable(f"{where}: each image is {shape}, expected 28x28 (784 pixels)")
    with np.errstate(over="ignore", invalid="ignore"):  # 1e308 becomes inf: refused below
        images = array.reshape(len(array), 1, 28, 28).astype(np.float32)
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise Unusable(
            f"{where}: pixels are scaled to [0, 1] for this model, as its MLflow signature"
            " says (for pixels 0-255, POST them to /predict)"
        )
    return images


def _numbers(rows: object, where: str) -> np.ndarray:
    try:
        array = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise Unusable(f"{where}: not a list of images of equal size, of numbers") from None
    return array


def mlflow_images(document: object, max_batch: int) -> np.ndarray:
    """The images of an MLflow scoring request: `inputs` or `instances` (N images of
    1x28x28, 28x28 or 784 numbers), `dataframe_split` or `dataframe_records` (a column
    holding each image's 784 numbers, as `mlflow models serve` takes them for this
    model, or 784 columns of one pixel each)."""
    if not isinstance(document, dict):
        raise Unusable(f"the body is not a JSON object with one of {', '.join(MLFLOW_KEYS)}")
    given = [key for key in MLFLOW_KEYS if key in document]
    if len(given) != 1:
        raise Unusable(f"give exactly one of {', '.join(MLFLOW_KEYS)} (found {len(given)})")
    key = given[0]
    data = document[key]
    if key == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise Unusable('dataframe_split: expected {"columns": [...], "data": [[...], ...]}')
        data = data["data"]
    elif key == "dataframe_records":
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise Unusable("dataframe_records: expected a list of {column: value} objects")
        data = [list(row.values()) for row in data]
    elif not isinstance(data, list):
        raise Unusable(f"{key}: expected a list of images (this model has one unnamed input)")
    return scaled_images(_numbers(data, key), key, max_batch)


def mlflow_answer(answers: Answers) -> bytes:
    """MLflow's answer: the model's output, one row of 10 logits per image."""
    return orjson.dumps({"predictions": answers.logits}, option=orjson.OPT_SERIALIZE_NUMPY)


def v2_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON header, the binary data after it) of a V2 inference request."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(
            body
        ):
            raise Unusable("Inference-Header-Content-Length is not the length of a JSON header")
        header, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        document = json.loads(header)
    except (ValueError, RecursionError):
        raise Unusable("the inference request is not JSON") from None
    if not isinstance(document, dict):
        raise Unusable("the inference request is not a JSON object")
    return document, binary


def _parameters(part: dict[str, Any], where: str) -> dict[str, Any]:
    found = part.get("parameters") or {}
    if not isinstance(found, dict):
        raise Unusable(f"{where}: parameters must be a JSON object")
    return found


def _v2_shape(tensor: dict[str, Any], where: str, max_batch: int) -> list[int]:
    """The tensor's shape, bounded before anything is computed from it: at most 4 sizes,
    none over a whole batch's pixels."""
    shape = tensor.get("shape")
    most = max_batch * PIXELS
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
        or not all(0 <= n <= most for n in shape)
    ):
        raise Unusable(f"{where}: shape must be 1 to 4 sizes from 0 to {most}, e.g. [N, 1, 28, 28]")
    return shape


def v2_images(document: dict[str, Any], binary: bytes, max_batch: int) -> np.ndarray:
    """The images of a V2 request's one input tensor: shape [N, 1, 28, 28] (or [N, 28, 28],
    [N, 784]), FP32/FP64 in [0, 1] or UINT8 0-255, its data as JSON or binary."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Unusable(f"inputs: expected one tensor ({V2_INPUT!r}, shape [N, 1, 28, 28])")
    tensor = inputs[0]
    where = f"inputs[0] ({str(tensor.get('name'))[:40]!r})"
    if tensor.get("name") != V2_INPUT:
        raise Unusable(f"{where}: no such input: the model's one input is {V2_INPUT!r}")
    kind = tensor.get("datatype")
    if not isinstance(kind, str) or kind not in V2_TYPES:
        raise Unusable(
            f"{where}: datatype {str(kind)[:20]!r}, expected one of {', '.join(V2_TYPES)}"
        )
    shape = _v2_shape(tensor, where, max_batch)
    dtype = np.dtype(V2_TYPES[kind]).newbyteorder("<")
    count = math.prod(shape)
    size = _parameters(tensor, where).get("binary_data_size")
    if size is not None:
        if size != len(binary) or size != count * dtype.itemsize:
            raise Unusable(f"{where}: binary_data_size does not match its shape and the body")
        array = np.frombuffer(binary, dtype=dtype)
    else:
        array = _numbers(tensor.get("data"), where).ravel()
        if kind == "UINT8" and (array.size and (array.min() < 0 or array.max() > 255)):
            raise Unusable(f"{where}: UINT8 values are 0-255")
    if array.size != count:
        raise Unusable(f"{where}: {array.size} values for the shape {shape}")
    array = array.reshape(shape)
    if kind == "UINT8":
        array = array.astype(np.float32) / 255
    return scaled_images(array, where, max_batch)


def v2_output_names(document: dict[str, Any]) -> list[str]:
    """The outputs the request names, each at most once (all three when it names none);
    its parameters are checked here too, before any answer is computed."""
    _parameters(document, "parameters")
    asked = document.get("outputs")
    if asked is None:
        return list(V2_OUTPUTS)
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise Unusable('outputs: expected a list of {"name": ...}')
    names = [str(output.get("name"))[:40] for output in asked]
    for index, output in enumerate(asked):
        _parameters(output, f"outputs[{index}]")
    unknown = [name for name in names if name not in V2_OUTPUTS]
    if unknown:
        raise Unusable(f"outputs: no output {unknown[0]!r} (known: {', '.join(V2_OUTPUTS)})")
    if len(set(names)) != len(names):
        raise Unusable("outputs: each output may be asked for once")
    return names


def _binary_asked(document: dict[str, Any], name: str) -> bool:
    """Whether output `name` goes as binary data (parameters checked by
    `v2_output_names`)."""
    for output in document.get("outputs") or []:
        if output.get("name") == name:
            return bool((output.get("parameters") or {}).get("binary_data", False))
    return bool((document.get("parameters") or {}).get("binary_data_output", False))


def v2_answer(document: dict[str, Any], answers: Answers) -> tuple[bytes, int | None]:
    """(the response body, the length of its JSON header when binary data follows it)."""
    found = {
        "logits": answers.logits.astype(np.float32),
        "probabilities": answers.probabilities.astype(np.float32),
        "digit": answers.probabilities.argmax(axis=1).astype(np.int64),
    }
    outputs, binary = [], b""
    for name in v2_output_names(document):
        array = found[name]
        output: dict[str, Any] = {
            "name": name,
            "datatype": V2_OUTPUTS[name],
            "shape": list(array.shape),
        }
        if _binary_asked(document, name):
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
            output["parameters"] = {"binary_data_size": len(data)}
            binary += data
        else:
            output["data"] = array.ravel().tolist()
        outputs.append(output)
    served = answers.served
    header = {
        "model_name": served.name,
        "model_version": served.version,
        "outputs": outputs,
        "parameters": {"request_id": answers.request_id},
    }
    if isinstance(document.get("id"), str):
        header["id"] = document["id"]
    body = orjson.dumps(header)
    return body + binary, (len(body) if binary else None)


def decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A body sent with `Content-Encoding: gzip` or `deflate` (as tritonclient's request
    compression sends it), unpacked to at most `limit` bytes (413 past it: a small bomb
    never becomes a large body)."""
    kind = (encoding or "identity").strip().lower()
    if kind == "identity":
        return body
    if kind not in ("gzip", "deflate"):
        raise Unusable(f"Content-Encoding {kind[:20]!r} is not taken: gzip, deflate or none", 415)
    unpacker = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a gzip or zlib header
    try:
        found = unpacker.decompress(body, limit + 1)
    except zlib.error:
        raise Unusable(f"the body is not {kind} data") from None
    if len(found) > limit or unpacker.unconsumed_tail:
        raise Unusable(f"the body unpacks to over {limit} bytes: at most {limit} are accepted", 413)
    return found
