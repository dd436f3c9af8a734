"""The champion gate under contention: many registrations decide at once, from several
processes (as trainings on several machines would); the champion at the end is the one
the rule picks, every time, and every version records its decision."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from mnistops.clients import model_signing_key
from mnistops.settings import Settings, load_settings
from mnistops.stack.locks import champion_lock_name, held
from mnistops.tracking import contract as c
from mnistops.tracking.contract import ACCURACY_TAG
from mnistops.tracking.model_record import record_tags
from mnistops.tracking.predictions import LabelledImages, champion_predictions, log_predictions
from mnistops.tracking.registry import (
    CHALLENGER_TAG,
    CHAMPION_REASON_TAG,
    Candidate,
    GateDecision,
    GateRules,
    register,
)
from tests.helpers import client_config, run_cli, write_flow_yml
from tests.netns import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.integrity]

GATE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import numpy as np
    from mlflow import MlflowClient
    from mnistops.settings import load_settings
    from mnistops.clients import model_signing_key
    from mnistops.stack.locks import champion_lock_name, held
    from mnistops.tracking import predictions as p
    from mnistops.tracking.registry import Candidate, GateRules, gate

    config_dir, go, test_file, *judged = sys.argv[1:]
    settings = load_settings(Path(config_dir))
    client = MlflowClient(settings.mlflow_uri)
    with np.load(test_file) as saved:
        test = p.LabelledImages(saved["images"], saved["labels"])

    def never(version):
        raise AssertionError("a stored champion was scored again")

    candidates = []
    for name_and_number in judged:  # one version in each registry
        name, number = name_and_number.split("=")
        version = client.get_model_version(name, number)
        mine = p.stored_predictions(client, version.run_id, test)
        candidate = Candidate(
            test.labels, mine, p.champion_predictions(client, test, never),
            model_signing_key(settings),
        )
        candidates.append((name, version, candidate))
    Path(go).with_name(f"ready-{os.getpid()}").touch()
    while not Path(go).exists():
        time.sleep(0.01)
    for name, version, candidate in candidates:
        lock = lambda: held(settings, champion_lock_name(name))
        decision = gate(client, name, version, candidate, GateRules(), lock)
        print(name, version.version, decision.moved, decision.reason)
    """
)

IMAGES = 1000


def stand_in_test_set(tmp_path: Path) -> tuple[LabelledImages, Path]:
    """1,000 labelled stand-in test images (100 of each digit), saved for subprocesses."""
    rng = np.random.default_rng(7)
    test = LabelledImages(
        rng.integers(0, 256, (IMAGES, 28, 28), dtype=np.uint8), np.arange(IMAGES) % 10
    )
    path = tmp_path / "test.npz"
    np.savez(path, images=test.images, labels=test.labels)
    return test, path


def wrong_on(test: LabelledImages, images: np.ndarray) -> np.ndarray:
    """Predictions right everywhere except on `images`."""
    predicted = test.labels.copy()
    predicted[images] = (test.labels[images] + 1) % 10
    return predicted


MLMODEL = "flavors: {}\n"
KEY = b"a stand-in key for versions no gate judges"


def stand_in_version(
    client: MlflowClient, name: str, test: LabelledImages, predicted: np.ndarray, key: bytes
) -> ModelVersion:
    """A version whose run holds an MLmodel file (what the gate checks a model has), a
    file record signed with the stack's model key, and test predictions: a model's
    record without the cost of training one."""
    experiment = client.get_experiment_by_name(f"gate-{name}")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(f"gate-{name}")
    )
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_text(run_id, MLMODEL, "model/MLmodel")
    log_predictions(client, run_id, test, predicted)
    client.set_terminated(run_id)
    accuracy = float((predicted == test.labels).mean())
    source = f"{run.info.artifact_uri}/model"
    record = record_tags(key, {"MLmodel": hashlib.sha256(MLMODEL.encode()).hexdigest()}, source)
    return client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={ACCURACY_TAG: str(accuracy), "run_id": run_id, **record},
    )


ORDERS = {
    "best-in-the-middle": [0.90, 0.95, 0.91, 0.99, 0.93, 0.97, 0.92, 0.94],
    "best-first": [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92],
}


def wait_all_ready(procs: list[subprocess.Popen[str]], folder: Path) -> None:
    """Until every judge has said it is ready (a file `ready-PID`); one that ended first
    fails the test with what it printed."""

    def all_ready() -> bool:
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, ended[0].communicate()[1][-2000:]
        return len(list(folder.glob("ready-*"))) == len(procs)

    wait_for(all_ready, 300, "every judge ready", every=0.1)


@pytest.mark.slow("eight processes import MLflow and judge at once on two cores")
def test_concurrent_gates_crown_the_best(stack_settings: Settings, tmp_path: Path) -> None:
    """Eight processes judge at once, one version each in two registries whose best
    version comes in the middle or first. Each better model fixes the errors of every
    worse one (at least 10 images, none broken), so the gate must crown the best
    whatever order the processes run in."""
    config_dir = client_config(stack_settings, tmp_path)
    client = MlflowClient(stack_settings.mlflow_uri)
    key = model_signing_key(load_settings(config_dir))
    assert key is not None
    test, test_file = stand_in_test_set(tmp_path)
    registries: dict[str, tuple[list[float], list[str]]] = {}
    for order, accuracies in ORDERS.items():
        name = f"gate-{order}-{uuid.uuid4().hex[:8]}"
        client.create_registered_model(name)
        numbers = [
            stand_in_version(
                client, name, test, wrong_on(test, np.arange(round((1 - a) * IMAGES))), key
            ).version
            for a in accuracies
        ]
        registries[name] = (accuracies, numbers)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                GATE,
                str(config_dir),
                str(go),
                str(test_file),
                *(f"{name}={numbers[i]}" for name, (_, numbers) in registries.items()),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(len(ORDERS["best-first"]))
    ]
    wait_all_ready(procs, tmp_path)  # each has imported what it needs and waits for "go"
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _out, err in outputs]
    for name, (accuracies, numbers) in registries.items():
        best = numbers[accuracies.index(max(accuracies))]
        assert client.get_model_version_by_alias(name, "champion").version == best, name
        for number in numbers:
            tags = client.get_model_version(name, number).tags
            assert (CHAMPION_REASON_TAG in tags) != (CHALLENGER_TAG in tags), (number, tags)


def new_registry(
    stack_settings: Settings, tmp_path: Path, prefix: str
) -> tuple[Settings, MlflowClient, str]:
    """(settings, client, model name) of a client machine whose registered model is new."""
    settings = load_settings(client_config(stack_settings, tmp_path))
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    settings.model_registry.name = name
    client = MlflowClient(stack_settings.mlflow_uri)
    client.create_registered_model(name)
    return settings, client, name


def stand_in_model(client: MlflowClient) -> tuple[str, str]:
    """(run id, source) of a run holding an MLmodel file, for versions that need no
    predictions."""
    experiment = client.create_experiment(f"gate-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "flavors: {}\n", "model/MLmodel")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, f"{run.info.artifact_uri}/model"


def judge_version(
    settings: Settings, client: MlflowClient, name: str, test: LabelledImages, predicted: np.ndarray
) -> tuple[ModelVersion, GateDecision]:
    """Register a stand-in version with these predictions through the gate, as a training
    would (`register`, with the stack-wide lock)."""
    key = model_signing_key(settings)
    assert key is not None
    version = stand_in_version(client, name, test, predicted, key)

    def never(_version: ModelVersion) -> np.ndarray:
        raise AssertionError("a champion with stored predictions was scored again")

    candidate = Candidate(test.labels, predicted, champion_predictions(client, test, never), key)
    return register(
        client,
        name,
        version.source,
        dict(version.tags),
        candidate,
        GateRules(),
        lambda: held(settings, champion_lock_name(name)),
    )


def test_the_gate_moves_only_for_a_model_better_beyond_noise_on_every_digit(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """Through the real registry: clearly better moves `champion`; equal with noise and
    better-but-worse-on-one-digit do not. Each decision and its evidence are on the
    version's tags and in `mnistops models`."""
    config_dir = client_config(stack_settings, tmp_path)
    name = f"judged-{uuid.uuid4().hex[:8]}"
    write_flow_yml(config_dir, {"model_registry": {"name": name}})
    settings = load_settings(config_dir)
    client = MlflowClient(stack_settings.mlflow_uri)
    client.create_registered_model(name)
    test, _ = stand_in_test_set(tmp_path)
    first_errors = np.arange(0, 100)  # 10 of each digit
    first, decision = judge_version(settings, client, name, test, wrong_on(test, first_errors))
    assert decision.moved and decision.evidence is None

    better, decision = judge_version(
        settings, client, name, test, wrong_on(test, first_errors[:70])
    )
    assert decision.moved and decision.evidence is not None, decision.reason
    assert (decision.evidence.new_only, decision.evidence.champion_only) == (30, 0)
    assert client.get_model_version_by_alias(name, "champion").version == better.version
    assert better.tags["gate_champion"] == first.version
    assert better.tags["previous_champion"] == first.version

    # Three fewer errors than the champion: 20 of its errors fixed, 17 new ones.
    noisy = np.concatenate([first_errors[20:70], np.arange(100, 117)])
    noise, decision = judge_version(settings, client, name, test, wrong_on(test, noisy))
    assert not decision.moved and "not better beyond noise" in decision.reason
    assert float(noise.tags["gate_p_value"]) > 0.05
    assert (noise.tags["gate_new_errors"], noise.tags["gate_champion_errors"]) == ("67", "70")

    # All 70 of the champion's errors fixed, 23 sevens wrong (it had 7): digit 7 -16 points.
    sevens = np.flatnonzero(test.labels == 7)[20:43]
    loser, decision = judge_version(settings, client, name, test, wrong_on(test, sevens))
    assert not decision.moved and "digit 7 got worse" in decision.reason, decision.reason
    assert decision.evidence is not None and decision.evidence.p_value < 0.05
    assert loser.tags["gate_worst_class"] == "7"
    assert client.get_model_version_by_alias(name, "champion").version == better.version

    listing = run_cli("models", config_dir=config_dir)
    assert listing.returncode == 0, listing.stderr
    text = " ".join(listing.stdout.split())
    assert f"v{noise.version} challenger: against v{better.version}, not better beyond" in text
    assert f"v{better.version} against v{first.version}: p = " in text and "moved p=" in text
    assert "digit 7 got worse" in text and "not better beyond noise" in text

    compared = run_cli("models", "--compare", better.version, loser.version, config_dir=config_dir)
    assert compared.returncode == 0, compared.stderr
    assert f"v{loser.version} against v{better.version} on the same test images" in compared.stdout
    assert "digit 7" in compared.stdout
    client.set_model_version_tag(name, first.version, ACCURACY_TAG, "[bold]abc")  # anyone's
    odd = run_cli("models", "--compare", first.version, better.version, config_dir=config_dir)
    assert odd.returncode == 0 and "Traceback" not in odd.stderr, odd.stderr
    missing = run_cli("models", "--compare", better.version, "999", config_dir=config_dir)
    assert missing.returncode == 2 and "has no version '999'" in missing.stderr, missing.stderr


def test_only_a_judged_version_makes_a_scheduled_run_skip(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """A version registered by a training interrupted before the gate decided (or never
    judged at all) does not count as 'already trained': only a judged one does."""
    from mnistops.flows.retrain import trained_on
    from mnistops.tracking import registration

    settings, client, name = new_registry(stack_settings, tmp_path, "skip")
    run, source = stand_in_model(client)
    learned = {c.DATA_HASH_TAG: "c" * 64, c.RECIPE_TAG: "r" * 16, c.SUBSET_TAG: "false"}
    unjudged = client.create_model_version(name, source=source, run_id=run, tags=learned)
    assert trained_on(settings, "c" * 64, "r" * 16)[0] is None
    interrupted = registration.INTERRUPTED_GATE
    client.set_model_version_tag(name, unjudged.version, CHALLENGER_TAG, interrupted)
    assert trained_on(settings, "c" * 64, "r" * 16)[0] is None
    judged = client.create_model_version(
        name, source=source, run_id=run, tags={**learned, CHALLENGER_TAG: "not better"}
    )
    version, why = trained_on(settings, "c" * 64, "r" * 16)
    assert version == judged.version and f"model version {judged.version}" in why
    assert trained_on(settings, "c" * 64, "other-recipe")[0] is None
    # the drift trigger's runs: any recipe counts, other data still does not
    assert trained_on(settings, "c" * 64, "other-recipe", any_recipe=True)[0] == judged.version
    assert trained_on(settings, "d" * 64, "r" * 16, any_recipe=True)[0] is None


@pytest.mark.security
def test_crafted_stored_predictions_are_never_trusted(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """Anyone who can write to MLflow can put a file where a run's predictions go: one
    that disagrees with the accuracy the run recorded (a champion made to look wrong
    everywhere), of the wrong length, with digits out of range, with pickled objects, or
    a zip bomb is ignored; the champion is scored again and the good predictions stored."""
    import io
    import zipfile

    import torch

    from mnistops.tracking.predictions import ARTIFACT_DIR, artifact_path, read_stored

    client = MlflowClient(stack_settings.mlflow_uri)
    test, _ = stand_in_test_set(tmp_path)
    sevens = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        sevens[1].weight.zero_()
        sevens[1].bias.copy_(torch.eye(10)[7])  # says 7 to every image
    scored = []

    def load(version: ModelVersion) -> torch.nn.Module:
        scored.append(version.version)
        return sevens

    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("predicted.npy", b"\0" * (80 * 1024 * 1024))
    crafted = {
        "a plausible lie": {"predicted": (test.labels + 1) % 10, "labels": test.labels},
        "short": {"predicted": test.labels[:10], "labels": test.labels[:10]},
        "out of range": {"predicted": test.labels + 11, "labels": test.labels},
        "objects": {"predicted": np.array([None] * IMAGES), "labels": test.labels},
    }
    files = {}
    for kind, arrays in crafted.items():
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        files[kind] = buffer.getvalue()
    files["zip bomb"] = bomb.getvalue()
    name = f"crafted-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    for kind, content in files.items():
        version = stand_in_version(client, name, test, test.labels, KEY)
        path = tmp_path / kind.replace(" ", "-") / f"{test.digest}.npz"
        path.parent.mkdir()
        path.write_bytes(content)
        client.log_artifact(version.run_id, str(path), ARTIFACT_DIR)  # over the good one
        predicted = champion_predictions(client, test, load)(version)
        assert scored[-1] == version.version, kind
        assert (predicted == 7).all(), kind
        stored = read_stored(client, version.run_id, test.digest)
        assert stored is not None and (stored[0] == 7).all(), kind
    assert artifact_path(test.digest).startswith(ARTIFACT_DIR)


def test_a_failure_before_the_gate_names_the_unjudged_version(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """A training whose model was registered but whose gate failed (Prefect gone, say)
    says so — not "nothing was registered" — and the version, tagged unjudged, never
    counts as trained."""
    from mnistops.flows.retrain import trained_on
    from mnistops.tracking import registration
    from mnistops.tracking.contract import CHALLENGER_TAG
    from mnistops.tracking.runs import TrackedRun

    settings, client, name = new_registry(stack_settings, tmp_path, "failed")
    run, source = stand_in_model(client)
    tracked = TrackedRun(client, run, "", "0", "train", "v1.0")
    nothing = registration.settle_failed(settings, tracked)
    assert nothing == "the run is marked FAILED, nothing was registered"
    learned = {c.DATA_HASH_TAG: "e" * 64, c.RECIPE_TAG: "r" * 16, c.SUBSET_TAG: "false"}
    version = client.create_model_version(name, source=source, run_id=run, tags=learned)
    said = registration.settle_failed(settings, tracked)
    assert said == (
        f"the run is marked FAILED; model version {version.version} was registered but not"
        " judged by the champion gate (tagged so), champion did not move"
    )
    tags = client.get_model_version(name, version.version).tags
    assert tags[CHALLENGER_TAG] == registration.FAILED_GATE
    assert trained_on(settings, "e" * 64, "r" * 16)[0] is None
