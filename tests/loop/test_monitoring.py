"""Monitoring against the real stack of `mnistops demo --fast`: streams made from test
images go through a service of its own; `mnistops monitor --here` judges a clean one as
no drift and an inverted one as drift, writes the report (MLflow run and object store),
emits `mnistops.monitoring.drift` only then, and the retraining deployment's trigger
starts a run; `mnistops monitor --wait` runs the deployed flow on the demo's worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mnistops.clients import mlflow_client, prefect_auth, s3_client
from mnistops.data import mnist
from mnistops.flows.deployment import DRIFT_RUN_PARAMETERS
from mnistops.loop import streams
from mnistops.settings import Settings, load_settings
from mnistops.tracking import contract as c
from tests.helpers import cli_command, closed_port, run_cli
from tests.loop.service import Service, logged

pytestmark = [pytest.mark.integration, pytest.mark.loop]


def send(service: Service, kind: str, n: int = 300) -> set[str]:
    """A stream of `n` images in requests of 150; their request ids, once logged."""
    images = streams.stream(mnist.load(mnist.packaged_dir()).test_images, kind, n)
    ids = set()
    for start in range(0, n, 150):
        batch = images[start : start + 150].tolist()  # 0-255, as the page sends
        answer = httpx.post(f"{service.url}/predict", json=batch, timeout=30)
        assert answer.status_code == 200, answer.text
        ids.add(answer.json()["request_id"])
    logged(service.settings, ids)
    time.sleep(service.settings.serve.log.batch_s + 5.5)  # past the window's write lag
    return ids


def monitor_since(service: Service, since: datetime) -> Any:
    done = run_cli("monitor", "--here", "--since", since.isoformat(), config_dir=service.config_dir)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def drift_events(settings: Settings) -> list[dict[str, Any]]:
    auth = prefect_auth(settings)
    answer = httpx.post(
        f"{settings.prefect_api_url}/events/filter",
        json={"filter": {"event": {"name": ["mnistops.monitoring.drift"]}}, "limit": 50},
        auth=tuple(auth.split(":", 1)) if auth else None,  # type: ignore[arg-type]
    )
    assert answer.status_code == 200, answer.text
    return list(answer.json()["events"])


def drift_events_when(settings: Settings, count: int, timeout_s: float = 20) -> list[dict]:
    """The drift events once there are `count` (the server stores events a moment after
    it takes them)."""
    deadline = time.monotonic() + timeout_s
    while len(events := drift_events(settings)) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return events


def latest_monitoring_run(settings: Settings) -> Any:
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.monitoring.experiment_name)
    assert experiment is not None
    assert experiment.tags.get(c.EXPERIMENT_KIND[0]) == c.EXPERIMENT_KIND[1]
    (run,) = client.search_runs(
        [experiment.experiment_id], order_by=["start_time DESC"], max_results=1
    )
    return run


def window_of(run: Any) -> tuple[datetime, datetime]:
    tags = run.data.tags
    return (
        datetime.fromisoformat(tags[c.WINDOW_START_TAG]),
        datetime.fromisoformat(tags[c.WINDOW_END_TAG]),
    )


def report_page(settings: Settings, uri: str) -> str:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return str(s3_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read().decode())


@pytest.mark.slow(
    "two streams of answers fill the log's windows, then a drift event starts a retraining"
)
@pytest.mark.retrains
def test_a_clean_stream_is_no_drift_and_an_inverted_one_is(service: Service) -> None:
    settings = service.settings
    # The demo's loop made v3 champion (the fixture's lenient gate): at --fast scale a
    # fifth of its training images are thick feedback drawings, against which MNIST's
    # own digits are rightly drift. Judge the stream against v1, trained on MNIST only.
    promoted = run_cli(
        "models", "promote", "1", "-m", "monitoring test", config_dir=service.config_dir
    )
    assert promoted.returncode == 0, promoted.stderr
    deadline = time.monotonic() + 3 * settings.serve.poll_s + 10
    while httpx.get(f"{service.url}/health").json().get("model_version") != "1":
        assert time.monotonic() < deadline, "the service did not follow the promotion"
        time.sleep(0.5)
    events_before = len(drift_events(settings))
    began = datetime.now(UTC)
    send(service, "unshifted")
    clean = monitor_since(service, began)
    assert "No drift in 300 answers" in clean.stdout, clean.stdout
    assert "emitted" not in clean.stdout
    run = latest_monitoring_run(settings)
    assert run.data.tags[c.DRIFT_TAG] == "false"
    assert run.data.metrics["predictions"] == 300
    page = report_page(settings, run.data.tags[c.REPORT_TAG])
    assert "No drift: 300 answers look like the data" in page
    assert "data:image/png;base64," in page and "v1 (champion)" in page
    assert "What changed" not in page
    artifacts = [a.path for a in mlflow_client(settings).list_artifacts(run.info.run_id)]
    assert "report.html" in artifacts
    assert len(drift_events(settings)) == events_before

    shifted_from = datetime.now(UTC)
    send(service, "inverted")
    shifted = monitor_since(service, shifted_from)
    assert "Drift in 300 answers" in shifted.stdout, shifted.stdout
    assert "emitted mnistops.monitoring.drift" in shifted.stdout
    run = latest_monitoring_run(settings)
    assert run.data.tags[c.DRIFT_TAG] == "true" and run.data.metrics["drift"] == 1
    assert run.data.metrics["effect_mean_intensity"] > 0.9
    page = report_page(settings, run.data.tags[c.REPORT_TAG])
    assert "Drift: 300 answers do not look like the data" in page
    assert "mean intensity (how bright the image is on average): 100% of the answers are" in page
    assert "higher than 99 % of the training images" in page
    events = drift_events_when(settings, events_before + 1)
    assert len(events) == events_before + 1
    payload = events[0]["payload"]
    assert payload["predictions"] == 300 and payload["reasons"]
    assert payload["model"].startswith(f"{settings.model_registry.name}/")
    assert retraining_started_by_drift(settings), "the drift trigger started no retraining"


def retraining_started_by_drift(settings: Settings, timeout_s: float = 60) -> bool:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from mnistops.clients import prefect_client

    started_by = str(DRIFT_RUN_PARAMETERS["started_by"]).split("(")[0].strip()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with prefect_client(settings) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[settings.deployment.deploy_name])
                )
            )
        if any(str(r.parameters.get("started_by", "")).startswith(started_by) for r in runs):
            return True
        time.sleep(1)
    return False


@pytest.mark.retrains
@pytest.mark.security
def test_a_window_end_in_the_future_stops_no_later_window(service: Service) -> None:
    """A monitoring run's `window_end` set far ahead (by hand, or a clock ahead) would
    otherwise make every later window empty."""
    settings = service.settings
    forged = latest_monitoring_run(settings)
    mlflow_client(settings).set_tag(forged.info.run_id, c.WINDOW_END_TAG, "2099-01-01T00:00:00")
    done = run_cli("monitor", "--here", config_dir=service.config_dir)
    assert done.returncode == 0, done.stderr
    run = latest_monitoring_run(settings)
    assert run.info.run_id != forged.info.run_id
    start = datetime.fromisoformat(run.data.tags[c.WINDOW_START_TAG])
    end = datetime.fromisoformat(run.data.tags[c.WINDOW_END_TAG])
    assert start <= end < datetime.now(UTC)
    assert (end - start).total_seconds() <= settings.monitoring.interval_s + 1


@pytest.mark.faults
def test_drift_whose_event_prefect_never_took_is_judged_again(service: Service) -> None:
    """Prefect unreachable from this one command: the verdict and report still show, a
    clear error says the event was not sent, and the run ends FAILED, so that the next
    monitoring run takes the same window again (its event would otherwise be lost)."""
    from mnistops.loop.monitoring import last_window_end

    settings = service.settings
    shifted_from = datetime.now(UTC)
    send(service, "inverted")
    with closed_port() as port:
        dead = {"MNISTOPS_PREFECT__API_URL": f"http://127.0.0.1:{port}/api"}
        done = run_cli(
            "monitor", "--here", "--since", shifted_from.isoformat(),
            config_dir=service.config_dir, env={**os.environ, **dead},
        )  # fmt: skip
    said = " ".join(done.stderr.split())
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "Drift in 300 answers" in done.stdout and "report:" in done.stdout, done.stdout
    assert "could not be sent to Prefect" in said and "judges this window again" in said, said
    run = latest_monitoring_run(settings)
    assert run.info.status == "FAILED" and run.data.tags[c.DRIFT_TAG] == "true"
    assert run.data.tags[c.ERROR_TAG].startswith("event not sent")
    end = datetime.fromisoformat(run.data.tags[c.WINDOW_END_TAG])
    previous = last_window_end(settings, datetime.now(UTC))
    assert previous is None or previous < end, "the window is not taken again"


def quiet_monitoring(service: Service, root: Path) -> Path:
    """A copy of the service's config whose monitoring has its own experiment (so its
    own chain of windows and its own lock) and reports its windows without judging
    them: no drift, no event, whatever answers the earlier tests left in the log."""
    config_dir = root / "config"
    shutil.copytree(service.config_dir, config_dir)
    stack_yml = config_dir / "stack.yml"
    config = yaml.safe_load(stack_yml.read_text())
    config["monitoring"] = {
        **config.get("monitoring", {}),
        "experiment_name": f"monitoring-{uuid.uuid4().hex[:8]}",
        "interval_s": 60,
        "min_predictions": 1_000_000,
        "min_feedback": 1_000_000,
    }
    stack_yml.write_text(yaml.safe_dump(config))
    return config_dir


def chain_started(service: Service, config_dir: Path) -> Any:
    """The first run of that config's chain of windows, once the answers of the tests
    before are behind its end (a window ends the write lag before its run)."""
    from mnistops.loop.monitoring import WRITE_LAG_S

    time.sleep(service.settings.serve.log.batch_s + WRITE_LAG_S + 1)
    return monitored_by(config_dir)


def monitoring_runs(config_dir: Path) -> list[Any]:
    """The runs of that config's monitoring experiment, newest first."""
    settings = load_settings(config_dir)
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.monitoring.experiment_name)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], order_by=["start_time DESC"]))


def monitored_by(config_dir: Path, *args: str) -> Any:
    """`monitor --here ARGS` with that config; its run."""
    done = run_cli("monitor", "--here", *args, config_dir=config_dir)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
    return monitoring_runs(config_dir)[0]


@pytest.mark.faults
def test_the_chain_of_windows_judges_each_answer_once(service: Service, tmp_path: Path) -> None:
    """Whatever runs beside it, each answer is in one window of the chain. A window
    asked for by hand (`--since`, here after the answers) is outside the chain: were
    the next run to start at its end, the answers before it would never be judged. Two
    `monitor --here` at once (or one beside the scheduled flow) would both start where
    the last finished run ended and judge the same answers (on drift: two events, two
    retrainings); the monitoring lock makes the second wait and take what came after."""
    from mnistops.loop.monitoring import WRITE_LAG_S

    config_dir = quiet_monitoring(service, tmp_path)
    first = chain_started(service, config_dir)
    send(service, "unshifted")
    time.sleep(3)  # a window by hand that starts after those answers, and holds none
    lag = service.settings.serve.log.batch_s + WRITE_LAG_S
    asked_from = datetime.now(UTC) - timedelta(seconds=lag + 1)
    by_hand = monitored_by(config_dir, "--since", asked_from.isoformat())
    assert by_hand.data.tags[c.WINDOW_BY_HAND_TAG] == "true"
    assert by_hand.data.metrics["predictions"] == 0
    both = [
        subprocess.Popen(
            cli_command(("monitor", "--here"), config_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    said = [proc.communicate(timeout=300) for proc in both]
    for proc, (out, err) in zip(both, said, strict=True):
        assert proc.returncode == 0 and "Traceback" not in err, out + err
    one, two = sorted(monitoring_runs(config_dir)[:2], key=lambda run: window_of(run)[0])
    assert window_of(one)[0] == window_of(first)[1], "the chain went on from the window by hand"
    assert window_of(one)[1] <= window_of(two)[0], "two runs judged the same answers"
    assert one.data.metrics["predictions"] + two.data.metrics["predictions"] == 300


@pytest.mark.slow("the monitoring flow runs on a worker, through Prefect")
@pytest.mark.retrains
def test_monitor_runs_the_deployed_flow(service: Service) -> None:
    done = run_cli("monitor", "--wait", config_dir=service.config_dir, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MNIST monitoring" in done.stdout and "answers" in done.stdout, done.stdout
    assert "Completed" in done.stdout
    shown = done.stdout.replace("\n", "")  # the report's URL, whatever the line breaks
    assert f"{service.settings.mlflow_uri}/#/experiments/" in shown, done.stdout


@pytest.mark.bad_input
def test_since_without_here_is_refused(service: Service) -> None:
    done = run_cli("monitor", "--since", "2026-01-01", config_dir=service.config_dir)
    assert done.returncode == 2 and "--since goes with --here" in done.stderr
    both = run_cli("monitor", "--here", "--wait", config_dir=service.config_dir)
    assert both.returncode == 2 and "--wait follows a flow run" in " ".join(both.stderr.split())
    bad = run_cli("monitor", "--here", "--since", "soon", config_dir=service.config_dir)
    assert bad.returncode == 2 and "--since 'soon'" in bad.stderr
    assert "Traceback" not in bad.stderr
    later = run_cli("monitor", "--here", "--since", "2099-01-01", config_dir=service.config_dir)
    assert later.returncode == 2, later.stdout + later.stderr
    assert "--since 2099-01-01T00:00:00 UTC is after the newest answers" in " ".join(
        later.stderr.split()
    )
