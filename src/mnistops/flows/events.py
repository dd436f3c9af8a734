"""Events: `data version` tells Prefect a version was published, and monitoring that the
answers drifted; the retraining deployment's triggers start a run on them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from mnistops.clients import prefect_rest
from mnistops.errors import Interrupted, MnistopsError
from mnistops.settings import Settings

if TYPE_CHECKING:
    from mnistops.loop.monitoring import Monitored

PUBLISHED_EVENT = "mnistops.data.version.published"
DRIFT_EVENT = "mnistops.monitoring.drift"


def listening_deployment(settings: Settings) -> str | None:
    """The deployment whose trigger starts a retraining on a new data version, if any.
    Asked through the REST API: `data version` would otherwise import Prefect's client
    (about a second of CPU) for these two answers and the event."""
    flow, _, name = settings.deployment.full_name.partition("/")
    found = prefect_rest(settings, "GET", f"/deployments/name/{quote(flow)}/{quote(name)}")
    if found.status_code == 404:
        return None
    found.raise_for_status()
    resource = quote(f"prefect.deployment.{found.json()['id']}")
    related = prefect_rest(settings, "GET", f"/automations/related-to/{resource}")
    related.raise_for_status()
    listens = any(
        PUBLISHED_EVENT in (a.get("trigger") or {}).get("expect", []) and a.get("enabled")
        for a in related.json()
    )
    return settings.deployment.full_name if listens else None


def emit_published(settings: Settings, tag: str, content_hash: str, timeout_s: float = 10) -> None:
    """Tell Prefect a data version was published (its deployment trigger starts a run)."""
    emit(
        settings,
        PUBLISHED_EVENT,
        {"prefect.resource.id": f"mnistops.data-version.{tag}", "tag": tag},
        {"tag": tag, "content_hash": content_hash},
        timeout_s,
    )


def emit_drift(settings: Settings, model: str, figures: dict[str, object]) -> None:
    """Tell Prefect that monitoring found the answers of `model` (NAME/VERSION) drifted."""
    emit(
        settings,
        DRIFT_EVENT,
        {"prefect.resource.id": f"mnistops.model.{model.replace('/', '.')}", "model": model},
        figures,
    )


def emit(
    settings: Settings,
    name: str,
    resource: dict[str, str],
    payload: dict[str, object],
    timeout_s: float = 10,
) -> None:
    """Send one event to the server (`POST /api/events`, what Prefect's events client
    sends over its socket), raising when it is not taken."""
    event = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": name,
        "resource": resource,
        "related": [],
        "payload": payload,
    }
    prefect_rest(settings, "POST", "/events", [event], timeout_s).raise_for_status()


class EventNotSent(MnistopsError):
    """Monitoring found drift but Prefect did not take its event; the message says what
    happens to the window."""


@dataclass(frozen=True)
class Announcement:
    listener: str | None
    """the deployment that starts a retraining on it, if any"""
    problem: str | None = None
    """why the event could not be sent (the version stands all the same)"""


def announce(settings: Settings, tag: str, content_hash: str) -> Announcement:
    """Emit the event of a published version, and say who listens. A failure to reach
    Prefect is reported, not raised: the version is published either way."""
    try:
        emit_published(settings, tag, content_hash)
        return Announcement(listening_deployment(settings))
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: {tag} is published, but the event {PUBLISHED_EVENT} may not have"
            " reached Prefect; start a retraining with `mnistops run`"
        ) from None
    except Exception as exc:  # noqa: BLE001  the publish itself succeeded
        return Announcement(
            None,
            f"{tag} is published, but the event {PUBLISHED_EVENT} could not be sent to"
            f" Prefect at {settings.prefect_api_url} ({_failure(exc)}); start a"
            " retraining with `mnistops run`",
        )


def _failure(exc: Exception) -> str:
    """What went wrong, in a few words: the server's answer when it gave one (401: our
    login was refused), else the kind of error."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return "it refused our login: set prefect.auth_string"
    return f"HTTP {status}" if status is not None else exc.__class__.__name__


def drift_payload(monitored: Monitored) -> dict[str, object]:
    """What the drift event carries: the model, the reasons, the figures, the report."""
    return {
        "model": f"{monitored.champion.model_name}/{monitored.champion.version}",
        "reasons": monitored.judgement.reasons,
        "window_start": monitored.start.isoformat(),
        "window_end": monitored.end.isoformat(),
        "report": monitored.report_uri,
        "mlflow_run": monitored.run_url,
        **monitored.figures(),
    }


def announce_drift(settings: Settings, monitored: Monitored) -> bool:
    """Emit the drift event when the window is drift; whether it was emitted. When it
    cannot be sent, the window's run ends FAILED (KILLED when interrupted) so that the
    next monitoring run judges the window again and sends it; the error says so."""
    from mnistops.loop.monitoring import finish_window, release_window

    if not monitored.judgement.drift:
        return False
    payload = drift_payload(monitored)
    window = f"{monitored.start:%Y-%m-%d %H:%M:%S} to {monitored.end:%Y-%m-%d %H:%M:%S} UTC"
    again = "the next `mnistops monitor` judges this window again and sends it"
    try:
        emit_drift(settings, str(payload["model"]), payload)
    except KeyboardInterrupt:
        release_window(settings, monitored.run_id, "KILLED", "interrupted before its event")
        raise Interrupted(
            f"interrupted: drift in {window}, its event {DRIFT_EVENT} may not have reached"
            f" Prefect; {again}"
        ) from None
    except Exception as exc:  # noqa: BLE001  the report stands: only the event failed
        why = _failure(exc)
        release_window(settings, monitored.run_id, "FAILED", f"event not sent: {why}")
        raise EventNotSent(
            f"drift in {window}, but the event {DRIFT_EVENT} could not be sent to Prefect at"
            f" {settings.prefect_api_url} ({why}): no retraining was started by it; once"
            f" Prefect answers, {again}"
        ) from None
    finish_window(settings, monitored.run_id)
    return True
