"""The champion gate under contention: many registrations decide at once, from several
processes (as trainings on several machines would); the champion at the end is the one
the rule picks, every time, and every version records its decision."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mnistops.settings import Settings
from mnistops.tracking.registry import ACCURACY_TAG, CHALLENGER_TAG, CHAMPION_REASON_TAG
from tests.helpers import client_config

pytestmark = [pytest.mark.integration, pytest.mark.integrity]

GATE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mlflow import MlflowClient
    from mnistops.settings import load_settings
    from mnistops.stack.locks import champion_lock_name, held
    from mnistops.tracking.registry import gate

    config_dir, name, number, go = sys.argv[1:]
    settings = load_settings(Path(config_dir))
    client = MlflowClient(settings.mlflow_uri)
    version = client.get_model_version(name, number)
    while not Path(go).exists():
        time.sleep(0.01)
    decision = gate(client, name, version, 0.0, lambda: held(settings, champion_lock_name(name)))
    print(number, decision.moved, decision.reason)
    """
)


def stand_in_model(client: MlflowClient) -> tuple[str, str]:
    """(run id, source) of a run holding an MLmodel file: what the gate checks a model
    has. Versions made from it cost no training."""
    experiment = client.create_experiment(f"gate-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "flavors: {}\n", "model/MLmodel")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, f"{run.info.artifact_uri}/model"


@pytest.mark.parametrize(
    "accuracies",
    [
        [0.90, 0.95, 0.91, 0.99, 0.93, 0.97, 0.92, 0.94],
        [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92],
    ],
    ids=["best-in-the-middle", "best-first"],
)
def test_concurrent_gates_crown_the_best(
    stack_settings: Settings, tmp_path: Path, accuracies: list[float]
) -> None:
    config_dir = client_config(stack_settings, tmp_path)
    client = MlflowClient(stack_settings.mlflow_uri)
    name = f"gate-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    run, source = stand_in_model(client)
    numbers = [
        client.create_model_version(
            name, source=source, run_id=run, tags={ACCURACY_TAG: str(a)}
        ).version
        for a in accuracies
    ]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GATE, str(config_dir), name, number, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in numbers
    ]
    time.sleep(8)  # every process has imported what it needs and waits for "go"
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _out, err in outputs]
    best = numbers[accuracies.index(max(accuracies))]
    assert client.get_model_version_by_alias(name, "champion").version == best
    for number in numbers:
        tags = client.get_model_version(name, number).tags
        assert (CHAMPION_REASON_TAG in tags) != (CHALLENGER_TAG in tags), (number, tags)


def test_only_a_judged_version_makes_a_scheduled_run_skip(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """A version registered by a training interrupted before the gate decided (or never
    judged at all) does not count as 'already trained': only a judged one does."""
    from mnistops.flows.retrain import trained_on
    from mnistops.settings import load_settings
    from mnistops.tracking import runs

    settings = load_settings(client_config(stack_settings, tmp_path))
    name = f"skip-{uuid.uuid4().hex[:8]}"
    settings.model_registry.name = name
    client = MlflowClient(stack_settings.mlflow_uri)
    client.create_registered_model(name)
    run, source = stand_in_model(client)
    learned = {"data_content_hash": "c" * 64, runs.RECIPE_TAG: "r" * 16, runs.SUBSET_TAG: "false"}
    unjudged = client.create_model_version(name, source=source, run_id=run, tags=learned)
    assert trained_on(settings, "c" * 64, "r" * 16)[0] is None
    client.set_model_version_tag(name, unjudged.version, CHALLENGER_TAG, runs.INTERRUPTED_GATE)
    assert trained_on(settings, "c" * 64, "r" * 16)[0] is None
    judged = client.create_model_version(
        name, source=source, run_id=run, tags={**learned, CHALLENGER_TAG: "not better"}
    )
    version, why = trained_on(settings, "c" * 64, "r" * 16)
    assert version == judged.version and f"model version {judged.version}" in why
    assert trained_on(settings, "c" * 64, "other-recipe")[0] is None
