"""The monitoring flow `MNIST monitoring`: judge the answers logged since its last run
against the champion's training data, leave the report, and announce drift.

Deployed by `mnistops deploy` beside the retraining, on the same work pool, every
`monitoring.interval_s`; `mnistops monitor` runs it now. The steps are the plain
function `loop.monitoring.monitor`, which `mnistops monitor --here` and the drift bench
call too. On drift it emits `mnistops.monitoring.drift`, which the retraining
deployment takes as a trigger when `monitoring.retrain_on_drift` is on.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from mnistops.clients import library_defaults
from mnistops.data.images import shown_name
from mnistops.flows.events import announce_drift, drift_payload
from mnistops.loop.monitoring import Monitored, monitor, one_window_at_a_time, summary_markdown
from mnistops.settings import Settings, load_settings

SUMMARY_KEY = "mnist-monitoring"
"""the key of the markdown artifact a monitoring run leaves: its result"""
REPORT_KEY = "mnist-monitoring-report"


def result_markdown(monitored: Monitored, announced: bool) -> str:
    event = "\n\nEmitted `mnistops.monitoring.drift`." if announced else ""
    return (
        f"# MNIST monitoring\n\n{summary_markdown(monitored.judgement)}\n\n"
        f"Window {monitored.start:%Y-%m-%d %H:%M:%S} to {monitored.end:%Y-%m-%d %H:%M:%S}"
        f" UTC, {monitored.champion.model_name} v{monitored.champion.version} against"
        f" {monitored.champion.data_version}. Report: the MLflow run <{monitored.run_url}>"
        f" (`report.html`), `{monitored.report_uri}`.{event}"
    )


@task(name="Judging the window", cache_policy=NO_CACHE)
def judging(settings: Settings) -> Monitored:
    return monitor(settings)


@flow(name="MNIST monitoring", log_prints=True, timeout_seconds=1800)
def monitoring_flow() -> dict[str, object]:
    """Judge the answers logged since the last run; report; emit drift."""
    library_defaults()
    settings = load_settings()
    with one_window_at_a_time(settings):
        monitored = judging(settings)
        for name, why in monitored.refused:  # one line each, whatever the name holds
            print(f"s3://{settings.s3.buckets.dvc}/{shown_name(name)} refused: {shown_name(why)}")
        announced = announce_drift(settings, monitored)
    create_link_artifact(
        monitored.run_url, link_text="the monitoring report (MLflow run)", key=REPORT_KEY
    )
    create_markdown_artifact(result_markdown(monitored, announced), key=SUMMARY_KEY)
    print(summary_markdown(monitored.judgement))
    return drift_payload(monitored)
