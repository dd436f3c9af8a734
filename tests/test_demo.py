"""`mnistops demo --fast`: the whole walkthrough on a fresh stack, then again (reused)."""

from __future__ import annotations

import httpx
import pytest
from mlflow import MlflowClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

from mnistops.clients import prefect_client
from mnistops.data import reader
from mnistops.settings import Settings
from mnistops.tracking.registry import CHALLENGER_TAG, CHAMPION_REASON_TAG, champion, versions
from mnistops.tracking.runs import experiment_runs
from tests.helpers import run_cli

pytestmark = pytest.mark.integration

STAGES = [
    "1. the stack",
    "2. MNIST as labelled PNG folders",
    "3. data version v1.0",
    "4. experimental training on v1.0",
    "5. new images: data version v2.0",
    "6. scheduled retraining",
    "7. a worker for work pool",
    "8. Quick run of the deployment on v2.0",
    "9. the champion served over HTTP",
    "10. the loop",
    "summary",
]


def gate_moved(settings: Settings, decided: dict[str, str]) -> bool:
    """Whether the gate's recorded evidence says the version should have taken champion."""
    rules = settings.model_registry
    return float(decided["gate_p_value"]) < rules.significance and (
        -float(decided["gate_worst_class_change"]) <= rules.max_class_drop
    )


def flow_runs(settings: Settings, triggered_by: str | None = None) -> list:
    """The Quick runs of the retraining deployment, or the runs the publication of
    `triggered_by` started."""
    with prefect_client(settings) as client:
        deployment = client.read_deployment_by_name(
            f"{settings.deployment.flow_name}/{settings.deployment.deploy_name}"
        )
        return [
            run
            for run in client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[settings.deployment.deploy_name])
                )
            )
            if run.deployment_id == deployment.id
            and (
                "quick-run" in (run.tags or [])
                if triggered_by is None
                else run.parameters.get("data_version") == triggered_by
                and "quick-run" not in (run.tags or [])
            )
        ]


def deployments(settings: Settings) -> list:
    with prefect_client(settings) as client:
        return client.read_deployments()


def test_demo_tells_the_whole_story(demo_run: dict) -> None:
    done, settings = demo_run["result"], demo_run["settings"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    positions = [done.stdout.find(stage) for stage in STAGES]
    assert -1 not in positions, dict(zip(STAGES, positions, strict=True))
    assert positions == sorted(positions), "stages out of order"
    output = done.stdout + done.stderr
    for noise in ("Initialized DVC repository", "Downloading artifacts", " INFO "):
        assert noise not in output, f"the libraries' noise: {noise!r}"
    said = " ".join(output.split())
    assert "a deployed retraining will start" not in said
    assert "no deployment listens for it yet" in said, "v1.0 is published before deploy"

    assert [r.tag for r in reader.list_versions(settings)] == ["v1.0", "v2.0", "v3.0"]

    runs = experiment_runs(settings)
    assert [(r.phase, r.data_version, r.status) for r in runs] == [
        ("experimental", "v1.0", "FINISHED"),
        ("retraining", "v2.0", "FINISHED"),
        ("retraining", "v3.0", "FINISHED"),
    ]
    assert all(r.test_accuracy is not None and 0 < r.test_accuracy <= 1 for r in runs)

    client = MlflowClient(settings.mlflow_uri)
    best = champion(client, settings.model_registry.name)
    assert best is not None
    assert CHAMPION_REASON_TAG in best.tags
    # The gate's decision on v2.0's model follows its recorded evidence. (Where champion
    # is now depends on the serving tests, which promote and roll back on this stack.)
    first, second, third = sorted(
        versions(client, settings.model_registry.name), key=lambda v: int(v.version)
    )
    decided = client.get_model_version(settings.model_registry.name, second.version).tags
    assert decided["gate_champion"] == first.version
    assert (CHALLENGER_TAG not in decided) is gate_moved(settings, decided), decided
    after_loop = client.get_model_version(settings.model_registry.name, third.version).tags
    assert after_loop["gate_champion"] in (first.version, second.version)
    assert (CHALLENGER_TAG not in after_loop) is gate_moved(settings, after_loop), after_loop

    named = {d.name: d for d in deployments(settings)}
    assert len(named) == 2, named
    deployment = named[settings.deployment.deploy_name]
    monitoring = named[settings.monitoring.deploy_name]
    assert deployment.name == settings.deployment.deploy_name
    assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert monitoring.name == settings.monitoring.deploy_name
    assert monitoring.schedules[0].schedule.interval.total_seconds() == 3600
    (quick,) = flow_runs(settings)
    assert quick.state.type.value == "COMPLETED"
    assert quick.parameters["data_version"] == "v2.0"
    (triggered,) = flow_runs(settings, "v3.0")
    assert triggered.state.type.value == "COMPLETED"
    assert triggered.parameters["started_by"] == "the publication of v3.0"
    assert triggered.parameters["hyperparameters"]["n_epochs"] == 1, "the demo's epochs"

    summary = done.stdout[done.stdout.find("summary") :]
    rows = [line for line in summary.splitlines() if "│ v" in line]
    assert [row.split("│")[1].strip() for row in rows[:3]] == ["1", "2", "3"], rows
    for expected in (
        settings.mlflow_uri,
        settings.prefect_api_url.removesuffix("/api"),
        settings.s3_endpoint,
        settings.serve_url,
        "next scheduled run:",
        "mnistops stack down",
        f"champion: {settings.model_registry.name} v{best.version}",
    ):
        assert expected in " ".join(summary.split()), expected
    served = httpx.get(f"{settings.serve_url}/health", timeout=5).json()
    assert served == {"status": "ready", "model_version": best.version}


def test_the_demo_closes_the_loop(demo_run: dict) -> None:
    """Stage 10: drawn digits answered, corrected through /feedback, added as images of
    the labelled digit, published as v3.0 (images from feedback, none of them a test
    image), the retraining its publication started, and the service on the champion."""
    done, settings = demo_run["result"], demo_run["settings"]
    loop = " ".join(
        done.stdout[done.stdout.find("10. the loop") : done.stdout.find("summary")].split()
    )
    assert "300 drawn digits" in loop, loop
    wrong = int(loop.split(" wrong")[0].rsplit(" ", 1)[1])
    assert f"{wrong} wrong answers corrected" in loop, loop
    assert "published v3.0" in loop and "started by the publication of v3.0" in loop, loop
    assert "Completed" in loop, loop
    client = MlflowClient(settings.mlflow_uri)
    newest = max(versions(client, settings.model_registry.name), key=lambda v: int(v.version))
    decided = client.get_model_version(settings.model_registry.name, newest.version).tags
    assert decided["data_version"] == "v3.0"
    if CHALLENGER_TAG in decided:  # the lenient gate of the fixture kept the champion
        assert "the gate kept" in loop, loop
    else:
        assert f"the new champion v{newest.version} answers at {settings.local_serve_url}" in loop
        assert "the service followed the registry" in loop, loop
    from_feedback = sorted((settings.mnist_dir / "train").glob("*/feedback-*.png"))
    assert len(from_feedback) >= wrong > 0
    diff = run_cli("data", "diff", "v2.0", "v3.0", config_dir=demo_run["config_dir"])
    assert diff.returncode == 0, diff.stderr
    assert f"{len(from_feedback)} of the added images came from feedback" in diff.stdout


def test_demo_again_reuses_what_exists(demo_run: dict) -> None:
    settings, config_dir = demo_run["settings"], demo_run["config_dir"]
    model_versions = len(versions(MlflowClient(settings.mlflow_uri), settings.model_registry.name))

    again = run_cli("demo", "--fast", config_dir=config_dir, cwd=demo_run["root"], timeout=600)

    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    text = " ".join(again.stdout.split())
    assert "v1.0 exists already: kept" in text
    assert "v2.0 exists already: kept" in text
    assert "was trained on v1.0: kept" in text
    assert f"{settings.deployment.full_name}: unchanged;" in text
    assert f"{settings.monitoring.full_name}: unchanged;" in text, "deployed twice, left alone"
    assert "the worker for this pool runs already" in text
    assert "the prediction service runs already" in text
    assert "no new data" in text
    assert "v3.0 exists already: kept" in text
    assert [r.tag for r in reader.list_versions(settings)] == ["v1.0", "v2.0", "v3.0"]
    assert len(experiment_runs(settings)) == 3
    assert (
        len(versions(MlflowClient(settings.mlflow_uri), settings.model_registry.name))
        == model_versions
    )
    assert len(deployments(settings)) == 2
    assert all(run.state.type.value == "COMPLETED" for run in flow_runs(settings))
