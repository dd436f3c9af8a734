"""The prediction log's records and /feedback's checks, as pure logic: batches round-trip
through Parquet, every crafted batch is refused with its reason, and every bad label
body is refused naming its field."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnistops.loop import records
from mnistops.loop.feedback import FeedbackBook, FeedbackRefused, parse
from mnistops.loop.log_writer import _chunks, write_due
from mnistops.loop.records import Answered, BatchRefused
from mnistops.settings import Settings

pytestmark = pytest.mark.unit

IDS = records.RequestIds()
NAME = "predictions/2026-12-03/142501-0123456789abcdef.parquet"


def answered(n: int, seed: int = 0) -> Answered:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, 28, 28), dtype=np.float32)
    logits = rng.random((n, 10))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    pixels = records.as_pixels(images)
    return Answered(time.time(), IDS.next(), "mnist-classifier", "3", pixels, probs)


def test_the_pixels_logged_are_the_8_bits_of_the_inputs() -> None:
    images = np.array([0.0, 1.0, 0.5, 3 / 255, 2.5 / 255, -0.2, 1.3], np.float32)
    pixels = records.as_pixels(np.resize(images, (2, 1, 28, 28)))
    assert pixels.shape == (2, 784) and pixels.dtype == np.uint8
    assert pixels[0, :7].tolist() == [0, 255, 128, 3, 2, 0, 255]


def test_a_batch_round_trips_with_the_pixels_the_model_saw() -> None:
    batch = [answered(1, 0), answered(3, 1)]
    table = records.read_batch(NAME, records.predictions_parquet(batch))
    assert table.num_rows == 4
    assert table.column("item").to_pylist() == [0, 0, 1, 2]
    assert table.column("request_id").to_pylist()[1:] == [batch[1].request_id] * 3
    pixels = np.frombuffer(table.column("input")[2].as_py(), np.uint8).reshape(28, 28)
    assert (pixels == batch[1].pixels[1].reshape(28, 28)).all()
    digits = table.column("digit").to_pylist()
    assert digits == [int(p.argmax()) for a in batch for p in a.probabilities]
    probs = np.asarray(table.column("probabilities").to_pylist())
    assert probs == pytest.approx(np.concatenate([a.probabilities for a in batch]), abs=1e-7)


def test_feedback_batches_round_trip() -> None:
    """An image labelled twice within one batch is two rows: the later one wins."""
    label = records.Label(time.time(), IDS.next(), 2, 7, 1, "4")
    again = records.Label(label.time + 1, label.request_id, 2, 3, 1, "4")
    name = "feedback/2026-12-03/000000-0123456789abcdef.parquet"
    table = records.read_batch(name, records.feedback_parquet([label, again]))
    assert table.to_pylist()[0]["digit"] == 7 and table.to_pylist()[0]["predicted"] == 1
    assert table.column("digit").to_pylist() == [7, 3]


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _first_digit() -> int:
    return int(answered(2).probabilities[1].argmax())


def _tampered(column: str, value: object) -> bytes:
    rows = records.read_batch(NAME, records.predictions_parquet([answered(2)])).to_pylist()
    rows[1][column] = value
    return _parquet(pa.Table.from_pylist(rows, schema=records.prediction_schema()))


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("predictions/../../etc/x.parquet", b"", "not a name mnistops writes"),
        ("predictions/2026-12-03/x.parquet", b"", "not a name mnistops writes"),
        (NAME, b"PAR1 not really", "not a readable Parquet file"),
        (NAME, _parquet(pa.table({"request_id": ["a"]})), "its columns are not the log's"),
        (NAME, _tampered("request_id", "../../etc/passwd" + "0" * 16), "request_id"),
        (NAME, _tampered("digit", 11), "a digit outside 0-9"),
        (NAME, _tampered("item", -1), "an item number outside"),
        (NAME, _tampered("probabilities", [float("nan")] * 10), "probabilities outside"),
        (NAME, _tampered("model_version", None), "a missing value"),
        (NAME, _tampered("model_version", "3; rm -rf /"), "model_version"),
        (NAME, _tampered("model_name", "[red]x\x1b[0m"), "model_name"),
        (NAME, _tampered("confidence", 0.99999), "confidence"),
        (NAME, _tampered("digit", 0 if _first_digit() else 1), "most probable"),
        (NAME, _tampered("time", datetime(2999, 1, 1, tzinfo=UTC)), "a day ahead"),
        (NAME, _tampered("time", datetime(1970, 1, 2, tzinfo=UTC)), "a time before"),
        (NAME, _tampered("request_id", None), "a missing value"),
    ],
    # the same ids in every worker of a parallel run: the batches hold the time they were made
    ids=lambda value: value if isinstance(value, str) else "bytes",
)
def test_a_crafted_batch_is_refused_with_its_reason(name: str, data: bytes, why: str) -> None:
    with pytest.raises(BatchRefused, match=why):
        records.read_batch(name, data)


def test_a_huge_batch_is_refused_unread() -> None:
    with pytest.raises(BatchRefused, match="over"):
        records.read_batch(NAME, b"\0" * (records.MAX_OBJECT_BYTES + 1))


def test_a_small_object_of_many_rows_is_refused_from_its_footer() -> None:
    """Half a million repeated rows pack into a few hundred kB; the footer's row count
    refuses them before a column is unpacked."""
    one = pa.Table.from_pylist(
        records.read_batch(NAME, records.predictions_parquet([answered(1)])).to_pylist(),
        schema=records.prediction_schema(),
    )
    many = pa.concat_tables([one] * (records.MAX_ROWS + 1))
    sink = io.BytesIO()
    pq.write_table(many, sink, compression="zstd")
    assert len(sink.getvalue()) < records.MAX_OBJECT_BYTES // 8
    with pytest.raises(BatchRefused, match=f"{records.MAX_ROWS + 1} rows"):
        records.read_batch(NAME, sink.getvalue())


def test_an_image_logged_twice_in_one_batch_is_refused() -> None:
    twice = answered(1)
    with pytest.raises(BatchRefused, match="the same request_id and item twice"):
        records.read_batch(NAME, records.predictions_parquet([twice, twice]))


def test_only_a_batch_signed_with_the_key_under_its_own_name_verifies() -> None:
    key = records.log_key(b"k" * 32)
    body = records.predictions_parquet([answered(2)])
    signed = {records.SIGNATURE: records.batch_signature(key, NAME, body)}
    records.check_signature(key, NAME, body, signed)
    other = NAME.replace("0123456789abcdef", "fedcba9876543210")
    cases = [
        (key, NAME, body, {}, "not signed"),
        (records.log_key(b"j" * 32), NAME, body, signed, "does not match"),
        (key, other, body, signed, "does not match"),
        (key, NAME, body + b"\0", signed, "does not match"),
    ]
    for use, name, data, metadata, why in cases:
        with pytest.raises(BatchRefused, match=why):
            records.check_signature(use, name, data, metadata)
    assert records.log_key(b"k" * 32) != b"k" * 32


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "JSON object"),
        ({"request_id": "x" * 32, "digit": 3}, "request_id"),
        ({"digit": 3}, "request_id"),
        ({"request_id": "a" * 32, "digit": 10}, "digit"),
        ({"request_id": "a" * 32, "digit": -1}, "digit"),
        ({"request_id": "a" * 32, "digit": True}, "digit"),
        ({"request_id": "a" * 32, "digit": "7"}, "digit"),
        ({"request_id": "a" * 32, "digit": 7, "item": -2}, "item"),
        ({"request_id": "a" * 32, "digit": 7, "path": "/etc"}, "unknown field"),
    ],
)
def test_a_bad_label_names_its_field(body: object, field: str) -> None:
    with pytest.raises(FeedbackRefused, match=field) as refused:
        parse(body)
    assert refused.value.status == 422


def test_a_request_id_in_capitals_is_the_same_request() -> None:
    rid = IDS.next()
    assert parse({"request_id": rid.upper(), "digit": 4})[0] == rid


def test_a_buffer_smaller_than_a_batch_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_buffered .* at least batch_records"):
        Settings(serve={"log": {"batch_records": 5000, "max_buffered": 1000}})


def book(**log: object) -> FeedbackBook:
    return FeedbackBook(Settings(serve={"log": log}))


def test_the_later_label_wins_and_says_what_it_replaced() -> None:
    labels = book()
    rid = IDS.next()
    labels.remember(rid, "3", [4, 9])
    with pytest.raises(FeedbackRefused, match="has 2 images; say which") as unsaid:
        labels.take({"request_id": rid, "digit": 7})
    assert unsaid.value.status == 422, "a batch's image is never guessed"
    first, replaced = labels.take({"request_id": rid, "digit": 7, "item": 0})
    assert (first.digit, first.predicted, replaced) == (7, 4, None)
    second, replaced = labels.take({"request_id": rid, "digit": 1, "item": 0})
    assert (second.digit, replaced) == (1, 7)
    single = IDS.next()
    labels.remember(single, "3", [5])
    assert labels.take({"request_id": single, "digit": 2})[0].item == 0
    with pytest.raises(FeedbackRefused, match="item 2") as refused:
        labels.take({"request_id": rid, "digit": 1, "item": 2})
    assert refused.value.status == 422


def test_unknown_forgotten_and_expired_answers_are_404() -> None:
    labels = book(known_requests=100, feedback_window_h=1)
    with pytest.raises(FeedbackRefused, match="unknown or expired") as refused:
        labels.take({"request_id": "a" * 32, "digit": 1})
    assert refused.value.status == 404
    assert "this service (started " in refused.value.detail, "a restart, not the window"
    ids = [IDS.next() for _ in range(101)]
    for rid in ids:
        labels.remember(rid, "1", [0])
    with pytest.raises(FeedbackRefused, match="unknown or expired"):
        labels.take({"request_id": ids[0], "digit": 1})
    labels.take({"request_id": ids[-1], "digit": 1})
    when, version, digits = labels.given[ids[-1]]
    labels.given[ids[-1]] = (when - 3601, version, digits)
    labels.started -= 3601
    with pytest.raises(FeedbackRefused, match="unknown or expired") as expired:
        labels.take({"request_id": ids[-1], "digit": 2})
    assert "from the last 1 h (serve.log.feedback_window_h)" in expired.value.detail


def test_a_flood_of_labels_is_bounded() -> None:
    labels = book(feedback_per_minute=5)
    rid = IDS.next()
    labels.remember(rid, "1", [0])
    for digit in range(5):
        labels.take({"request_id": rid, "digit": digit})
    with pytest.raises(FeedbackRefused, match="feedback_per_minute") as refused:
        labels.take({"request_id": rid, "digit": 1})
    assert refused.value.status == 429 and labels.refused == 1


def test_batches_hold_at_most_batch_records() -> None:
    answers = [answered(n) for n in (1, 2, 5, 1, 1)]
    chunks = _chunks(answers, 3)
    assert [[len(a.pixels) for a in chunk] for chunk in chunks] == [[1, 2], [5], [1, 1]]
    assert [a for chunk in chunks for a in chunk] == answers


def test_the_inputs_read_from_a_batch_buffer_are_the_logged_pixels() -> None:
    """Monitoring reads the inputs from the column's buffer: a slice of it (an offset)
    gives the same pixels as its rows."""
    from mnistops.loop.monitoring import _pixels

    table = records.read_batch(NAME, records.predictions_parquet([answered(5)]))
    inputs = table.column("input").combine_chunks()
    rows = [np.frombuffer(v, np.uint8) for v in inputs.to_pylist()]
    assert (_pixels(inputs) == np.stack(rows)).all()
    assert (_pixels(inputs.slice(2, 2)) == np.stack(rows[2:4])).all()


def test_a_label_brings_the_write_forward_never_back() -> None:
    assert write_due(None, None, 30, 5) is None
    assert write_due(100.0, None, 30, 5) == 130.0
    assert write_due(100.0, 110.0, 30, 5) == 115.0, "written 5 s after the label"
    assert write_due(100.0, 128.0, 30, 5) == 130.0, "a late label never delays the batch"


@pytest.mark.security
def test_request_ids_are_unguessable_and_never_repeat() -> None:
    """The service's ids (what /feedback takes) come from the OS's random source a few
    thousand at a time: each is 128 random bits in hex, none repeats across refills,
    and two services (or restarts) draw different ones."""
    ids = records.RequestIds(at_once=64)
    drawn = [ids.next() for _ in range(1000)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in drawn)
    assert len(set(drawn)) == 1000
    other = records.RequestIds(at_once=64)
    assert not set(drawn) & {other.next() for _ in range(1000)}
    bits = np.unpackbits(np.frombuffer(bytes.fromhex("".join(drawn)), np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01


@pytest.mark.parametrize(
    ("given", "utc"),
    [
        ("2026-12-07", "2026-12-07T00:00:00+00:00"),
        ("2026-12-07T10:50", "2026-12-07T10:50:00+00:00"),
        ("2026-12-07T10:50+02:00", "2026-12-07T08:50:00+00:00"),
        ("2026-12-07T10:50-05:00", "2026-12-07T15:50:00+00:00"),
    ],
)
def test_since_is_read_as_utc_whatever_offset_it_gives(given: str, utc: str) -> None:
    """`--since` with an offset is the same instant in UTC: the window's header, its
    report and the refusal of a time too late all name UTC times."""
    from mnistops.loop.store import parse_since

    when = parse_since(given)
    assert when is not None and when.isoformat() == utc
