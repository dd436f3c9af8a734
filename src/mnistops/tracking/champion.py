"""Which version the `champion` alias names, and every registered version, for the
commands that only read them (`mnistops predict`, `mnistops models`, monitoring).

Asked over MLflow's REST API (`registered-models/alias`, the call MLflow's own client
makes) with the login `check_tracking_server` uses: importing MLflow's client and the
gate's statistics took three of the four seconds of `mnistops predict` (and 2.7 of the
2.8 s of `mnistops models`, where MLflow's import is all but the listing). A tracking URI
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
    created_ms: int = 0
    """when it was registered, in milliseconds since the epoch"""


def champion_of(settings: Settings, timeout_s: float = 10.0) -> AliasedVersion | None:
    """The version `champion` names on the settings' MLflow server, if any."""
    uri, name = settings.mlflow_uri.rstrip("/"), settings.model_registry.name
    if not uri.startswith(("http://", "https://")):
        return _through_the_client(settings)
    params = {"name": name, "alias": CHAMPION}
    what = f"{name}@{CHAMPION}"
    no_alias: dict[str, Any] = {}
    document = _answer(settings, "registered-models/alias", params, what, no_alias, timeout_s)
    if document is no_alias:
        return None
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


def registered_versions(
    settings: Settings,
) -> tuple[list[AliasedVersion], dict[str, list[str]]]:
    """Every version of the settings' model, newest first, and each version's aliases
    (`model-versions/search`, page by page, and `registered-models/get`)."""
    from mnistops.tracking.server import check_tracking_server

    uri, name = settings.mlflow_uri.rstrip("/"), settings.model_registry.name
    if not uri.startswith(("http://", "https://")):
        return _listed_through_the_client(settings)
    check_tracking_server(settings)
    found: list[AliasedVersion] = []
    params: dict[str, Any] = {"filter": f"name = '{name}'", "max_results": SEARCH_PAGE}
    tokens: set[str] = set()
    while True:
        document = _answer(settings, "model-versions/search", params, f"the versions of {name}")
        found += [from_rest(v, uri) for v in document.get("model_versions") or []]
        token = document.get("next_page_token")
        if not token:
            break
        if str(token) in tokens:  # a server that pages in a circle is not followed forever
            raise TrackingError(
                f"the MLflow server at {uri} answered the same page of {name}'s versions"
                " twice: is it an MLflow server?"
            )
        tokens.add(str(token))
        params = {**params, "page_token": token}
    missing: dict[str, Any] = {"registered_model": {}}
    model = _answer(settings, "registered-models/get", {"name": name}, name, missing)
    try:
        pairs = sorted(
            (str(entry["alias"]), str(entry["version"]))
            for entry in model["registered_model"].get("aliases") or []
        )
        newest_first = sorted(found, key=lambda v: int(v.version), reverse=True)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise TrackingError(
            f"the MLflow server at {uri} answered {name} without its aliases or versions:"
            " is it an MLflow server?"
        ) from None
    alias_of: dict[str, list[str]] = {}
    for alias, version in pairs:
        alias_of.setdefault(version, []).append(alias)
    return newest_first, alias_of


SEARCH_PAGE = 1000
"""versions asked for at a time (MLflow's server answers at most 200,000)"""


def _answer(
    settings: Settings,
    path: str,
    params: dict[str, Any],
    what: str,
    missing: dict[str, Any] | None = None,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """The JSON document of a GET of MLflow's REST API; `missing` when the server says
    the model (or alias) does not exist (if given), else TrackingError naming the server."""
    answer = rest_get(settings, f"/api/2.0/mlflow/{path}", params, timeout_s)
    document = _json(answer)
    if answer.status_code == 200:
        return document
    if missing is not None and document.get("error_code") in NOT_THERE:
        return missing
    raise TrackingError(
        f"the MLflow server at {settings.mlflow_uri.rstrip('/')} answered"
        f" {answer.status_code} when asked for {what}:"
        f" {document.get('message') or answer.text[:200]}"
    )


def from_rest(version: dict[str, Any], uri: str) -> AliasedVersion:
    """A `model_version` of MLflow's REST answer; TrackingError if it is not one."""
    try:
        return AliasedVersion(
            name=str(version["name"]),
            version=str(version["version"]),
            source=str(version.get("source", "")),
            run_id=version.get("run_id") or None,
            tags={str(t["key"]): str(t.get("value", "")) for t in version.get("tags", [])},
            created_ms=int(version.get("creation_timestamp") or 0),
        )
    except (KeyError, TypeError, AttributeError, ValueError):
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


def _listed_through_the_client(
    settings: Settings,
) -> tuple[list[AliasedVersion], dict[str, list[str]]]:
    from mlflow.exceptions import MlflowException

    from mnistops.clients import mlflow_client
    from mnistops.tracking.registry import aliases, versions

    name = settings.model_registry.name
    try:
        client = mlflow_client(settings)
        found = versions(client, name)
        alias_of = aliases(client, name)
    except (MlflowException, OSError, ValueError) as exc:
        raise TrackingError(
            f"the model registry at {settings.mlflow_uri}: {exc}; set mlflow.tracking_uri"
            " to an MLflow server's http(s) URL (`mnistops stack env` prints this stack's)"
        ) from None
    return [
        AliasedVersion(
            str(v.name),
            str(v.version),
            str(v.source),
            v.run_id,
            v.tags or {},
            int(v.creation_timestamp or 0),
        )
        for v in found
    ], alias_of
