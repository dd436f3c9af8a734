"""The prediction log's and the feedback's records: their Parquet layout, the names of
their objects in the store, and the checks that every object read back must pass.

An object is one batch, written with one PUT: it is in the store whole or not at all.
What is read back is checked before it is used (signature, name, size, rows, schema,
every value), so a crafted object in the bucket is refused by name and never becomes a
file name, a path or a training image. The service signs each batch it writes with a
key derived from the model signing key (`model_registry.signing_key`): whoever can write
to the bucket without that key cannot make the log say what was never answered.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

PREDICTIONS_PREFIX = "predictions/"
FEEDBACK_PREFIX = "feedback/"
MAX_OBJECT_BYTES = 64 << 20
"""a batch larger than this is refused unread (2,000 records are about 2 MB)"""
MAX_ROWS = 100_000 + 4096
"""rows a batch may hold: `serve.log.batch_records` (at most 100,000) and one more
request's images (`serve.max_batch`, at most 4,096)"""
MAX_TABLE_BYTES = 256 << 20
"""a batch whose columns would take more than this unpacked is refused unread"""
PIXELS = 28 * 28
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
MODEL_VERSION = re.compile(r"^[0-9]{1,9}$")
EARLIEST = datetime(2020, 1, 1, tzinfo=UTC)
FUTURE_S = 86_400
"""a record may be at most a day ahead of the reader's clock"""
SIGNATURE = "mnistops-signature"
"""the object's user metadata (`x-amz-meta-mnistops-signature`) that signs a batch"""
OBJECT_NAME = re.compile(
    r"^(predictions|feedback)/(\d{4}-\d{2}-\d{2})/\d{6}-[0-9a-f]{16}\.parquet$"
)


class BatchRefused(Exception):
    """An object of the log that is not a batch mnistops wrote; the message says why."""


def log_key(model_key: bytes) -> bytes:
    """The prediction log's own key, derived from the model signing key, so a batch's
    signature can never pass for a model's."""
    return hmac.new(model_key, b"mnistops prediction log", hashlib.sha256).digest()


def batch_signature(key: bytes, name: str, body: bytes) -> str:
    """HMAC-SHA256 of the object's name and bytes: a batch copied under another name
    does not verify."""
    digest = hashlib.sha256(body).hexdigest()
    return hmac.new(key, f"{name}\n{digest}".encode(), hashlib.sha256).hexdigest()


def check_signature(key: bytes, name: str, body: bytes, metadata: dict[str, str]) -> None:
    """BatchRefused unless the object carries the signature of a mnistops service."""
    given = metadata.get(SIGNATURE, "")
    if not given:
        raise BatchRefused("not signed by a mnistops service (no x-amz-meta-mnistops-signature)")
    if not hmac.compare_digest(given, batch_signature(key, name, body)):
        raise BatchRefused(
            "its signature does not match: written with another model_registry.signing_key,"
            " or changed since"
        )


class RequestIds:
    """Unguessable request ids (128 random bits in hex), read from
    the OS's random source 4,096 at a time: one system call per 4,096 answers instead
    of one each, a few microseconds of every small prediction. For one thread (the
    service's event loop)."""

    def __init__(self, at_once: int = 4096) -> None:
        self.at_once = at_once
        self.ready: list[str] = []

    def next(self) -> str:
        if not self.ready:
            pool = secrets.token_bytes(16 * self.at_once).hex()
            self.ready = [pool[i : i + 32] for i in range(0, len(pool), 32)]
        return self.ready.pop()


def object_name(prefix: str, when: datetime) -> str:
    """`predictions/2026-12-03/142501-<random>.parquet`: by day, so retention and
    `--since` read only the days they need."""
    return f"{prefix}{when:%Y-%m-%d}/{when:%H%M%S}-{secrets.token_hex(8)}.parquet"


def day_of(name: str) -> date | None:
    """The day of a batch's object name; None for a name mnistops does not write."""
    match = OBJECT_NAME.match(name)
    if match is None:
        return None
    try:
        return date.fromisoformat(match.group(2))
    except ValueError:
        return None


def prediction_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("time", pa.timestamp("ms", tz="UTC")),
            ("request_id", pa.string()),
            ("item", pa.int32()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("input", pa.binary(PIXELS)),
            ("digit", pa.int8()),
            ("confidence", pa.float32()),
            ("probabilities", pa.list_(pa.float32(), 10)),
        ]
    )


def feedback_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("time", pa.timestamp("ms", tz="UTC")),
            ("request_id", pa.string()),
            ("item", pa.int32()),
            ("digit", pa.int8()),
            ("predicted", pa.int8()),
            ("model_version", pa.string()),
        ]
    )


class Answered(NamedTuple):
    """One /predict request as the service logs it: its N inputs as (N, 784) uint8
    (`as_pixels`) and their (N, 10) probabilities. (A tuple: one is made per answer,
    on the event loop.)"""

    time: float
    request_id: str
    model_name: str
    model_version: str
    pixels: np.ndarray
    probabilities: np.ndarray


@dataclass(frozen=True)
class Label:
    """A digit given through /feedback for one image of an answer."""

    time: float
    request_id: str
    item: int
    digit: int
    predicted: int
    model_version: str


def as_pixels(images: np.ndarray) -> np.ndarray:
    """(N, 784) uint8 of inputs in [0, 1]: the 8 bits a PNG of them holds."""
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), PIXELS)
    pixels: np.ndarray = np.clip(np.rint(flat * 255.0), 0, 255).astype(np.uint8)
    return pixels


@dataclass(frozen=True)
class AnswerColumns:
    """A batch of answers as the columns of its Parquet object, made in the service with
    a few array operations and written by the log's writer process."""

    sizes: np.ndarray
    """how many images each answer had"""
    millis: np.ndarray
    request_ids: list[str]
    model_names: list[str]
    model_versions: list[str]
    pixels: np.ndarray
    """(N, 784) uint8"""
    probabilities: np.ndarray
    """(N, 10) float32"""


def answer_columns(batch: list[Answered]) -> AnswerColumns:
    return AnswerColumns(
        sizes=np.array([len(a.pixels) for a in batch], np.int64),
        millis=np.array([int(a.time * 1000) for a in batch], np.int64),
        request_ids=[a.request_id for a in batch],
        model_names=[a.model_name for a in batch],
        model_versions=[a.model_version for a in batch],
        pixels=np.concatenate([a.pixels for a in batch]),
        probabilities=np.concatenate([a.probabilities for a in batch]).astype(np.float32),
    )


def predictions_parquet(batch: list[Answered]) -> bytes:
    """One Parquet object of a batch of answers."""
    return columns_parquet(answer_columns(batch))


def columns_parquet(columns: AnswerColumns) -> bytes:
    """One Parquet object of a batch of answers' columns, built column-wise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes, probs = columns.sizes, columns.probabilities
    n = int(sizes.sum())

    def repeated(values: list[str]) -> Any:
        return pa.array(np.repeat(np.array(values, dtype=object), sizes), pa.string())

    table = pa.Table.from_arrays(
        [
            pa.array(np.repeat(columns.millis, sizes), pa.timestamp("ms", tz="UTC")),
            repeated(columns.request_ids),
            pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in sizes])),
            repeated(columns.model_names),
            repeated(columns.model_versions),
            pa.Array.from_buffers(
                pa.binary(PIXELS), n, [None, pa.py_buffer(columns.pixels.tobytes())]
            ),
            pa.array(probs.argmax(axis=1).astype(np.int8)),
            pa.array(probs.max(axis=1)),
            pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), 10),
        ],
        schema=prediction_schema(),
    )
    return _parquet(table, pq)


def feedback_parquet(labels: list[Label]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        "time": [int(label.time * 1000) for label in labels],
        "request_id": [label.request_id for label in labels],
        "item": [label.item for label in labels],
        "digit": [label.digit for label in labels],
        "predicted": [label.predicted for label in labels],
        "model_version": [label.model_version for label in labels],
    }
    return _parquet(pa.Table.from_pydict(rows, schema=feedback_schema()), pq)


def _parquet(table: Any, pq: Any) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_batch(name: str, data: bytes) -> pa.Table:
    """The table of a batch object, checked: the name, the size, the schema, the
    values. BatchRefused says what is wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    match = OBJECT_NAME.match(name)
    if match is None:
        raise BatchRefused("not a name mnistops writes (predictions|feedback/DAY/TIME-ID.parquet)")
    if len(data) > MAX_OBJECT_BYTES:
        raise BatchRefused(f"{len(data)} bytes, over the {MAX_OBJECT_BYTES} a batch may have")
    expected = prediction_schema() if match.group(1) == "predictions" else feedback_schema()
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        _check_size(parquet.metadata)
        table = parquet.read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BatchRefused(f"not a readable Parquet file ({exc})") from None
    if not table.schema.remove_metadata().equals(expected):
        raise BatchRefused(
            f"its columns are not the log's: found {_columns(table.schema)}, expected"
            f" {_columns(expected)}"
        )
    _check_values(table, match.group(1))
    return table


def _check_size(metadata: Any) -> None:
    """Refuse, from the file's footer alone, a batch with too many rows or one that
    would unpack to too many bytes."""
    if metadata.num_rows > MAX_ROWS:
        raise BatchRefused(f"{metadata.num_rows} rows, over the {MAX_ROWS} a batch may have")
    unpacked = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if unpacked > MAX_TABLE_BYTES:
        raise BatchRefused(f"{unpacked} bytes unpacked, over the {MAX_TABLE_BYTES} allowed")


def _columns(schema: Any) -> str:
    return ", ".join(f"{field.name}:{field.type}" for field in schema)


def _check_values(table: Any, kind: str) -> None:
    if any(table.column(c).null_count for c in table.column_names):
        raise BatchRefused("a missing value")
    ids = table.column("request_id").to_pylist()
    if any(not REQUEST_ID.match(value) for value in ids):
        raise BatchRefused("a request_id that is not 32 lower-case hexadecimal digits")
    items = _numbers(table, "item")
    if len(items) and (items.min() < 0 or items.max() > 4095):
        raise BatchRefused("an item number outside 0-4095")
    if kind == "predictions" and len(set(zip(ids, items.tolist(), strict=True))) < len(ids):
        raise BatchRefused("the same request_id and item twice")
    for column in ("digit", "predicted") if kind == "feedback" else ("digit",):
        digits = _numbers(table, column)
        if len(digits) and (digits.min() < 0 or digits.max() > 9):
            raise BatchRefused(f"a {column} outside 0-9")
    _check_times(_numbers(table, "time"))
    if any(not MODEL_VERSION.match(v) for v in table.column("model_version").unique().to_pylist()):
        raise BatchRefused("a model_version that is not a version number")
    if kind == "predictions":
        _check_answers(table)


def _check_answers(table: Any) -> None:
    """The columns only answers have: the model's name, the probabilities, and the
    confidence and digit that must follow from them."""
    if any(not MODEL_NAME.match(n) for n in table.column("model_name").unique().to_pylist()):
        raise BatchRefused("a model_name with other characters than A-Z a-z 0-9 _ . -")
    flat = table.column("probabilities").combine_chunks().flatten().to_numpy()
    probs = np.asarray(flat, dtype=np.float32).reshape(-1, 10)
    confidence = _numbers(table, "confidence")
    if len(probs) and (not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1):
        raise BatchRefused("probabilities outside 0-1")
    if len(probs) and not np.array_equal(probs.max(axis=1), confidence):
        raise BatchRefused("a confidence that is not the largest of its probabilities")
    if len(probs) and not np.array_equal(probs.argmax(axis=1), _numbers(table, "digit")):
        raise BatchRefused("a digit that is not the most probable one")


def _numbers(table: Any, column: str) -> np.ndarray:
    values: np.ndarray = table.column(column).combine_chunks().to_numpy(zero_copy_only=False)
    if values.dtype.kind == "M":
        return values.astype("datetime64[ms]").astype(np.int64)
    return values


def _check_times(millis: np.ndarray) -> None:
    if not len(millis):
        return
    latest = (datetime.now(UTC).timestamp() + FUTURE_S) * 1000
    if millis.min() < EARLIEST.timestamp() * 1000 or millis.max() > latest:
        raise BatchRefused(f"a time before {EARLIEST:%Y-%m-%d} or more than a day ahead")


def timestamp(value: datetime | date) -> float:
    """Seconds since the epoch of a time or of the start of a day (UTC)."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
