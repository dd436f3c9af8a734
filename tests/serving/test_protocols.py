"""The standard protocols of `mnistops serve`, spoken by clients nobody here wrote:
MLflow's own scoring client (against `mlflow models serve` on the same champion, with the
same bodies) and `tritonclient` for the Open Inference Protocol (V2)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mnistops.clients import client_env
from mnistops.settings import load_settings
from mnistops.stack.ports import free_port_pair

pytestmark = [pytest.mark.integration, pytest.mark.protocols]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def served(demo_run: dict) -> dict:
    """The demo's service, its model's name, and 40 test images (10 of each digit's
    first four) as the model takes them: (N, 1, 28, 28) in [0, 1]."""
    settings = demo_run["settings"]
    ready = httpx.get(f"{settings.serve_url}/health", timeout=10)
    assert ready.status_code == 200, ready.text
    paths = [
        path
        for digit in range(10)
        for path in sorted((settings.mnist_dir / "test" / str(digit)).glob("*.png"))[:4]
    ]
    pixels = np.stack([np.asarray(Image.open(path), dtype=np.uint8) for path in paths])
    return {
        "url": settings.serve_url,
        "name": settings.model_registry.name,
        "settings": settings,
        "pixels": pixels,
        "images": (pixels.astype(np.float32) / 255)[:, None],
    }


@pytest.fixture(scope="module")
def mlflow_serve(served: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`mlflow models serve` on the same stack's champion (MLflow's own loader of the
    exported archive: the reference the scoring protocol is compared with)."""
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    settings = served["settings"]
    port = free_port_pair()
    env = {**os.environ, **client_env(settings), "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = tmp_path_factory.mktemp("mlflow-serve") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{served['name']}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        ScoringServerClient("127.0.0.1", port).wait_server_ready(120, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode is not None, log.read_text()[-2000:]


def test_mlflows_client_gets_mlflows_answers(served: dict, mlflow_serve: int) -> None:
    """The same bodies, sent by MLflow's scoring client to `mlflow models serve` and to
    `mnistops serve`: the same logits back (within float rounding), so the same digits."""
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    port = int(served["url"].rsplit(":", 1)[1])
    images = served["images"]
    one_column = pd.DataFrame({"images": [image.ravel().tolist() for image in images]})
    answers = {}
    for server, at in (("mlflow", mlflow_serve), ("mnistops", port)):
        client = ScoringServerClient("127.0.0.1", at)
        client.wait_server_ready(10)
        answers[server] = {
            "inputs": np.asarray(client.invoke(images).get_predictions()),
            "dataframe_split": np.asarray(client.invoke(one_column).get_predictions()),
        }
        instances = httpx.post(
            f"http://127.0.0.1:{at}/invocations", json={"instances": images.tolist()}
        )
        assert instances.status_code == 200, instances.text
        answers[server]["instances"] = np.asarray(instances.json()["predictions"])
    for form, ours in answers["mnistops"].items():
        theirs = answers["mlflow"][form]
        assert ours.shape == theirs.shape == (40, 10), form
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=form)
        assert (ours.argmax(1) == theirs.argmax(1)).all(), form
    columns = pd.DataFrame(images.reshape(40, 784), columns=[f"p{i}" for i in range(784)])
    wide = np.asarray(ScoringServerClient("127.0.0.1", port).invoke(columns).get_predictions())
    np.testing.assert_allclose(wide, answers["mnistops"]["inputs"], atol=1e-6)


def test_tritonclient_speaks_v2_with_it(served: dict) -> None:
    """tritonclient (the Open Inference Protocol's client) in its default binary mode and
    in JSON, FP32 and UINT8: the digits /predict gives for the same pixels."""
    import tritonclient.http as triton

    url, name, pixels, images = served["url"], served["name"], served["pixels"], served["images"]
    expected = [
        answer["digit"]
        for answer in httpx.post(f"{url}/predict", json=pixels.tolist()).json()["predictions"]
    ]
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name and metadata["inputs"][0]["shape"] == [-1, 1, 28, 28]
    version = metadata["versions"][0]
    assert client.is_model_ready(name, version) and not client.is_model_ready("other")
    for binary in (True, False):
        tensor = triton.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(output, binary_data=binary)
            for output in ("digit", "probabilities")
        ]
        result = client.infer(name, [tensor], outputs=outputs, request_id="r-1")
        assert result.as_numpy("digit").tolist() == expected, binary
        assert result.as_numpy("probabilities").shape == (40, 10)
        assert result.as_numpy("logits") is None
        response = result.get_response()
        assert response["id"] == "r-1" and response["model_version"] == version
    tensor = triton.InferInput("images", [40, 28, 28], "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(name, [tensor], model_version=version)
    assert result.as_numpy("digit").tolist() == expected
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1, atol=1e-5)
    assert result.as_numpy("logits").shape == (40, 10)
    with pytest.raises(Exception, match="is not served"):
        client.infer(name, [tensor], model_version="999")
    for algorithm in ("gzip", "deflate"):
        packed = client.infer(name, [tensor], request_compression_algorithm=algorithm)
        assert packed.as_numpy("digit").tolist() == expected, algorithm


def test_their_answers_are_logged_and_can_be_labelled(served: dict) -> None:
    """An answer of either protocol is one of the service's answers: counted in /metrics
    and labelled through /feedback with its X-Request-Id."""
    url, name, images = served["url"], served["name"], served["images"]
    before = httpx.get(f"{url}/metrics").text
    mlflow = httpx.post(f"{url}/invocations", json={"inputs": images[:2].tolist()})
    v2 = httpx.post(
        f"{url}/v2/models/{name}/infer",
        json={"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                          "data": images[3].ravel().tolist()}]},
    )  # fmt: skip
    for answer, item in ((mlflow, 1), (v2, 0)):
        assert answer.status_code == 200, answer.text
        label = {"request_id": answer.headers["x-request-id"], "digit": 0, "item": item}
        taken = httpx.post(f"{url}/feedback", json=label)
        assert taken.status_code == 200, taken.text
    assert v2.json()["parameters"]["request_id"] == v2.headers["x-request-id"]
    after = httpx.get(f"{url}/metrics").text

    def timed(text: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith("mnistops_predict_seconds_count"))
        return float(line.split()[-1])

    assert timed(after) >= timed(before) + 2  # both answers are in the latency histogram
    for path in ("/invocations", f"/v2/models/{name}/infer"):
        line = f'mnistops_requests_total{{path="{path}",status="200"}}'
        assert line in after and after.count(line) == 1, path
    assert before != after


BAD_MLFLOW = {
    "not JSON": (b"{nope", 400, "not JSON"),
    "two forms": (b'{"inputs": [], "instances": []}', 400, "give exactly one of"),
    "no images": (b'{"inputs": []}', 400, "no images"),
    "0-255 pixels": (b'{"inputs": [[[' + b",".join([b"255"] * 784) + b"]]]}", 400, "[0, 1]"),
    "the wrong size": (b'{"inputs": [[1, 0, 0]]}', 400, "expected 28x28"),
    "ragged": (b'{"inputs": [[0.5], [0.5, 0.5]]}', 400, "of equal size"),
    "text": (b'{"inputs": [["a"]]}', 400, "of numbers"),
    "a bad frame": (b'{"dataframe_split": [1]}', 400, '{"columns"'),
    "a named input": (b'{"inputs": {"x": [1]}}', 400, "one unnamed input"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(BAD_MLFLOW))
def test_a_bad_scoring_request_gets_mlflows_error(served: dict, case: str) -> None:
    body, status, words = BAD_MLFLOW[case]
    answer = httpx.post(
        f"{served['url']}/invocations", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == status, answer.text
    assert answer.json()["error_code"] == "BAD_REQUEST" and words in answer.json()["message"]


def _v2(shape: list, datatype: str = "FP32", **extra: object) -> dict:
    count = int(np.prod(shape))
    return {"inputs": [{"name": "images", "shape": shape, "datatype": datatype,
                        "data": [0.5] * count, **extra}]}  # fmt: skip


def _nested(depth: int) -> list:
    found: list = [0.5]
    for _ in range(depth):
        found = [found]
    return found


BAD_V2 = {
    "two tensors": ({"inputs": [_v2([1, 784])["inputs"][0]] * 2}, None, 400, "one tensor"),
    "a string datatype": (_v2([1, 784], "BYTES"), None, 400, "datatype 'BYTES'"),
    "a shape of text": (_v2([1, 784]) | {"inputs": [{"name": "images", "shape": "x",
                                                     "datatype": "FP32"}]},
                        None, 400, "shape must be"),
    "another input's name": ({"inputs": [{**_v2([1, 784])["inputs"][0], "name": "pixels"}]}, None,
                             400, "no such input: the model's one input is 'images'"),
    "too few values": ({"inputs": [{**_v2([1, 784])["inputs"][0], "shape": [2, 784]}]}, None,
                       400, "784 values for the shape"),
    "UINT8 over 255": ({"inputs": [{**_v2([1, 784], "UINT8")["inputs"][0], "data": [300] * 784}]},
                       None, 400, "0-255"),
    "an unknown output": (_v2([1, 784]) | {"outputs": [{"name": "secret"}]}, None, 400,
                          "no output 'secret'"),
    "a lying header length": (_v2([1, 784]), "99999999", 400, "Inference-Header-Content-Length"),
    "a lying binary size": ({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 10}}]}, "0", 400,
                            "binary_data_size"),
    "over the batch limit": (_v2([300, 784]), None, 413, "at most"),
    "a shape of 100,000 sizes (its product would hold the interpreter for seconds)": (
        {"inputs": [{"name": "images", "shape": [3] * 100_000, "datatype": "FP32", "data": [0]}]},
        None, 400, "shape must be 1 to 4 sizes"),
    "a datatype that is a list": (
        {"inputs": [{**_v2([1, 784])["inputs"][0], "datatype": ["FP32"]}]}, None, 400,
        "datatype"),
    "input parameters that are not an object": (
        {"inputs": [{**_v2([1, 784])["inputs"][0], "parameters": [1]}]}, None, 400,
        "parameters must be a JSON object"),
    "output parameters that are not an object": (
        _v2([1, 784]) | {"outputs": [{"name": "digit", "parameters": "x"}]}, None, 400,
        "parameters must be a JSON object"),
    "request parameters that are not an object": (
        _v2([1, 784]) | {"parameters": [1]}, None, 400, "parameters must be a JSON object"),
    "one output asked for 4,000 times": (
        _v2([1, 784]) | {"outputs": [{"name": "logits"}] * 4000}, None, 400, "once"),
    "a header length in superscript digits": (_v2([1, 784]), "²", 400,
                                              "Inference-Header-Content-Length"),
    "a shape whose product overflows 64 bits": (
        {"inputs": [{"name": "images", "shape": [2**62, 4], "datatype": "FP32", "data": []}]},
        None, 400, "shape must be 1 to 4 sizes"),
    "nested 70 deep (past NumPy's 64 dimensions)": (
        _v2([1, 784]) | {"inputs": [{**_v2([1, 784])["inputs"][0], "data": _nested(70)}]},
        None, 400, "of numbers"),
}  # fmt: skip


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(BAD_V2))
def test_a_bad_inference_request_gets_a_v2_error(served: dict, case: str) -> None:
    import json

    document, header_length, status, words = BAD_V2[case]
    body = json.dumps(document).encode()
    headers = {"Content-Type": "application/json"}
    if header_length == "²":
        headers = {"Content-Type": "application/json", "Inference-Header-Content-Length": "²"}
        answer = httpx.post(
            f"{served['url']}/v2/models/{served['name']}/infer",
            content=body,
            headers={k: v.encode() for k, v in headers.items()},
        )
        assert answer.status_code == status and words in answer.json()["error"], answer.text
        return
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = (
            str(len(body)) if header_length == "0" else header_length
        )
    url = f"{served['url']}/v2/models/{served['name']}/infer"
    answer = httpx.post(url, content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"], answer.text


@pytest.mark.bad_input
def test_other_models_and_large_bodies_are_refused(served: dict) -> None:
    url, name = served["url"], served["name"]
    other = httpx.post(f"{url}/v2/models/other/infer", json=_v2([1, 784]))
    assert other.status_code == 404 and f"serves '{name}'" in other.json()["error"]
    assert httpx.get(f"{url}/v2/models/other").status_code == 404
    # FastAPI's own refusals under /v2 are in V2's words too (tritonclient reads `error`)
    assert httpx.get(f"{url}/v2/nothing").json()["error"] == "Not Found"
    wrong_method = httpx.get(f"{url}/v2/models/{name}/infer")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert "detail" in httpx.get(f"{url}/nothing").json()  # elsewhere, FastAPI's own
    bomb = gzip.compress(b" " * (20 << 20))
    packed = httpx.post(
        f"{url}/invocations",
        content=bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert packed.status_code == 413 and "unpacks to over" in packed.json()["message"]
    brotli = httpx.post(
        f"{url}/invocations",
        content=b"{}",
        headers={"Content-Type": "application/json", "Content-Encoding": "br"},
    )
    assert brotli.status_code == 415 and "gzip, deflate or none" in brotli.json()["message"]

    huge = httpx.post(
        f"{url}/invocations", content=b"[" * (9 << 20), headers={"Content-Type": "application/json"}
    )
    assert huge.status_code == 413 and "at most" in huge.json()["message"]
    limit = load_settings(served["settings"].config_dir).serve.max_body_bytes
    assert str(limit) in huge.json()["message"]


def test_an_upload_abandoned_midway_leaves_no_traceback(served: dict) -> None:
    """A client that declares a body and goes away: refused quietly, not a traceback in
    serve.log per connection (which a client could use to fill the disk)."""
    import socket
    import time

    settings, name = served["settings"], served["name"]
    log = settings.home / "logs" / "serve.log"
    before = log.stat().st_size
    host, port = settings.serve_url.removeprefix("http://").rsplit(":", 1)
    for path in ("/invocations", f"/v2/models/{name}/infer"):
        for _ in range(5):
            with socket.create_connection((host, int(port)), timeout=5) as client:
                client.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    "Content-Length: 100\r\n\r\n{".encode()
                )
    time.sleep(1)
    assert httpx.get(f"{settings.serve_url}/health").status_code == 200
    with log.open("rb") as handle:
        handle.seek(before)
        written = handle.read().decode(errors="replace")
    assert "Traceback" not in written and "ClientDisconnect" not in written, written[-3000:]
