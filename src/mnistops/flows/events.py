"""Events: `data version` tells Prefect a version was published, and monitoring that the
answers drifted; the retraining deployment's triggers start a run on them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mnistops.clients import prefect_api, prefect_client
from mnistops.errors import Interrupted
from mnistops.settings import Settings

PUBLISHED_EVENT = "mnistops.data.version.published"
DRIFT_EVENT = "mnistops.monitoring.drift"


def listening_deployment(settings: Settings) -> str | None:
    """The deployment whose trigger starts a retraining on a new data version, if any."""
    from prefect.exceptions import ObjectNotFound

    with prefect_client(settings) as client:
        try:
            deployment = client.read_deployment_by_name(settings.deployment.full_name)
        except ObjectNotFound:
            return None
        automations = client.read_resource_related_automations(
            f"prefect.deployment.{deployment.id}"
        )
    listens = any(
        PUBLISHED_EVENT in getattr(a.trigger, "expect", set()) and a.enabled for a in automations
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
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(event=name, resource=resource, payload=payload)

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    with prefect_api(settings):
        asyncio.run(asyncio.wait_for(send(), timeout_s))


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
            f" Prefect at {settings.prefect_api_url} ({exc.__class__.__name__}); start a"
            " retraining with `mnistops run`",
        )
