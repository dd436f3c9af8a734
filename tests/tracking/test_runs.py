"""Training tracked in the real MLflow server: what a run logs, the registry's gate, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mnistops import stack
from mnistops.settings import HyperParameters, Settings, load_settings
from mnistops.tracking.registry import CHALLENGER_TAG, versions
from tests.helpers import (
    cli_paused_at,
    client_config,
    finish,
    kill_service,
    run_cli,
    write_flow_yml,
)

pytestmark = pytest.mark.integration

HYP_KEYS = set(HyperParameters.model_fields)


@pytest.fixture(scope="module")
def trainer(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A machine with its own bucket, experiment and model name, and v1.0 (--fast) published."""
    root = tmp_path_factory.mktemp("trainer")
    config_dir = client_config(stack_settings, root, bucket=f"dvc-{uuid.uuid4().hex[:8]}")
    suffix = uuid.uuid4().hex[:6]
    write_flow_yml(
        config_dir,
        {
            "experiment_name": f"MNIST-{suffix}",
            "developer_name": "tester",
            "model_registry": {"name": f"mnist-classifier-{suffix}"},
        },
    )
    for args in (("data", "ingest", "--fast"), ("data", "version", "v1.0", "-m", "first")):
        done = run_cli(*args, config_dir=config_dir)
        assert done.returncode == 0, done.stdout + done.stderr
    yield config_dir


def client_of(config_dir: Path) -> tuple[Settings, MlflowClient]:
    settings = load_settings(config_dir)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    return settings, MlflowClient(settings.mlflow_uri)


def runs_of(config_dir: Path) -> list:
    settings, client = client_of(config_dir)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


def train(config_dir: Path, *args: str):
    """One short epoch on the --fast data (540 images): batch 16, so that it has enough
    steps to learn (digitnet2 at batch 32: 17 steps, about 20 % test accuracy)."""
    return run_cli("train", "--epochs", "1", "--batch-size", "16", *args, config_dir=config_dir)


@pytest.fixture(scope="module")
def first_run(trainer: Path):
    done = train(trainer)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, runs_of(trainer)[0]


def test_a_run_logs_tags_params_metrics_and_input(trainer: Path, first_run) -> None:
    done, run = first_run
    settings, client = client_of(trainer)
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert tags["phase"] == "experimental" and tags["device"] == "cpu"
    assert tags["data_version"] == "v1.0" and tags["user"] == "tester"
    record = json.loads((settings.home / "cache" / "versions" / "v1.0.json").read_text())
    assert tags["data_content_hash"] == record["content_hash"]
    assert tags["data_registry_commit"] == record["commit"]
    assert tags["mnistops_version"]
    assert set(run.data.params) >= HYP_KEYS
    assert run.data.params["model"] == "digitnet2" and run.data.params["n_epochs"] == "1"
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1]
    assert 0.3 < run.data.metrics["test_accuracy"] <= 1
    assert run.data.metrics["test_loss"] > 0
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "MNIST@v1.0"
    assert dataset_input.dataset.digest == record["content_hash"][:32]
    assert "versions/v1.0.json" in dataset_input.dataset.source
    assert f"{run.data.metrics['test_accuracy']:.2%}" in done.stdout
    assert run.info.run_id in done.stdout


def test_a_run_keeps_plots_and_a_loadable_model(trainer: Path, first_run) -> None:
    _done, run = first_run
    settings, client = client_of(trainer)
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {
        "plots/confusion_matrix.png",
        "plots/training_curves.png",
        "plots/worst_misclassified.png",
        "plots/evaluation.png",
    }
    metrics = run.data.metrics
    digits = [metrics[f"test_accuracy_digit_{d}"] for d in range(10)]
    assert all(0 <= a <= 1 for a in digits) and 0 <= metrics["test_ece"] < 1
    for kind in ("rotated", "shifted", "thicker", "thinner", "all"):
        assert 0 <= metrics[f"robust_accuracy_{kind}"] <= 1, kind
    stored = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test_predictions")]
    assert len(stored) == 1 and stored[0].endswith(".npz")
    version = client.get_model_version_by_alias(settings.model_registry.name, "champion")
    assert version.run_id == run.info.run_id
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_registry.name}@champion")
    assert model.metadata.signature is not None
    from mnistops.train.data import load_version

    arrays = load_version(settings, "v1.0")
    logits = model.predict(arrays.test_x.astype("float32")[:, None] / 255.0)
    accuracy = float((logits.argmax(1) == arrays.test_y).mean())
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
    # the ONNX graph was checked on the whole test set (NumPy is checked only where it
    # does not pass), and the graph is what answers: the same digits as MLflow's own
    # loader of the exported archive
    checked = model.metadata.metadata["onnx_runtime"]
    assert checked.startswith(f"{len(arrays.test_y)}/{len(arrays.test_y)}"), checked
    assert "numpy_runtime" not in model.metadata.metadata  # one check: the graph passed
    from mnistops.predict import load_version as load_for_answers
    from mnistops.predict import logits as answers_of
    from mnistops.train.onnx_graph import OnnxNet

    answering = load_for_answers(settings, version)
    assert isinstance(answering, OnnxNet)
    ours = answers_of(answering, arrays.test_x.astype("float32")[:, None] / 255.0)
    assert (ours.argmax(1) == logits.argmax(1)).all()


def test_predict_prints_the_champions_digit(trainer: Path, first_run) -> None:
    settings, _client = client_of(trainer)
    images = sorted((settings.mnist_dir / "test" / "7").glob("*.png"))[:2]
    done = run_cli("predict", *map(str, images), "--json", config_dir=trainer)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in images]
    assert all(set(line) == {"file", "digit", "confidence", "model_version"} for line in lines)
    assert all(0 <= line["digit"] <= 9 and 0 < line["confidence"] <= 1 for line in lines)
    bad = run_cli("predict", str(images[0]), str(trainer / "flow.yml"), config_dir=trainer)
    assert bad.returncode == 2 and "flow.yml: not an image" in bad.stderr  # bad input


def test_the_alias_read_over_rest_is_what_mlflows_client_reads(
    trainer: Path, first_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tracking.champion` (MLflow's REST API, for predict, `models` and monitoring) names
    the same versions, sources, runs, tags and aliases as MLflow's own client; a model
    without the alias, or a server that is not MLflow, is said plainly."""
    import http.server
    import threading

    from mnistops.tracking import champion
    from mnistops.tracking.champion import champion_of, registered_versions
    from mnistops.tracking.server import TrackingError

    settings, client = client_of(trainer)
    found = champion_of(settings)
    expected = client.get_model_version_by_alias(settings.model_registry.name, "champion")
    assert found is not None
    assert (found.name, found.version, found.source, found.run_id, found.tags) == (
        expected.name,
        str(expected.version),
        expected.source,
        expected.run_id,
        expected.tags,
    )
    unknown = settings.model_registry.model_copy(update={"name": "no-such-model"})
    assert champion_of(settings.model_copy(update={"model_registry": unknown})) is None
    assert registered_versions(settings.model_copy(update={"model_registry": unknown})) == (
        [],
        {},
    )

    # every version (page by page) and alias, as MLflow's client lists them
    name = settings.model_registry.name
    theirs = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version))
    client.set_registered_model_alias(name, "second-look", theirs[-1].version)
    try:
        for page in (1, 1000):
            monkeypatch.setattr(champion, "SEARCH_PAGE", page)
            ours, alias_of = registered_versions(settings)
            assert [
                (v.name, v.version, v.source, v.run_id, v.tags, v.created_ms) for v in ours
            ] == [
                (v.name, str(v.version), v.source, v.run_id, v.tags, v.creation_timestamp)
                for v in theirs
            ]
            model = client.get_registered_model(name)
            assert alias_of == {
                str(version): sorted(a for a, v in model.aliases.items() if v == version)
                for version in set(model.aliases.values())
            }
            assert "second-look" in alias_of[str(theirs[-1].version)]
    finally:
        client.delete_registered_model_alias(name, "second-look")

    class NotMlflow(http.server.BaseHTTPRequestHandler):
        body = b'{"model_version": {"tags": 3}}'

        def do_GET(self) -> None:
            body = self.body
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        elsewhere = settings.mlflow.model_copy(
            update={"tracking_uri": f"http://127.0.0.1:{server.server_port}"}
        )
        with pytest.raises(TrackingError, match="is it an MLflow server"):
            champion_of(settings.model_copy(update={"mlflow": elsewhere}))
        with pytest.raises(TrackingError, match="without its aliases or versions"):
            registered_versions(settings.model_copy(update={"mlflow": elsewhere}))
        # one that pages in a circle is not followed forever
        NotMlflow.body = b'{"model_versions": [], "next_page_token": "again"}'
        with pytest.raises(TrackingError, match="the same page of"):
            registered_versions(settings.model_copy(update={"mlflow": elsewhere}))
    finally:
        server.shutdown()


@pytest.mark.slow("three trainings: a better, a worse and a repeated one")
def test_the_champion_gate_both_ways_and_determinism(trainer: Path, first_run) -> None:
    settings, client = client_of(trainer)
    name = settings.model_registry.name
    _done, first = first_run
    champion = client.get_model_version_by_alias(name, "champion")
    first_accuracy = first.data.metrics["test_accuracy"]

    same = train(trainer)  # same seed, data and CPU: the same metrics, so not better
    assert same.returncode == 0, same.stderr
    assert "champion stays" in same.stdout
    repeat = runs_of(trainer)[0]
    for key in ("test_accuracy", "test_loss", "val_loss", "train_loss"):
        assert repeat.data.metrics[key] == first.data.metrics[key], key
    version = client.get_model_version(name, repeat.data.tags["model_version"])
    assert "not better beyond noise" in version.tags[CHALLENGER_TAG]
    assert version.tags["gate_p_value"] == "1" and version.tags["gate_champion"] == champion.version
    assert client.get_model_version_by_alias(name, "champion").version == champion.version

    # 200 test images: one image of a digit is 3-7 points of it, so a clearly better
    # model may still break one; the per-digit guard has its own tests (test_gate.py).
    better = run_cli(
        "train",
        "--epochs",
        "5",
        "--batch-size",
        "16",
        config_dir=trainer,
        env={**os.environ, "MNISTOPS_MODEL_REGISTRY__MAX_CLASS_DROP": "10"},
    )
    assert better.returncode == 0, better.stderr
    best = runs_of(trainer)[0]
    assert best.data.metrics["test_accuracy"] > first_accuracy
    moved = client.get_model_version_by_alias(name, "champion")
    assert moved.run_id == best.info.run_id and "is now champion" in better.stdout, better.stdout

    listing = run_cli("models", config_dir=trainer)
    assert listing.returncode == 0
    rows = {
        cells[0]: cells
        for line in listing.stdout.splitlines()
        if len(cells := [c.strip() for c in line.split("│")][1:-1]) == 7
    }
    assert rows[moved.version][-1] == "champion", listing.stdout
    assert rows[champion.version][-1] == "" and rows[champion.version][4] == "v1.0"
    assert rows[moved.version][5].startswith("moved p="), listing.stdout
    assert f"v{moved.version} against v{champion.version}: p = " in listing.stdout
    assert "gate against v" in better.stdout and "exact one-sided McNemar" in better.stdout


@pytest.mark.slow(
    "the champion is scored on the test images, then a new model is trained and judged"
)
def test_a_champion_without_stored_predictions_is_scored_once(
    trainer: Path, first_run, tmp_path: Path
) -> None:
    """A champion from before predictions were stored: the gate scores it once on the test
    images, stores the result on its run, and judges the new model against it."""
    import torch

    from mnistops.tracking import model_files
    from mnistops.tracking.predictions import ARTIFACT_DIR
    from mnistops.train import models

    settings, client = client_of(trainer)
    name = f"old-{uuid.uuid4().hex[:6]}"
    experiment = client.get_experiment_by_name(settings.experiment_name).experiment_id
    torch.manual_seed(0)
    with mlflow.start_run(experiment_id=experiment) as old_run:
        example = np.zeros((2, 1, 28, 28), np.float32)
        random_model = models.digitnet().eval()
        logged = mlflow.pytorch.log_model(
            random_model,
            name="model",
            input_example=example,
            extra_files=[str(model_files.save_weights(random_model, tmp_path))],
            metadata=model_files.metadata("digitnet"),
        )
    old = mlflow.register_model(logged.model_uri, name)
    # A random model is right on nearly one digit only: any trained one loses on it.
    env = {"MNISTOPS_MODEL_REGISTRY__NAME": name, "MNISTOPS_MODEL_REGISTRY__MAX_CLASS_DROP": "100"}
    # registered by hand, in mnistops' format but without its signed record: vouched for
    unsigned = run_cli("models", "promote", old.version, config_dir=trainer, env=env)
    assert unsigned.returncode == 2 and "--trust-unsigned" in unsigned.stderr, unsigned.stderr
    promoted = run_cli(
        "models", "promote", old.version, "--trust-unsigned", config_dir=trainer, env=env
    )
    assert promoted.returncode == 0, promoted.stderr
    assert "model_trusted_by" in client.get_model_version(name, old.version).tags
    assert not client.list_artifacts(old_run.info.run_id, ARTIFACT_DIR)

    done = run_cli("train", "--epochs", "1", "--batch-size", "32", config_dir=trainer, env=env)
    assert done.returncode == 0, done.stderr
    assert "is now champion" in done.stdout, done.stdout
    assert f"gate against v{old.version}" in done.stdout
    (stored,) = client.list_artifacts(old_run.info.run_id, ARTIFACT_DIR)
    from mnistops.tracking.predictions import LabelledImages, read_stored
    from mnistops.train.data import load_version

    arrays = load_version(settings, "v1.0")
    test = LabelledImages(arrays.test_x, arrays.test_y)
    assert stored.path.endswith(f"{test.digest}.npz")
    predicted, labels = read_stored(client, old_run.info.run_id, test.digest)
    model = mlflow.pytorch.load_model(logged.model_uri)
    with torch.no_grad():
        expected = model(torch.from_numpy(arrays.test_x[:, None] / 255.0).float()).argmax(1)
    assert (labels == arrays.test_y).all() and (predicted == expected.numpy()).all()


@pytest.mark.security
def test_an_unsigned_champion_is_signed_in_place_by_trust_unsigned(
    trainer: Path, first_run, tmp_path: Path
) -> None:
    """A champion set by hand in MLflow, on a version without mnistops' record: `predict`
    and `serve` refuse it and say `promote V --trust-unsigned`, which signs it in place."""
    from mnistops.tracking import model_files
    from mnistops.train import models

    settings, client = client_of(trainer)
    name = f"byhand-{uuid.uuid4().hex[:6]}"
    experiment = client.get_experiment_by_name(settings.experiment_name).experiment_id
    with mlflow.start_run(experiment_id=experiment):
        model = models.digitnet().eval()
        logged = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=np.zeros((2, 1, 28, 28), np.float32),
            extra_files=[str(model_files.save_weights(model, tmp_path))],
            metadata=model_files.metadata("digitnet"),
        )
    version = mlflow.register_model(logged.model_uri, name).version
    client.set_registered_model_alias(name, "champion", version)
    env = {**os.environ, "MNISTOPS_MODEL_REGISTRY__NAME": name}
    plain = run_cli("models", "promote", version, config_dir=trainer, env=env)
    assert plain.returncode == 2 and "champion already" in plain.stderr, plain.stderr
    assert "--trust-unsigned" in plain.stderr
    signed = run_cli("models", "promote", version, "--trust-unsigned", config_dir=trainer, env=env)
    assert signed.returncode == 0, signed.stderr
    assert "champion already" in signed.stdout and "signed" in signed.stdout, signed.stdout
    tags = client.get_model_version(name, version).tags
    assert "model_trusted_by" in tags and "signed" in tags["champion_reason"], tags
    assert tags["promoted_by"]
    again = run_cli("models", "promote", version, "--trust-unsigned", config_dir=trainer, env=env)
    assert again.returncode == 2 and "champion already" in again.stderr, again.stderr
    assert "--trust-unsigned" not in again.stderr


@pytest.mark.security
def test_models_shows_tags_escaped(trainer: Path, first_run) -> None:
    """Anyone who reaches MLflow can write tags: `models` never lets them drive the terminal."""
    settings, client = client_of(trainer)
    name = settings.model_registry.name
    version = versions(client, name)[-1].version
    client.set_model_version_tag(name, version, "data_version", "\x1b[31mv9[/bold]")
    try:
        listing = run_cli("models", config_dir=trainer)
    finally:
        client.set_model_version_tag(name, version, "data_version", "v1.0")
    assert listing.returncode == 0, listing.stderr
    assert "\x1b" not in listing.stdout and "\\x1b" in listing.stdout


@pytest.mark.faults
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_training_ends_killed(trainer: Path, first_run, signum: int) -> None:
    """Ctrl-C or SIGTERM in the middle of a training: the MLflow run is KILLED (never
    left RUNNING), nothing is registered, the command says so."""
    settings, client = client_of(trainer)
    before = len(versions(client, settings.model_registry.name))
    args = ("train", "--epochs", "3", "--batch-size", "32")
    with cli_paused_at(*args, config_dir=trainer, marker="MLflow run:") as proc:
        os.kill(proc.pid, signum)  # delivered when the command goes on
    code, output = finish(proc, timeout=180)
    assert code == 130, output
    assert "interrupted" in output and "KILLED" in output and "Traceback" not in output
    run = runs_of(trainer)[0]
    assert run.info.status == "KILLED" and run.data.tags["error"].startswith("interrupted")
    assert len(versions(client, settings.model_registry.name)) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--lr", "0"), "--lr: Input should be greater than 0"),
        (("--lr", "-0.1"), "--lr: Input should be greater than 0"),
        (("--batch-size", "0"), "--batch-size: Input should be greater than 0"),
        (("--epochs", "-1"), "--epochs: Input should be greater than 0"),
        (("--val-size", "1"), "--val-size: Input should be less than 1"),
        (("--model", "resnet"), "unknown model 'resnet' (known: digitnet2, digitnet, seednet)"),
        (("--data-version", "v9"), "no data version 'v9'"),
        (("--device", "tpu"), "--device: Input should be 'auto', 'cpu' or 'cuda'"),
    ],
)
def test_bad_input_is_refused_before_any_run(trainer: Path, first_run, args, message) -> None:
    """The command runs in this process (Typer's runner): each case is a refusal at the
    door, and a new Python process per case would cost seconds of imports."""
    from typer.testing import CliRunner

    from mnistops.cli import app

    before = len(runs_of(trainer))
    done = CliRunner().invoke(app, ["--config-dir", str(trainer), "train", *args])
    assert done.exit_code == 2, done.output
    stderr = " ".join(done.stderr.split())
    assert message in stderr, stderr
    if "v9" in args:
        assert "published: v1.0" in stderr
    assert len(runs_of(trainer)) == before


def test_a_diverging_run_fails_and_registers_nothing(trainer: Path, first_run) -> None:
    settings, client = client_of(trainer)
    name = settings.model_registry.name
    champion = client.get_model_version_by_alias(name, "champion").version
    versions = len(client.search_model_versions(f"name = '{name}'"))
    done = train(trainer, "--model", "seednet", "--lr", "1e30")
    assert done.returncode == 1
    assert "non-finite loss at epoch 1" in done.stderr
    run = runs_of(trainer)[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "non-finite loss at epoch 1"
    assert len(client.search_model_versions(f"name = '{name}'")) == versions
    assert client.get_model_version_by_alias(name, "champion").version == champion


def test_a_plain_folder_is_untracked_data(trainer: Path, first_run) -> None:
    settings, _client = client_of(trainer)
    folder = settings.home.parent / "plain"
    pulled = run_cli("data", "pull", "v1.0", "--to", str(folder), config_dir=trainer)
    assert pulled.returncode == 0, pulled.stderr
    done = train(trainer, "--data-dir", str(folder), "--fast")
    assert done.returncode == 0, done.stderr
    run = runs_of(trainer)[0]
    assert run.data.tags["data_version"] == "untracked"
    assert run.data.tags["data_folder"] == str(folder)
    assert "untracked data" in done.stdout


@pytest.mark.integrity
def test_a_damaged_array_cache_is_named_and_rebuilt(trainer: Path, first_run) -> None:
    from mnistops.train.data import load_version

    settings, _client = client_of(trainer)
    clean = load_version(settings, "v1.0")
    cached = settings.home / "cache" / "arrays" / f"{clean.source.content_hash}.npz"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    said: list[str] = []
    again = load_version(settings, "v1.0", said.append)
    assert any(str(cached) in line and "rebuilding" in line for line in said)
    assert (again.train_x == clean.train_x).all() and (again.test_y == clean.test_y).all()
    assert load_version(settings, "v1.0", said.append) is not None and len(said) == 1


@pytest.mark.slow(
    "MLflow is stopped mid-training, the client's retries run out, then it is started again"
)
@pytest.mark.faults
def test_mlflow_down_during_training_fails_clearly_and_champion_stays(
    trainer: Path, first_run, stack_settings: Settings
) -> None:
    settings, client = client_of(trainer)
    name = settings.model_registry.name
    champion = client.get_model_version_by_alias(name, "champion").version
    versions = len(client.search_model_versions(f"name = '{name}'"))
    command = [sys.executable, "-m", "mnistops", "--config-dir", str(trainer), "train"]
    training = subprocess.Popen(
        [*command, "--epochs", "300", "--batch-size", "32"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert training.stdout is not None
        for line in training.stdout:
            if line.startswith("epoch 1/300"):
                break
        kill_service(stack_settings, "mlflow")
        began = time.monotonic()
        _out, err = training.communicate(timeout=120)
        took = time.monotonic() - began
    finally:
        training.kill()
        stack.up(stack_settings)
    assert training.returncode == 1
    assert took < 30, f"took {took:.0f} s to give up"
    message = " ".join(err.split())
    assert "Traceback" not in err
    assert f"MLflow server at {settings.mlflow_uri}" in message, message
    assert "nothing was registered" in message.lower()
    assert client.get_model_version_by_alias(name, "champion").version == champion
    assert len(client.search_model_versions(f"name = '{name}'")) == versions
    assert train(trainer).returncode == 0, "the next run after the restart"


@pytest.mark.integrity
def test_a_flipped_byte_in_the_object_cache_is_named_and_fetched_again(
    trainer: Path, first_run
) -> None:
    from mnistops.data import reader
    from mnistops.train.data import load_version

    settings, _client = client_of(trainer)
    clean = load_version(settings, "v1.0")
    (settings.home / "cache" / "arrays" / f"{clean.source.content_hash}.npz").unlink()
    record = reader.find_record(settings, "v1.0")
    pack = next(md5 for md5 in record.files.values() if md5 != record.manifest_md5)
    cached = reader.cache_of(settings).path(pack)
    data = bytearray(cached.read_bytes())
    data[len(data) // 3] ^= 0x01
    cached.write_bytes(bytes(data))
    said: list[str] = []
    again = load_version(settings, "v1.0", said.append)
    assert any(pack in line and "corrupt" in line for line in said), said
    assert (again.train_x == clean.train_x).all() and (again.test_x == clean.test_x).all()
    assert reader.cache_of(settings).path(pack).read_bytes() != bytes(data)


@pytest.mark.integrity
def test_an_unusable_champion_is_named_then_replaced(
    trainer: Path, first_run, stack_settings
) -> None:
    """The champion's model files vanish from the artifact store: `predict` names the
    version and why; the next registered model that loads takes over, saying why."""
    from mnistops.clients import s3_client
    from mnistops.predict import model_cache

    settings, client = client_of(trainer)
    name = settings.model_registry.name
    images = sorted((settings.mnist_dir / "test" / "3").glob("*.png"))[:1]
    first = run_cli("predict", str(images[0]), config_dir=trainer)
    assert first.returncode == 0, first.stderr
    current = client.get_model_version_by_alias(name, "champion")
    assert (model_cache(settings, current.version) / "MLmodel").is_file(), "kept by version"

    uri = client.get_model_version_download_uri(name, current.version)
    key = "artifacts/" + uri.removeprefix("mlflow-artifacts:/").strip("/") + "/MLmodel"
    s3_client(stack_settings).delete_object(Bucket=stack_settings.s3.buckets.mlflow, Key=key)
    shutil.rmtree(model_cache(settings, current.version))
    broken = run_cli("predict", str(images[0]), config_dir=trainer)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    text = " ".join(broken.stderr.split())
    assert f"the champion {name} v{current.version} cannot be loaded" in text, text
    assert "MLmodel" in text and "replaces it" in text

    replaced = train(trainer, "--epochs", "1", "--seed", "7")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version != current.version
    assert f"the champion v{current.version} cannot be loaded" in champion.tags["champion_reason"]
    assert run_cli("predict", str(images[0]), config_dir=trainer).returncode == 0


@pytest.mark.slow("five commands refuse the champion, then a retraining replaces it")
@pytest.mark.security
def test_a_pickled_champion_never_runs_and_the_next_model_replaces_it(
    trainer: Path, first_run, stack_settings: Settings, tmp_path: Path
) -> None:
    """With nothing but the MLflow client, a pickled module whose unpickling runs a
    command is registered and made champion. `predict`, `models`, `models promote` (with
    and without --trust-unsigned) and a retraining each name the version and why it is
    refused; the command never runs; the retraining's model takes `champion`."""
    from tests.attacker import register_pickled_champion

    settings, client = client_of(trainer)
    name = settings.model_registry.name
    marker = tmp_path / "pwned"
    bad = register_pickled_champion(settings.mlflow_uri, name, marker)
    image = str(sorted((settings.mnist_dir / "test" / "3").glob("*.png"))[0])

    predicted = run_cli("predict", image, config_dir=trainer)
    said = " ".join(predicted.stderr.split())
    assert predicted.returncode == 1 and "Traceback" not in predicted.stderr, said
    assert f"the champion {name} v{bad} cannot be loaded: not registered by mnistops" in said
    assert f"mnistops models promote {bad} --trust-unsigned" in said, "the version, named"
    listed = run_cli("models", config_dir=trainer)
    assert f"v{bad} refused, never loaded: not registered by mnistops" in " ".join(
        listed.stdout.split()
    ), listed.stdout
    assert client.get_model_version_by_alias(name, "champion").version == bad
    for extra in ((), ("--trust-unsigned",)):
        versions_ = [v.version for v in client.search_model_versions(f"name = '{name}'")]
        other = max((v for v in versions_ if v != bad), key=int)
        client.set_registered_model_alias(name, "champion", other)
        promoted = run_cli("models", "promote", bad, *extra, config_dir=trainer)
        words = " ".join(promoted.stderr.split())
        assert promoted.returncode == 2 and f"{name} v{bad} cannot be served" in words, words
        assert ("not a file of mnistops' model format" if extra else "not registered") in words
        assert client.get_model_version_by_alias(name, "champion").version == other
    client.set_registered_model_alias(name, "champion", bad)

    retrained = train(trainer, "--seed", "11")
    assert retrained.returncode == 0, retrained.stdout + retrained.stderr
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version != bad
    reason = champion.tags["champion_reason"]
    assert f"the champion v{bad} cannot be loaded (not registered by mnistops" in reason, reason
    assert run_cli("predict", image, config_dir=trainer).returncode == 0
    assert not marker.exists(), "the attacker's payload ran"


@pytest.mark.security
def test_model_files_changed_in_the_store_or_disguised_are_refused(
    trainer: Path, first_run, stack_settings: Settings, tmp_path: Path
) -> None:
    """Someone with the store's keys rewrites a registered champion's pt2 archive; someone
    with MLflow access registers a copy of a good model whose MLmodel points its flavor at
    another file, with the good version's signed tags copied. Both are refused by name
    (the copy without being downloaded), and `mnistops models` marks the copy refused;
    the gate says of the rewritten champion what predict says, and replaces it."""
    from mnistops.clients import s3_client
    from mnistops.predict import model_cache
    from mnistops.tracking.contract import FILES_TAG, SIGNATURE_TAG

    settings, client = client_of(trainer)
    name = settings.model_registry.name
    image = str(sorted((settings.mnist_dir / "test" / "5").glob("*.png"))[0])
    current = client.get_model_version_by_alias(name, "champion")

    # an MLmodel that points at another file, its signed record copied from `current`
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{current.version}"))
    mlmodel = yaml.safe_load((files / "MLmodel").read_text())
    mlmodel["flavors"]["pytorch"]["model_data"] = "elsewhere"
    (files / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    run = client.create_run(client.get_experiment_by_name(settings.experiment_name).experiment_id)
    client.log_artifacts(run.info.run_id, str(files), "model")
    client.set_terminated(run.info.run_id)
    copied = {k: current.tags[k] for k in (FILES_TAG, SIGNATURE_TAG)}
    disguised = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=copied
    )
    client.set_registered_model_alias(name, "champion", disguised.version)
    refused = run_cli("predict", image, config_dir=trainer)
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1, said
    assert "not signed with this stack's model key for its files" in said, said
    listed = " ".join(run_cli("models", config_dir=trainer).stdout.split())
    assert f"v{disguised.version} refused, never loaded: not registered by mnistops" in listed
    client.set_registered_model_alias(name, "champion", current.version)

    uri = client.get_model_version_download_uri(name, current.version)
    key = "artifacts/" + uri.removeprefix("mlflow-artifacts:/").strip("/") + "/data/model.pt2"
    s3 = s3_client(stack_settings)
    bucket = stack_settings.s3.buckets.mlflow
    original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=original[:-10] + b"0123456789")
    shutil.rmtree(model_cache(settings, current.version), ignore_errors=True)
    try:
        changed = run_cli("predict", image, config_dir=trainer)
        said = " ".join(changed.stderr.split())
        assert changed.returncode == 1, said
        assert "data/model.pt2 differs from the file registered (SHA-256 mismatch)" in said
        # the gate says the same of it, and the next model that loads replaces it
        retrained = train(trainer, "--seed", "12")
        assert retrained.returncode == 0, retrained.stdout + retrained.stderr
        champion = client.get_model_version_by_alias(name, "champion")
        reason = champion.tags["champion_reason"]
        assert champion.version != current.version, reason
        assert f"the champion v{current.version} cannot be loaded" in reason, reason
        assert "data/model.pt2 differs from the file registered" in reason, reason
    finally:
        s3.put_object(Bucket=bucket, Key=key, Body=original)
    assert run_cli("predict", image, config_dir=trainer).returncode == 0


@pytest.mark.security
def test_files_changed_on_the_server_while_a_model_is_logged_are_never_signed(
    trainer: Path, first_run, tmp_path: Path
) -> None:
    """Someone with MLflow access overwrites a logged model's weights the moment they are
    uploaded (a race with the registration): the record mnistops signs is made from its
    own files, so the change is refused by name and nothing is registered or signed."""
    from types import SimpleNamespace

    from mnistops.clients import model_signing_key
    from mnistops.settings import HyperParameters
    from mnistops.tracking import model_files, registration
    from mnistops.tracking.runs import TrackedRun
    from mnistops.train import models

    settings, client = client_of(trainer)
    evil = tmp_path / "evil" / "extra_files"
    evil.mkdir(parents=True)
    model_files.save_weights(models.digitnet(), evil)  # other weights, same names

    class Racing(MlflowClient):
        def log_model_artifacts(self, model_id: str, local_dir: str, artifact_path=None):
            super().log_model_artifacts(model_id, local_dir, artifact_path)
            super().log_model_artifacts(model_id, str(evil.parent))  # the attacker's copy

    experiment = client.get_experiment_by_name(settings.experiment_name).experiment_id
    run_id = client.create_run(experiment).info.run_id
    racing = TrackedRun(Racing(settings.mlflow_uri), run_id, "", experiment, "x", "v1.0")
    trained = SimpleNamespace(
        model=models.digitnet().eval(), test=SimpleNamespace(predicted=np.zeros(2, np.int64))
    )
    arrays = SimpleNamespace(test_x=np.zeros((2, 28, 28), np.uint8))
    key = model_signing_key(settings)
    assert key is not None
    with pytest.raises(model_files.ModelRefused) as refused:
        registration._log_model(racing, HyperParameters(model="digitnet"), trained, arrays, key)  # type: ignore[arg-type]
    said = str(refused.value)
    assert "changed on the MLflow server while they were being logged" in said, said
    assert f"{model_files.WEIGHTS_PATH} differs from the file registered" in said, said
    client.set_terminated(run_id, "FAILED")
