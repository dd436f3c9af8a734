"""`mnistops serve` against the real stack: it answers like `mnistops predict`, follows
`champion` with no failed request, refuses bad input by name, asks for its API key, and
its page predicts a digit drawn with the pointer in Chromium."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mnistops.clients import mlflow_client
from mnistops.settings import load_settings
from mnistops.stack.ports import free_port_pair
from tests.helpers import SHOTS, cli_command, run_cli

pytestmark = [pytest.mark.integration]


def free_port() -> int:
    return free_port_pair()


@pytest.fixture(scope="module")
def service(demo_run: dict) -> tuple[str, Path]:
    """The prediction service `mnistops demo` started (detached, part of its stack), on
    the demo's champion; v1 and v2 are registered."""
    settings = demo_run["settings"]
    ready = httpx.get(f"{settings.serve_url}/health", timeout=10)
    assert ready.status_code == 200, ready.text
    return settings.serve_url, demo_run["config_dir"]


def wait_serving(url: str, version: str, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health").json().get("model_version") == version:
            return True
        time.sleep(0.3)
    return False


def champion_of(config_dir: Path) -> str:
    settings = load_settings(config_dir)
    name = settings.model_registry.name
    return mlflow_client(settings).get_model_version_by_alias(name, "champion").version


def test_it_answers_like_predict(service: tuple[str, Path]) -> None:
    url, config_dir = service
    settings = load_settings(config_dir)
    files = [sorted((settings.mnist_dir / "test" / str(d)).glob("*.png"))[0] for d in range(10)]
    done = run_cli("predict", "--json", *map(str, files), config_dir=config_dir)
    assert done.returncode == 0, done.stderr
    expected = [json.loads(line) for line in done.stdout.splitlines()]
    for path, want in zip(files, expected, strict=True):
        got = httpx.post(
            f"{url}/predict", content=path.read_bytes(), headers={"Content-Type": "image/png"}
        ).json()
        assert got["digit"] == want["digit"] and got["model_version"] == want["model_version"]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        assert len(got["probabilities"]) == 10
        assert sum(got["probabilities"]) == pytest.approx(1, abs=1e-4)
    upload = httpx.post(f"{url}/predict", files={"file": ("d.png", files[3].read_bytes())})
    assert upload.status_code == 200 and upload.json()["digit"] == expected[3]["digit"]
    batch = httpx.post(
        f"{url}/predict",
        json={"images": [base64.b64encode(p.read_bytes()).decode() for p in files]},
    ).json()
    assert [p["digit"] for p in batch["predictions"]] == [e["digit"] for e in expected]
    arrays = [np.asarray(Image.open(p)).tolist() for p in files[:2]]
    assert len(httpx.post(f"{url}/predict", json=arrays).json()["predictions"]) == 2
    model = httpx.get(f"{url}/model").json()
    name = settings.model_registry.name
    assert model["name"] == name and model["alias"] == "champion"
    assert model["runtime"] == "onnxruntime"  # the demo's graphs passed their check
    assert model["data_version"] in ("v1.0", "v2.0", "v3.0") and 0 < model["test_accuracy"] <= 1
    metrics = httpx.get(f"{url}/metrics").text
    assert 'mnistops_requests_total{path="/predict",status="200"}' in metrics
    assert f'mnistops_model_info{{name="{name}",version="{model["version"]}"}} 1' in metrics
    assert "mnistops_predict_seconds_bucket" in metrics
    families = {f.name: f.type for f in text_string_to_metric_families(metrics)}
    assert families["mnistops_predict_seconds"] == "histogram"
    assert families["mnistops_requests"] == families["mnistops_feedback"] == "counter"
    assert families["mnistops_model_info"] == "gauge"
    predict = httpx.get(f"{url}/openapi.json").json()["paths"]["/predict"]["post"]
    assert "image/png" in predict["requestBody"]["content"]


def test_answers_are_what_the_openapi_schema_says(service: tuple[str, Path]) -> None:
    """/predict's answers, from the fast path and from the route alike, are declared in
    /openapi.json: the request's content type, the status, and the JSON's schema."""
    import jsonschema

    url, config_dir = service
    settings = load_settings(config_dir)
    spec = httpx.get(f"{url}/openapi.json").json()
    operation = spec["paths"]["/predict"]["post"]
    image = sorted((settings.mnist_dir / "test" / "2").glob("*.png"))[0].read_bytes()
    requests = {
        "a PNG": dict(content=image, headers={"Content-Type": "image/png"}),
        "a multipart upload": dict(files={"file": ("d.png", image)}),
        "a JSON batch": dict(json={"images": [base64.b64encode(image).decode()] * 2}),
        "a broken PNG": dict(content=image[:40], headers={"Content-Type": "image/png"}),
        "a JSON of the wrong shape": dict(json={"images": [[1, 2, 3]]}),
        "too large": dict(content=b"0" * (9 << 20), headers={"Content-Type": "image/png"}),
    }
    statuses = set()
    for case, request in requests.items():
        answer = httpx.post(f"{url}/predict", timeout=30, **request)
        sent = answer.request.headers["content-type"].split(";")[0]
        assert sent in operation["requestBody"]["content"], (case, sent)
        declared = operation["responses"].get(str(answer.status_code))
        assert declared is not None, (case, answer.status_code, answer.text)
        schema = {**declared["content"]["application/json"]["schema"], **spec}
        jsonschema.validate(answer.json(), schema)
        statuses.add(answer.status_code)
    assert statuses == {200, 400, 413, 422}, statuses


def test_requests_are_refused_or_answered_as_the_openapi_schema_says(
    service: tuple[str, Path],
) -> None:
    """A request body the schema of /openapi.json calls invalid is refused (422, or 413
    for a batch over the limit); one it calls valid is answered: what a client generator
    reads is what the service does, for JSON, for content types and for multipart."""
    import jsonschema

    url, config_dir = service
    settings = load_settings(config_dir)
    body = httpx.get(f"{url}/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]
    image = sorted((settings.mnist_dir / "test" / "3").glob("*.png"))[0].read_bytes()
    png = base64.b64encode(image).decode()
    zeros = [[0] * 28 for _ in range(28)]
    bodies = {
        "an empty object": {},
        "an object without images": {"foo": 1},
        "an empty list": [],
        "a list of numbers": [1, 2, 3],
        "an array 28x27": [[[0] * 27 for _ in range(28)]],
        "a value over 255": [[[*[0] * 27, 256], *zeros[1:]]],
        "a negative value": [[[-1, *[0] * 27], *zeros[1:]]],
        "a batch over the limit": [zeros] * (settings.serve.max_batch + 1),
        "an array of booleans": [[[True] * 28 for _ in range(28)]],
        "an array of numbers as text": [[["1"] * 28 for _ in range(28)]],
        "a boolean among numbers": [[[0.5, True, *[0] * 26], *zeros[1:]]],
        "an array 28x28": [zeros],
        "images of an array and a PNG": {"images": [zeros, png]},
        "images beside another key": {"images": [png], "note": "kept aside"},
        "a list of PNGs": [png, png],
    }
    schema = body["content"]["application/json"]["schema"]
    for case, document in bodies.items():
        valid = jsonschema.Draft202012Validator(schema).is_valid(document)
        answer = httpx.post(f"{url}/predict", json=document, timeout=30)
        assert (answer.status_code == 200) == valid, (case, valid, answer.status_code)
        assert valid or answer.status_code in (413, 422), (case, answer.text)
    plain = httpx.post(f"{url}/predict", content=image, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 200 and "*/*" in body["content"], "any other type: an image"
    form = body["content"]["multipart/form-data"]["schema"]
    for field in ("file", "upload"):
        upload = httpx.post(f"{url}/predict", files={field: ("d.png", image)}, timeout=30)
        assert upload.status_code == 200, (field, upload.text)
        jsonschema.validate({field: "d.png"}, form)
    two = httpx.post(
        f"{url}/predict", files=[("a", ("a.png", image)), ("b", ("b.png", image))], timeout=30
    )
    assert two.status_code == 400, two.text
    assert not jsonschema.Draft202012Validator(form).is_valid({"a": "a.png", "b": "b.png"})
    no_file = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n'
    empty = httpx.post(
        f"{url}/predict",
        content=no_file,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
        timeout=30,
    )
    assert empty.status_code == 400, empty.text
    assert not jsonschema.Draft202012Validator(form).is_valid({}), "a form without a file"


def test_the_api_docs_load_nothing_from_elsewhere(service: tuple[str, Path]) -> None:
    """/docs and /redoc name only the service's own files (offline, nothing from a CDN),
    and each of those files is served."""
    import re

    url, _config_dir = service
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{url}{page}", timeout=10)
        assert html.status_code == 200, (page, html.status_code)
        linked = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html.text)
        linked += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)
        assert linked and not [u for u in linked if "//" in u], (page, linked)
        assert "openapi.json" in html.text
        for path in linked:
            got = httpx.get(f"{url}{path}", timeout=10)
            assert got.status_code == 200 and len(got.content) > 100, (page, path)


def test_a_moved_champion_is_served_with_no_failed_request(service: tuple[str, Path]) -> None:
    url, config_dir = service
    settings = load_settings(config_dir)
    image = sorted((settings.mnist_dir / "test" / "7").glob("*.png"))[0].read_bytes()
    before = champion_of(config_dir)
    other = "2" if before == "1" else "1"
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                answer = http.post(
                    f"{url}/predict", content=image, headers={"Content-Type": "image/png"}
                )
                seen.append((answer.status_code, answer.json().get("model_version", "")))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        moved = run_cli("models", "promote", other, "-m", "a test", config_dir=config_dir)
        assert moved.returncode == 0, moved.stderr
        assert "WARNING" not in moved.stdout + moved.stderr, moved.stdout + moved.stderr
        began = time.monotonic()
        while time.monotonic() - began < 15 and (not seen or seen[-1][1] != other):
            time.sleep(0.2)
        swap_s = time.monotonic() - began
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert all(status == 200 for status, _ in seen), {s for s, _ in seen}
    assert seen[-1][1] == other, f"still v{seen[-1][1]} after {swap_s:.1f} s"
    versions = [v for _, v in seen]
    assert versions[: versions.index(other)] == [before] * versions.index(other)
    name = settings.model_registry.name
    tags = mlflow_client(settings).get_model_version(name, other).tags
    assert tags["promoted_reason"].endswith(": a test") and tags["previous_champion"] == before
    assert tags["promoted_by"] and tags["promoted_at"]
    kept = mlflow_client(settings).get_model_version(name, before).tags.get("previous_champion")
    back = run_cli("models", "rollback", config_dir=config_dir)
    assert back.returncode == 0 and champion_of(config_dir) == before, back.stderr
    assert wait_serving(url, before), "the rollback is served within 20 s"
    again = mlflow_client(settings).get_model_version(name, before).tags.get("previous_champion")
    assert again == kept, "a rollback keeps the history it goes back along"


def png(size: tuple[int, int] = (28, 28)) -> bytes:
    """A white (blank) PNG of `size` (width, height)."""
    return png_of(np.full(size[::-1], 255, np.uint8))


def png_of(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def truncated() -> bytes:
    """A PNG of noise cut short in the middle of its pixel data."""
    out = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    Image.fromarray(noise).save(out, format="PNG")
    return out.getvalue()[: len(out.getvalue()) // 2]


def bomb(side: int = 50_000) -> bytes:
    """A small PNG that declares side x side pixels (50,000: a decompression bomb)."""
    good = png((8, 8))
    ihdr = good.index(b"IHDR")
    header = b"IHDR" + side.to_bytes(4, "big") * 2 + good[ihdr + 12 : ihdr + 17]
    crc = zlib.crc32(header).to_bytes(4, "big")
    return good[:ihdr] + header + crc + good[ihdr + 21 :]


BAD = [
    ("not an image", b"hello", "image/png", 400, "not an image"),
    ("truncated", truncated(), "image/png", 400, "corrupt or truncated"),
    ("bomb", bomb(), "image/png", 400, "decompression bomb"),
    ("blank", png(), "image/png", 400, "blank"),
    ("empty", b"", "image/png", 400, "empty"),
    ("not json", b"{", "application/json", 400, "not JSON"),
    ("wrong shape", json.dumps([[[0] * 27] * 28]).encode(), "application/json", 422, "28x28"),
    ("out of range", json.dumps([[[300] * 28] * 28]).encode(), "application/json", 422, "0 to 255"),
    ("not a list", json.dumps({"x": 1}).encode(), "application/json", 422, "list of images"),
    ("bad base64", json.dumps(["***"]).encode(), "application/json", 422, "not base64"),
    (
        "huge numbers",
        json.dumps([[[10**400] * 28] * 28]).encode(),
        "application/json",
        422,
        "28x28",
    ),
    (
        "a number of 5,000 digits",  # JSON, but past Python's cap on digits
        b"[[[" + b"9" * 5000 + b"]]]",
        "application/json",
        422,
        "4,300 digits",
    ),
    ("batch too big", json.dumps([[[0] * 28] * 28] * 257).encode(), "application/json", 413, "256"),
    (
        "pixels in all",  # two images of 25 million pixels: each fits, not both
        json.dumps([base64.b64encode(bomb(5_000)).decode()] * 2).encode(),
        "application/json",
        413,
        "images[1]: 25,000,000 pixels would pass the 40,000,000",
    ),
    ("body too big", b"\0" * (9 << 20), "image/png", 413, "bytes"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("case", "body", "kind", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_by_name_and_the_service_goes_on(
    service: tuple[str, Path], case: str, body: bytes, kind: str, status: int, words: str
) -> None:
    url, _ = service
    answer = httpx.post(f"{url}/predict", content=body, headers={"Content-Type": kind})
    assert answer.status_code == status, (case, answer.text)
    assert words in answer.json()["detail"], answer.text
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.bad_input
def test_a_compressed_body_is_refused_by_its_encoding(service: tuple[str, Path]) -> None:
    """/predict reads bodies as they are: a gzip one is refused by its encoding, not as
    "not JSON"."""
    url, _ = service
    answer = httpx.post(
        f"{url}/predict",
        content=gzip.compress(json.dumps([[[0] * 28] * 28]).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert answer.status_code == 415, answer.text
    assert "Content-Encoding 'gzip' is not taken by /predict" in answer.json()["detail"]
    stroke = np.zeros((28, 28), np.uint8)
    stroke[6:22, 12:16] = 255
    digit = png_of(stroke)
    for headers, status in (
        ([("Content-Encoding", "gzip"), ("Content-Encoding", "identity")], 415),
        ([("Content-Encoding", "IDENTITY")], 200),
    ):
        sent = httpx.post(
            f"{url}/predict", content=digit, headers=[("Content-Type", "image/png"), *headers]
        )
        assert sent.status_code == status, (headers, sent.text)
    multipart = httpx.post(
        f"{url}/predict", files={"file": digit}, headers={"Content-Encoding": "gzip"}
    )
    assert multipart.status_code == 415, multipart.text
    assert "'gzip'" in multipart.json()["detail"]


def test_large_images_and_other_encodings(service: tuple[str, Path]) -> None:
    """A photo-sized image is converted in a thread while small requests go on; base64
    may be wrapped, URL-safe or a data: URL; a multipart upload must say its length."""
    url, config_dir = service
    settings = load_settings(config_dir)
    digit = sorted((settings.mnist_dir / "test" / "4").glob("*.png"))[0].read_bytes()
    big = io.BytesIO()
    Image.open(io.BytesIO(digit)).resize((3000, 3000)).save(big, format="PNG")
    answers: list[int] = []

    def large() -> None:
        answers.append(httpx.post(f"{url}/predict", content=big.getvalue(), timeout=60).status_code)

    thread = threading.Thread(target=large)
    thread.start()
    began = time.monotonic()
    small = [httpx.post(f"{url}/predict", content=digit).status_code for _ in range(5)]
    assert small == [200] * 5 and time.monotonic() - began < 5
    thread.join()
    assert answers == [200]
    text = base64.b64encode(digit).decode()
    for encoded in (
        "\n".join(text[i : i + 76] for i in range(0, len(text), 76)),
        "data:image/png;base64," + text,
        base64.urlsafe_b64encode(digit).decode(),
    ):
        assert httpx.post(f"{url}/predict", json=[encoded]).status_code == 200
    chunked = httpx.post(
        f"{url}/predict",
        content=iter([b"--b\r\n"]),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"]


@pytest.mark.bad_input
def test_concurrent_uploads_are_each_answered_as_alone(service: tuple[str, Path]) -> None:
    """Uploads that arrive together are converted together: each good one gets the
    answer it gets alone, a corrupt or blank one its own refusal, and a refusal never
    spills onto the others. 96 requests, 32 at a time, in a shuffled mix."""
    url, config_dir = service
    settings = load_settings(config_dir)
    files = [sorted((settings.mnist_dir / "test" / str(d)).glob("*.png"))[0] for d in range(10)]
    bodies = [path.read_bytes() for path in files]
    wide = io.BytesIO()
    Image.open(files[2]).resize((61, 45)).convert("RGB").save(wide, format="JPEG", quality=95)
    blank = io.BytesIO()
    Image.new("L", (28, 28), 255).save(blank, format="PNG")
    bodies += [wide.getvalue(), b"\x89PNG\r\n\x1a\n not really", blank.getvalue()]

    def sent(body: bytes) -> tuple[int, dict]:
        answer = httpx.post(f"{url}/predict", content=body, timeout=30)
        return answer.status_code, answer.json()

    alone = [sent(body) for body in bodies]
    assert [status for status, _ in alone] == [200] * 11 + [400, 400], alone
    mixed = [int(i) for i in np.random.default_rng(3).integers(0, len(bodies), 96)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(sent, [bodies[i] for i in mixed]))
    for i, (status, answer) in zip(mixed, together, strict=True):
        want_status, want = alone[i]
        assert status == want_status, (i, answer)
        if status != 200:
            assert answer["detail"] == want["detail"]
            continue
        assert answer["digit"] == want["digit"], (i, answer)
        assert answer["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


@pytest.mark.security
def test_no_request_reads_a_file_or_url_of_its_choosing(service: tuple[str, Path]) -> None:
    url, _ = service
    for name in ("/etc/passwd", "file:///etc/passwd", "http://127.0.0.1:1/x"):
        for body in (json.dumps([name]), json.dumps({"images": [name]})):
            answer = httpx.post(
                f"{url}/predict", content=body, headers={"Content-Type": "application/json"}
            )
            assert answer.status_code == 422, answer.text
        answer = httpx.post(f"{url}/predict", content=name.encode())
        assert answer.status_code == 400 and "not an image" in answer.text


@contextmanager
def another_service(
    config_dir: Path, log: Path | None = None, **settings: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A second `mnistops serve` on the same stack, with `settings` as MNISTOPS_SERVE__*
    variables (its output in `log`); its URL and process once it is ready."""
    port = free_port()
    env = {**os.environ, "MNISTOPS_SERVE__PORT": str(port)}
    env |= {f"MNISTOPS_SERVE__{key.upper()}": value for key, value in settings.items()}
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    command = cli_command(("serve",), config_dir)
    proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)
        if log is not None:
            out.close()  # type: ignore[union-attr]


@pytest.mark.security
def test_the_api_key_is_required_when_set(service: tuple[str, Path]) -> None:
    _url, config_dir = service
    key = "k-" + os.urandom(8).hex()
    with another_service(config_dir, api_key=key) as (url, _proc):
        image = png((28, 28))
        for path in ("/model", "/metrics", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
        refused = httpx.post(f"{url}/predict", content=image)
        assert refused.status_code == 401 and "API key" in refused.json()["detail"]
        wrong = httpx.get(f"{url}/model", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = httpx.get(f"{url}/model", headers={"Authorization": f"Bearer {key}"})
        assert good.status_code == 200 and good.json()["alias"] == "champion"
        assert httpx.get(f"{url}/").status_code == 200
        name = load_settings(config_dir).model_registry.name
        images = {"inputs": np.zeros((1, 1, 28, 28)).tolist()}
        for path, words in (("/invocations", "message"), (f"/v2/models/{name}/infer", "error")):
            refused = httpx.post(f"{url}{path}", json=images)
            assert refused.status_code == 401 and "API key" in refused.json()[words], path
        for path in ("/ping", "/v2/health/live", "/v2/health/ready"):
            assert httpx.get(f"{url}{path}").status_code == 200, path
        keyed = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{url}/invocations", json=images, headers=keyed).status_code == 200


def test_requests_still_open_when_it_stops_get_a_503_not_a_traceback(
    service: tuple[str, Path], tmp_path: Path
) -> None:
    """A stop waits 5 s for the requests being answered; one still open then (its
    body held back) is answered 503, and the log holds no traceback."""
    _url, config_dir = service
    log = tmp_path / "serve.log"
    with another_service(config_dir, log, request_timeout_s="60") as (url, proc):
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 5000\r\n\r\n" + b"\x89PNG"
        )
        time.sleep(0.5)
        proc.terminate()
        sock.settimeout(30)
        answer = b""
        while chunk := sock.recv(4096):  # until the service closes the connection
            answer += chunk
        proc.wait(30)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"the service is stopping" in answer
    said = log.read_text()
    assert "Traceback" not in said and "CancelledError" not in said, said


@pytest.mark.security
def test_large_bodies_past_what_it_holds_are_refused_until_room_is_made(
    service: tuple[str, Path],
) -> None:
    """32 x serve.max_body_bytes of large bodies are held at once, counted as they
    arrive: clients that send 98 KB of 99 KB uploads and hold back the rest fill it,
    then a large upload is refused (503, Retry-After) while small ones are answered;
    once they go away, the large upload is answered. Headers that only declare a large
    body hold nothing."""
    _url, config_dir = service
    noise = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    stroke = np.zeros((28, 28), np.uint8)
    stroke[6:22, 12:16] = 255
    large, small_digit = (png_of(pixels) for pixels in (noise, stroke))
    assert 64 << 10 <= len(large) <= 99_000
    settings = {"max_body_bytes": "100000", "request_timeout_s": "60"}
    with another_service(config_dir, **settings) as (url, _proc):
        port = int(url.rsplit(":", 1)[1])
        holders = []
        try:
            for sent in [0] * 8 + [98_000] * 32:  # 32 x 98,000 of the 3,200,000 held at most
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    b"Content-Length: 99000\r\n\r\n" + bytes(sent)
                )
                holders.append(sock)
            time.sleep(1)
            refused = httpx.post(f"{url}/predict", content=large, timeout=10)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert "MiB of large request bodies" in refused.json()["detail"]
            name = load_settings(config_dir).model_registry.name
            batch = {"inputs": np.zeros((24, 1, 28, 28)).tolist()}  # 77 KB of JSON
            for path, words in (("/invocations", "message"), (f"/v2/models/{name}/infer", "error")):
                busy = httpx.post(f"{url}{path}", json=batch, timeout=10)
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1", path
                assert "MiB of large request bodies" in busy.json()[words], path
            small = httpx.post(f"{url}/predict", content=small_digit, timeout=10)
            assert small.status_code == 200, small.text
        finally:
            for sock in holders:
                sock.close()
        time.sleep(1)
        answered = httpx.post(f"{url}/predict", content=large, timeout=10)
        assert answered.status_code == 200, answered.text


def test_a_champion_that_does_not_load_is_refused_and_the_old_one_serves(
    service: tuple[str, Path],
) -> None:
    url, config_dir = service
    settings = load_settings(config_dir)
    client = mlflow_client(settings)
    name = settings.model_registry.name
    serving = httpx.get(f"{url}/health").json()["model_version"]
    run = client.get_model_version(name, serving).run_id
    # a version whose files are a run's plots: it downloads, but holds no model
    broken = client.create_model_version(name, source=f"runs:/{run}/plots", run_id=run)
    client.set_registered_model_alias(name, "champion", broken.version)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and broken.version not in httpx.get(
            f"{url}/model"
        ).json().get("refused_versions", {}):
            time.sleep(0.5)
        model = httpx.get(f"{url}/model").json()
        assert broken.version in model["refused_versions"], model
        assert model["version"] == serving
    finally:
        client.set_registered_model_alias(name, "champion", serving)
        client.delete_model_version(name, broken.version)


@pytest.mark.security
def test_a_pickled_champion_runs_nothing_and_the_old_one_serves(
    service: tuple[str, Path], tmp_path: Path
) -> None:
    """Someone with only the MLflow client registers a pickled module whose unpickling
    runs a command, and moves `champion` to it while the service runs: the service
    refuses it without unpickling (the marker never appears), keeps serving, and says
    why in /model without any path of this host."""
    from tests.attacker import register_pickled_champion

    url, config_dir = service
    settings = load_settings(config_dir)
    client = mlflow_client(settings)
    name = settings.model_registry.name
    serving = httpx.get(f"{url}/health").json()["model_version"]
    marker = tmp_path / "pwned"
    bad = register_pickled_champion(settings.mlflow_uri, name, marker)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and bad not in httpx.get(f"{url}/model").json().get(
            "refused_versions", {}
        ):
            time.sleep(0.5)
        model = httpx.get(f"{url}/model").json()
        assert "not registered by mnistops" in model["refused_versions"][bad], model
        assert str(settings.home) not in json.dumps(model), "no host path in /model"
        assert model["version"] == serving
        image = sorted((settings.mnist_dir / "test" / "4").glob("*.png"))[0].read_bytes()
        answer = httpx.post(f"{url}/predict", content=image, headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.json()["model_version"] == serving
    finally:
        client.set_registered_model_alias(name, "champion", serving)
        client.delete_model_version(name, bad)
    assert not marker.exists(), "the attacker's payload ran in the service"


@pytest.mark.security
def test_slow_clients_are_cut_and_others_answered(service: tuple[str, Path]) -> None:
    """5,000 connections that send part of their headers or of their body, and never the
    rest, are held open by one client: requests from others are answered meanwhile, and
    the service closes every slow one within its bound (serve.request_timeout_s, 5 s)."""
    import resource
    import selectors
    import socket

    url, _config_dir = service
    host, port = url.removeprefix("http://").rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 12000)), hard))
    slow: list[socket.socket] = []
    partial = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n\x89PNG",
    )
    began = time.monotonic()
    try:
        for i in range(5000):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(partial[i % 2])
            slow.append(sock)
        opened_s = time.monotonic() - began
        with httpx.Client(timeout=5) as http:
            answers = [http.get(f"{url}/health").status_code for _ in range(20)]
        assert answers == [200] * 20
        closed = 0
        watching = selectors.DefaultSelector()  # epoll: select() stops at descriptor 1023
        for sock in slow:
            watching.register(sock, selectors.EVENT_READ)
        deadline = began + opened_s + 5 + 10
        while closed < len(slow) and time.monotonic() < deadline:
            for event, _mask in watching.select(timeout=0.5):
                sock = event.fileobj
                try:
                    ended = sock.recv(4096) == b""
                except ConnectionResetError:
                    ended = True
                if ended:
                    watching.unregister(sock)
                    closed += 1
        assert closed == len(slow), f"{len(slow) - closed} slow connections still open"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'mnistops_connections_cut_total{why="slow"}' in metrics
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        for sock in slow:
            sock.close()


def test_detached_it_is_part_of_the_stack(service: tuple[str, Path]) -> None:
    url, config_dir = service
    status = run_cli("stack", "status", config_dir=config_dir)
    assert "Prediction service" in status.stdout and "healthy" in status.stdout, status.stdout
    again = run_cli("serve", "--detach", config_dir=config_dir)
    assert again.returncode == 1 and "already running" in again.stderr, again.stderr
    env = run_cli("stack", "env", config_dir=config_dir).stdout
    assert f"MNISTOPS_SERVE__URL={url}" in env


@pytest.mark.browser
def test_the_api_docs_render_in_a_browser_offline(service: tuple[str, Path], browser) -> None:
    """Swagger UI at /docs lists the service's operations in Chromium, from the files the
    service serves (the test machine reaches no CDN)."""
    from selenium.webdriver.common.by import By

    url, _config_dir = service
    browser.get(f"{url}/docs")
    paths = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
    assert "/predict" in paths and "/feedback" in paths, paths


@pytest.mark.browser
def test_a_digit_drawn_on_the_page_is_predicted(service: tuple[str, Path], browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, _ = service
    browser.get(f"{url}/")
    pad = browser.find_element(By.ID, "pad")
    strokes = ActionChains(browser)
    strokes.move_to_element_with_offset(pad, 0, -100).click_and_hold()
    strokes.move_by_offset(0, 200).release()
    strokes.perform()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not browser.find_element(By.ID, "digit").text:
        time.sleep(0.2)
    digit = browser.find_element(By.ID, "digit").text
    model = browser.find_element(By.ID, "model").text
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "serve-draw.png"))
    assert digit.isdigit(), browser.find_element(By.TAG_NAME, "body").text
    assert "answered by " in model and " v" in model
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 10
