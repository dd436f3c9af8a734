"""The loop against the real stack of `mnistops demo --fast`: a second `mnistops serve`
on its own port and data folder logs every answer to the object store in batches,
takes labels through /feedback (from the API and from its page in Chromium), and
`mnistops data add --feedback` turns them into training images; bad labels get their
4xx, crafted objects in the bucket are refused by name, a `kill -9` loses no written
batch."""

from __future__ import annotations

import io
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mnistops.data.conversion import image_from_bytes
from mnistops.loop import records
from mnistops.loop.labels import image_name
from mnistops.loop.records import Answered
from mnistops.loop.store import log_signing_key, read_batches
from mnistops.settings import Settings
from tests.helpers import SHOTS, put_object, run_cli
from tests.loop.service import (
    Service,
    digit_images,
    label,
    logged,
    predict,
    service_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.loop]


def test_every_answer_is_logged_in_batches(service: Service) -> None:
    files = digit_images(service.settings, 30)
    answers = [predict(service.url, path) for path in files]
    batch = httpx.post(
        f"{service.url}/predict",
        json={"images": [(image_from_bytes(p.read_bytes()) * 255).tolist() for p in files[:3]]},
    )
    assert batch.status_code == 200 and records.REQUEST_ID.match(batch.json()["request_id"])
    ids = {a["request_id"] for a in answers} | {batch.json()["request_id"]}
    assert len(ids) == 31
    rows = logged(service.settings, ids)
    assert rows.num_rows == 33
    by_id = {r["request_id"]: r for r in rows.to_pylist() if r["item"] == 0}
    for path, answer in zip(files, answers, strict=True):
        row = by_id[answer["request_id"]]
        assert row["digit"] == answer["digit"] and row["model_version"] == answer["model_version"]
        assert row["confidence"] == pytest.approx(answer["confidence"], abs=1e-5)
        seen = np.rint(image_from_bytes(path.read_bytes()) * 255).astype(np.uint8)
        assert np.frombuffer(row["input"], np.uint8).reshape(28, 28).tolist() == seen.tolist()
    names = [
        item["Key"]
        for item in service_client(service).list_objects_v2(
            Bucket=service.settings.s3.buckets.dvc, Prefix="predictions/"
        )["Contents"]
    ]
    assert len(names) < 31, "one object per request"
    done = run_cli("predictions", config_dir=service.config_dir)
    assert done.returncode == 0, done.stderr
    assert "images in" in done.stdout and "mnist-classifier v" in done.stdout
    future = run_cli("predictions", "--since", "2999-01-01", config_dir=service.config_dir)
    assert future.returncode == 0 and "no predictions logged" in future.stdout
    bad = run_cli("predictions", "--since", "yesterday", config_dir=service.config_dir)
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_labels_become_training_images(service: Service) -> None:
    settings = service.settings
    began = datetime.now(UTC)
    files = digit_images(settings, 12)[2:]
    answers = [predict(service.url, path) for path in files]
    # a test image labelled is refused at `data add` (the test set stays unseen): make
    # the others new by drawing them a little thicker
    drawn = []
    for path in files[:6]:
        image = np.asarray(image_from_bytes(path.read_bytes()))
        thick = np.maximum(image, np.roll(image, 1, axis=1))
        answer = httpx.post(f"{service.url}/predict", json=[(thick * 255).round().tolist()])
        assert answer.status_code == 200, answer.text
        drawn.append(answer.json())
    wanted = {}
    for i, answer in enumerate(drawn):
        rid = answer["request_id"]
        first = label(service.url, {"request_id": rid, "digit": (i + 3) % 10})
        assert first.status_code == 200 and first.json()["replaced"] is None, first.text
        wanted[rid] = i % 10
        again = label(service.url, {"request_id": rid, "digit": i % 10, "item": 0})
        assert again.status_code == 200, again.text
        if (i + 3) % 10 != i % 10:
            assert again.json()["replaced"] == (i + 3) % 10
            assert "the later label wins" in again.json()["detail"]
        same = label(service.url, {"request_id": rid.upper(), "digit": i % 10})
        assert same.status_code == 200 and same.json()["replaced"] is None, same.text
        assert "as before" in same.json()["detail"]
    raw = np.asarray(Image.open(files[0])).tolist()
    as_test = httpx.post(f"{service.url}/predict", json=[raw]).json()["request_id"]
    in_test = label(service.url, {"request_id": as_test, "digit": 4})
    assert in_test.status_code == 200
    # test PNGs uploaded unchanged: the service's conversion moves a few pixels of many
    for path, answer in zip(files, answers, strict=True):
        true = int(path.parent.name)
        assert label(service.url, {"request_id": answer["request_id"], "digit": true}).is_success
    sink = io.BytesIO()
    Image.open(files[1]).save(sink, format="JPEG", quality=95)
    jpeg = httpx.post(
        f"{service.url}/predict", content=sink.getvalue(), headers={"Content-Type": "image/jpeg"}
    ).json()["request_id"]
    assert label(service.url, {"request_id": jpeg, "digit": int(files[1].parent.name)}).is_success
    answers.append({"request_id": jpeg})
    logged(settings, set(wanted) | {as_test} | {a["request_id"] for a in answers})
    deadline = time.monotonic() + 30
    # the demo's loop stage labelled answers on this stack before: count this test's
    while read_batches(settings, records.FEEDBACK_PREFIX, began).rows < 19 + len(answers):
        assert time.monotonic() < deadline, "labels not written"
        time.sleep(0.5)
    train = settings.mnist_dir / "train"
    done = run_cli("data", "add", "--feedback", config_dir=service.config_dir)
    assert done.returncode == 0, done.stderr
    assert "its pixels are those of the test image" in done.stderr, done.stderr
    assert f"{image_name(jpeg, 0)} refused: it is nearly the test image" in " ".join(
        done.stderr.split()
    ), done.stderr
    for rid, digit in wanted.items():
        name = image_name(rid, 0)
        assert (train / str(digit) / name).is_file(), done.stdout
        others = [d for d in range(10) if d != digit and (train / str(d) / name).exists()]
        assert not others
    assert not list(train.glob(f"*/{image_name(as_test, 0)}"))
    for answer in answers:
        assert not list(train.glob(f"*/{image_name(answer['request_id'], 0)}")), done.stderr
    again = run_cli("data", "add", "--feedback", config_dir=service.config_dir)
    assert again.returncode == 0 and "none new" in again.stdout, again.stdout
    staging = settings.home / "cache"
    assert not list(staging.glob("feedback-*")), "staging folder left behind"


def test_a_label_corrected_after_data_add_moves_its_image(service: Service) -> None:
    settings = service.settings
    image = np.asarray(image_from_bytes(digit_images(settings, 1)[0].read_bytes()))
    shifted = np.roll(image, 2, axis=0)
    answer = httpx.post(f"{service.url}/predict", json=[(shifted * 255).round().tolist()]).json()
    rid = answer["request_id"]
    assert label(service.url, {"request_id": rid, "digit": 2}).status_code == 200
    logged(settings, {rid})
    time.sleep(1.5)
    assert run_cli("data", "add", "--feedback", config_dir=service.config_dir).returncode == 0
    train = settings.mnist_dir / "train"
    assert (train / "2" / image_name(rid, 0)).is_file()
    assert label(service.url, {"request_id": rid, "digit": 5}).status_code == 200
    time.sleep(1.5)
    done = run_cli("data", "add", "--feedback", config_dir=service.config_dir)
    assert done.returncode == 0, done.stderr
    assert (train / "5" / image_name(rid, 0)).is_file()
    assert not (train / "2" / image_name(rid, 0)).exists()
    assert "1 of them moved from another digit" in " ".join(done.stdout.split()), done.stdout


def test_one_image_never_holds_two_labels(service: Service) -> None:
    """A training image sent as it is, and one drawing sent twice and labelled with two
    digits: `data add --feedback` refuses them by name (both of the two: which label is
    right is not known)."""
    settings = service.settings
    train = settings.mnist_dir / "train"
    known = sorted((train / "3").glob("[0-9]*.png"))[0]
    as_trained = httpx.post(
        f"{service.url}/predict", json=[np.asarray(Image.open(known)).tolist()]
    ).json()["request_id"]
    drawing = np.zeros((28, 28), np.uint8)
    drawing[6:22, 12:15] = 255
    twice = [
        httpx.post(f"{service.url}/predict", json=[drawing.tolist()]).json()["request_id"]
        for _ in range(2)
    ]
    for rid, digit in ((as_trained, 8), (twice[0], 1), (twice[1], 7)):
        assert label(service.url, {"request_id": rid, "digit": digit}).status_code == 200
    logged(settings, {as_trained, *twice})
    time.sleep(settings.serve.log.batch_s + 0.5)
    done = run_cli("data", "add", "--feedback", config_dir=service.config_dir)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stderr.split())
    assert f"{image_name(as_trained, 0)} refused: its pixels are those of the training" in said
    assert known.name in said
    assert not list(train.glob(f"*/{image_name(as_trained, 0)}"))
    for rid in twice:  # labelled 1 and 7: which is right is not known
        assert f"{image_name(rid, 0)} refused: the same drawing is labelled 1 and 7" in said
        assert not list(train.glob(f"*/{image_name(rid, 0)}"))


@pytest.mark.bad_input
def test_bad_labels_get_a_clear_4xx(service: Service) -> None:
    rid = predict(service.url, digit_images(service.settings, 1)[0])["request_id"]
    cases = [
        ({"request_id": "0" * 32, "digit": 1}, 404, "unknown or expired"),
        ({"request_id": rid, "digit": 10}, 422, "digit"),
        ({"request_id": rid, "digit": "7"}, 422, "digit"),
        ({"request_id": rid}, 422, "digit: missing"),
        ({"request_id": rid, "digit": 1, "item": 3}, 422, "item 3"),
        ({"request_id": "../../etc/passwd", "digit": 1}, 422, "request_id"),
        ([rid, 1], 422, "JSON object"),
    ]
    for body, status, why in cases:
        answer = label(service.url, body)
        assert answer.status_code == status and why in answer.json()["detail"], answer.text
    not_json = httpx.post(f"{service.url}/feedback", content=b"{digit: 1")
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["detail"]
    twice = httpx.post(
        f"{service.url}/feedback",
        content=f'{{"request_id": "{rid}", "digit": 3, "digit": 4}}',
        headers={"Content-Type": "application/json"},
    )
    assert twice.status_code == 422, twice.text
    assert "the field 'digit' is given twice" in twice.json()["detail"]
    huge = httpx.post(f"{service.url}/feedback", content=b" " * 10_000)
    assert huge.status_code == 413


def put_signed(settings: Settings, key: str, body: bytes) -> None:
    """An object signed with the stack's key, as only a holder of that key can write."""
    from mnistops.clients import s3_client

    signature = records.batch_signature(records.log_key(log_signing_key(settings)), key, body)
    s3_client(settings).put_object(
        Bucket=settings.s3.buckets.dvc, Key=key, Body=body, Metadata={records.SIGNATURE: signature}
    )


def feedback_object(rid: str, digit: int = 1, when: float | None = None) -> bytes:
    stamp = time.time() if when is None else when
    return records.feedback_parquet([records.Label(stamp, rid, 0, digit, digit, "1")])


@pytest.mark.security
def test_crafted_log_objects_are_refused_by_name(service: Service) -> None:
    """Unsigned objects (anyone with the store's keys can write them) never become
    training data; signed ones (a holder of the signing key) still pass every check."""
    settings = service.settings
    day = time.strftime("%Y-%m-%d", time.gmtime())
    url = service.url
    image = np.asarray(image_from_bytes(digit_images(settings, 1)[0].read_bytes()))
    moved = (np.roll(image, 3, axis=1) * 255).round().tolist()
    real = httpx.post(f"{url}/predict", json=[moved]).json()["request_id"]
    blank = httpx.post(f"{url}/predict", json=[[[0] * 28] * 28]).json()["request_id"]
    for rid in (real, blank):
        assert label(url, {"request_id": rid, "digit": 8}).status_code == 200
    logged(settings, {real, blank})
    forged_rid = records.RequestIds().next()
    forged = Answered(time.time(), forged_rid, "mnist-classifier", "1", _noise(), _probs())
    twin = Answered(time.time(), real, "mnist-classifier", "1", _noise(), _probs())
    sink = io.BytesIO()
    path_like = {**pq.read_table(io.BytesIO(feedback_object(forged_rid))).to_pylist()[0]}
    path_like["request_id"] = "../../../../tmp/owned" + "0" * 11
    pq.write_table(pa.Table.from_pylist([path_like], schema=records.feedback_schema()), sink)
    unsigned = {
        f"predictions/{day}/000001-{'d' * 16}.parquet": records.predictions_parquet([forged]),
        f"feedback/{day}/000001-{'d' * 16}.parquet": feedback_object(forged_rid),
        f"predictions/{day}/000002-{'b' * 16}.parquet": b"not parquet at all",
        f"predictions/{day}/..%2F..%2Fevil name.parquet": b"x",
        f"feedback/{day}/000004-cccc\x1b[31mred.parquet": b"x",
        f"predictions/{day}/000005-[red]{'f' * 11}.parquet": b"x",  # shown as named
        f"predictions/{day}/000003-{'c' * 16}.parquet": b"\0" * (records.MAX_OBJECT_BYTES + 1),
    }
    signed = {
        f"feedback/{day}/000001-{'a' * 16}.parquet": sink.getvalue(),
        f"predictions/{day}/235959-{'e' * 16}.parquet": records.predictions_parquet([twin]),
    }
    for key, body in unsigned.items():
        put_object(settings, key, body)
    for key, body in signed.items():
        put_signed(settings, key, body)
    try:
        shown = run_cli("predictions", config_dir=service.config_dir)
        assert shown.returncode == 0, shown.stderr
        added = run_cli("data", "add", "--feedback", config_dir=service.config_dir)
        assert added.returncode == 0, added.stderr
        for key in [*unsigned, *list(signed)[:1]]:
            assert key.replace("\x1b", "\\x1b") in shown.stderr.replace("\n", ""), shown.stderr
        assert "\x1b" not in shown.stderr + added.stderr, "a control character reached the terminal"
        said = added.stderr.replace("\n", " ")
        assert said.count("not signed by a mnistops service") == 3, said
        assert "not 32 lower-case hexadecimal" in said
        assert f"request {real} item 0 has other pixels" in said, said
        assert f"{image_name(blank, 0)} refused: nothing is drawn" in said
        train = settings.mnist_dir / "train"
        assert not list(train.glob(f"*/{image_name(forged_rid, 0)}"))
        assert not list(train.glob(f"*/{image_name(blank, 0)}"))
        kept = np.asarray(Image.open(train / "8" / image_name(real, 0)))
        first = logged(settings, {real}).column("input")[0].as_py()
        assert kept.tobytes() == first
        assert not Path("/tmp/owned").exists()
        assert not list(settings.mnist_dir.rglob("*owned*"))
        assert "predictions --quarantine" in " ".join(shown.stderr.split())
        refused = [*unsigned, *list(signed)[:1]]
        moved = run_cli("predictions", "--quarantine", config_dir=service.config_dir)
        assert moved.returncode == 0, moved.stderr
        assert moved.stdout.count("moved s3://") == len(refused), moved.stdout
        aside = quarantined(service)
        assert len(aside) == len(refused) and all(len(key) == 11 + 64 for key in aside), aside
        again = run_cli("predictions", config_dir=service.config_dir)
        assert again.returncode == 0 and "refused" not in again.stderr, again.stderr
        assert logged(settings, {real}).column("input")[0].as_py() == first
    finally:
        client = service_client(service)
        for key in [*unsigned, *signed, *quarantined(service)]:
            client.delete_object(Bucket=settings.s3.buckets.dvc, Key=key)


def quarantined(service: Service) -> list[str]:
    listed = service_client(service).list_objects_v2(
        Bucket=service.settings.s3.buckets.dvc, Prefix="quarantine/"
    )
    return [item["Key"] for item in listed.get("Contents", [])]


def _noise() -> np.ndarray:
    return records.as_pixels(np.random.default_rng(7).random((1, 1, 28, 28), dtype=np.float32))


def _probs() -> np.ndarray:
    probs = np.full((1, 10), 0.05, np.float32)
    probs[0, 8] = 0.55
    return probs


@pytest.mark.browser
def test_the_page_takes_a_correction(service: Service, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(f"{service.url}/")
    pad = browser.find_element(By.ID, "pad")
    strokes = ActionChains(browser)
    strokes.move_to_element_with_offset(pad, -60, -90).click_and_hold()
    strokes.move_by_offset(120, 0).move_by_offset(-90, 190).release()
    strokes.perform()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not browser.find_element(By.ID, "wrong").is_displayed():
        time.sleep(0.2)
    predicted = browser.find_element(By.ID, "digit").text
    assert predicted.isdigit()
    right = 7 if predicted != "7" else 1
    browser.find_element(By.CSS_SELECTOR, f'#choices button[data-digit="{right}"]').click()
    deadline = time.monotonic() + 20
    while (
        time.monotonic() < deadline
        and "thank you" not in browser.find_element(By.ID, "message").text
    ):
        time.sleep(0.2)
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "serve-feedback.png"))
    assert f"labelled {right}" in browser.find_element(By.ID, "message").text
    deadline = time.monotonic() + 30
    while True:
        batches = read_batches(service.settings, records.FEEDBACK_PREFIX)
        digits = [r["digit"] for t in batches.tables for r in t.to_pylist()]
        if digits and digits[-1] == right or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert digits and digits[-1] == right
    done = run_cli("data", "add", "--feedback", config_dir=service.config_dir)
    assert done.returncode == 0 and f"{right}: 1" in done.stdout, done.stdout + done.stderr


@pytest.mark.bad_input
def test_a_flood_of_labels_is_bounded(service: Service) -> None:
    """60 labels a minute (the fixture's limit), counted in fixed minutes: a minute may
    end among the labels sent, so up to twice the limit and one are sent, the most two
    minutes accept; the first refusal ends the flood."""
    rid = predict(service.url, digit_images(service.settings, 1)[0])["request_id"]
    answers = []
    for _ in range(2 * 60 + 1):
        answers.append(label(service.url, {"request_id": rid, "digit": 3}))
        if answers[-1].status_code == 429:
            break
    limited = [a for a in answers if a.status_code == 429]
    assert limited and all(a.status_code in (200, 429) for a in answers)
    assert "feedback_per_minute" in limited[0].json()["detail"]
    wait = limited[0].headers["Retry-After"]
    assert f"try again in {wait} s" in limited[0].json()["detail"]
    assert service.metric('mnistops_feedback_total{outcome="rate_limited"}') >= len(limited)


@pytest.mark.faults
def test_kill_9_loses_no_written_batch(service: Service) -> None:
    settings = service.settings
    files = digit_images(settings, 50)
    written = [predict(service.url, path)["request_id"] for path in files]
    logged(settings, set(written))
    unwritten = [predict(service.url, path)["request_id"] for path in files[:5]]
    writers = writer_processes(service)
    assert len(writers) == 1, writers
    service.stop(signal.SIGKILL)
    gone_within(writers, 15)
    batches = read_batches(settings, records.PREDICTIONS_PREFIX)
    assert not batches.refused, batches.refused
    rows = pa.concat_tables(batches.tables)
    found = set(rows.column("request_id").to_pylist())
    assert set(written) <= found
    lost = set(unwritten) - found
    assert len(lost) <= 5
    service.start()
    assert predict(service.url, files[0])["request_id"] not in found


@pytest.mark.faults
def test_a_stop_signalled_to_the_writer_too_writes_the_last_batch(service: Service) -> None:
    """A terminal's Ctrl-C and `stack down` signal the service's whole process group:
    the writer outlives the signal and writes what the service hands it as it stops."""
    settings = service.settings
    files = digit_images(settings, 5)
    last = {predict(service.url, path)["request_id"] for path in files}
    writers = writer_processes(service)
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(writers[0], sig)
    time.sleep(0.5)
    assert writer_processes(service) == writers
    service.stop(signal.SIGTERM)
    gone_within(writers, 15)
    logged(settings, last, timeout_s=5)
    service.start()


@pytest.mark.faults
def test_a_stop_while_the_store_hangs_says_what_is_lost(service: Service) -> None:
    """The service stops within its grace period, takes its writer with it, and its log
    says how many records it could not write."""
    from mnistops.stack import process, run_dir

    store = process.read_record(run_dir(service.settings), "s3")
    assert store is not None
    writers = writer_processes(service)
    os.kill(store.pid, signal.SIGSTOP)
    try:
        for path in digit_images(service.settings, 5):
            predict(service.url, path)
        began = time.monotonic()
        service.stop(signal.SIGTERM)
        stopped_s = time.monotonic() - began
        gone_within(writers, 15)
    finally:
        os.kill(store.pid, signal.SIGCONT)
    said = service.log.read_text()
    assert "records of the prediction log are lost" in said, said[-2000:]
    assert stopped_s < 25, stopped_s
    service.start()


def writer_processes(service: Service) -> list[int]:
    """The pids of the service's prediction-log writer processes."""
    assert service.process is not None
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == service.process.pid and b"mnistops.loop.log_process" in command:
            found.append(int(entry.name))
    return found


def gone_within(pids: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"the writer processes {pids} outlived the service"
        time.sleep(0.2)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's parent may be slow to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_retention_deletes_only_the_days_past_it(service: Service) -> None:
    from mnistops.loop.log_process import delete_before

    settings = service.settings
    client = service_client(service)
    bucket = settings.s3.buckets.dvc
    old = "predictions/2001-01-01/000000-0000000000000000.parquet"
    odd = "predictions/2001-01-01/keep-me.txt"
    for key in (old, odd):
        put_object(settings, key, b"x")

    def listed() -> set[str]:
        found = client.list_objects_v2(Bucket=bucket, Prefix="predictions/")
        return {item["Key"] for item in found.get("Contents", [])}

    before = listed()
    today = read_batches(settings, records.PREDICTIONS_PREFIX).rows
    try:
        assert delete_before(client, bucket, 30) >= 1
        keys = listed()
        assert old not in keys and odd in keys, "only names mnistops writes are deleted"
        # the service may write another batch meanwhile: today's are all still there
        assert before - {old} <= keys
        assert read_batches(settings, records.PREDICTIONS_PREFIX).rows >= today
    finally:
        client.delete_object(Bucket=bucket, Key=odd)
