"""Which version the `champion` alias names, for the commands that only read it
(`mnistops predict`, monitoring).

Asked over MLflow's REST API (`registered-models/alias`, the call MLflow's own client
makes) with the login `check_tracking_server` uses: importing MLflow's client and the
gate's statistics took three of the four seconds of `mnistops predict`. A tracking URI
that is not http(s) is read with MLflow's client. Code that changes the alias holds a
client already and reads it with `registry.champion`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mnistops.settings import Settings
from mnistops.tracking.contract import ACCURACY_TAG, CHAMPION
from mnistops.tracking.server import NOT_THERE, TrackingError, rest_get


@dataclass(frozen=True)
class AliasedVersion:
    """The registered version an alias names: what reading and loading it need."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


def champion_of(settings: Settings, timeout_s: float = 10.0) -> AliasedVersion | None:
    """The version `champion` names on the settings' MLflow server, if any."""
    uri, name = settings.mlflow_uri.rstrip("/"), settings.model_registry.name
    if not uri.startswith(("http://", "https://")):
        return _through_the_client(settings)
    answer = rest_get(
        settings,
        "/api/2.0/mlflow/registered-models/alias",
        {"name": name, "alias": CHAMPION},
        timeout_s,
    )
    document = _json(answer)
    if answer.status_code != 200:
        if document.get("error_code") in NOT_THERE:
            return None
        raise TrackingError(
            f"the MLflow server at {uri} answered {answer.status_code} when asked for"
            f" {name}@{CHAMPION}: {document.get('message') or answer.text[:200]}"
        )
    return from_rest(document.get("model_version") or {}, uri)


def accuracy_of(settings: Settings, version: AliasedVersion) -> float | None:
    """A version's test accuracy: its tag, else its run's metric (a version registered by
    hand has no tag); None if neither is known or the server cannot say now."""
    value = version.tags.get(ACCURACY_TAG)
    if value is not None:
        return float(value)
    if not version.run_id or not settings.mlflow_uri.startswith(("http://", "https://")):
        return None
    try:
        answer = rest_get(settings, "/api/2.0/mlflow/runs/get", dict(run_id=version.run_id))
    except TrackingError:
        return None
    metrics = ((_json(answer).get("run") or {}).get("data") or {}).get("metrics") or []
    found = [
        m.get("value") for m in metrics if isinstance(m, dict) and m.get("key") == ACCURACY_TAG
    ]
    return float(found[-1]) if found and isinstance(found[-1], int | float) else None


def from_rest(version: dict[str, Any], uri: str) -> AliasedVersion:
    """A `model_version` of MLflow's REST answer; TrackingError if it is not one."""
    try:
        return AliasedVersion(
            name=str(version["name"]),
            version=str(version["version"]),
            source=str(version.get("source", "")),
            run_id=version.get("run_id") or None,
            tags={str(t["key"]): str(t.get("value", "")) for t in version.get("tags", [])},
        )
    except (KeyError, TypeError, AttributeError):
        raise TrackingError(
            f"the MLflow server at {uri} answered a model version without its name,"
            " version or tags: is it an MLflow server?"
        ) from None


def _json(answer: Any) -> dict[str, Any]:
    try:
        document = answer.json()
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _through_the_client(settings: Settings) -> AliasedVersion | None:
    from mnistops.clients import mlflow_client
    from mnistops.tracking.registry import champion

    found = champion(mlflow_client(settings), settings.model_registry.name)
    if found is None:
        return None
    return AliasedVersion(
        str(found.name), str(found.version), str(found.source), found.run_id, found.tags or {}
    )
