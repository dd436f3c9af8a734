"""The MLflow server: reachable, and taking our login, checked in seconds."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from mnistops.clients import mlflow_login
from mnistops.errors import MnistopsError
from mnistops.settings import Settings
from mnistops.tracking import contract as c

if TYPE_CHECKING:
    import httpx
    from mlflow import MlflowClient


NOT_THERE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
"""MLflow's error codes for a model or alias that does not exist"""


class TrackingError(MnistopsError):
    """The tracking server or registry failed; the message says which and what to do."""


@cache
def rest_client() -> httpx.Client:
    """One HTTP client for this process's REST calls to MLflow: each new one builds its
    TLS context again (a tenth of a second)."""
    import httpx

    return httpx.Client()


def rest_get(
    settings: Settings, path: str, params: dict[str, Any] | None = None, timeout_s: float = 5.0
) -> httpx.Response:
    """GET `path` of the settings' MLflow server with our login; TrackingError naming
    the server, and what to do, when it cannot be reached."""
    import httpx

    uri = settings.mlflow_uri.rstrip("/")
    try:
        return rest_client().get(
            f"{uri}{path}", params=params, auth=mlflow_login(settings), timeout=timeout_s
        )
    except httpx.HTTPError as exc:
        raise TrackingError(
            f"the MLflow server at {uri} cannot be reached ({exc.__class__.__name__});"
            " start the stack (`mnistops stack up`) or set mlflow.tracking_uri"
        ) from None


def check_tracking_server(settings: Settings, timeout_s: float = 5.0) -> None:
    """A clear error, quickly, when the MLflow server cannot be reached or refuses our
    login."""

    uri = settings.mlflow_uri
    if not uri.startswith(("http://", "https://")):
        return
    login = mlflow_login(settings)
    response = rest_get(settings, "/health", timeout_s=timeout_s)
    if response.status_code == 200:
        search = "/api/2.0/mlflow/experiments/search"
        response = rest_get(settings, search, {"max_results": 1}, timeout_s)
    if response.status_code == 403 and "Host header" in response.text:
        raise TrackingError(
            f"the MLflow server at {uri} refused the host name in that URL (it answers only"
            " the names it was started with, against DNS rebinding): use the URL that"
            " `mnistops stack env` prints on the stack host (its `advertise` setting), or add"
            " the name to mlflow.allowed_hosts there"
        )
    if response.status_code in (401, 403):
        raise TrackingError(
            f"the MLflow server at {uri} refused "
            + ("our login" if login else "a request without a login")
            + ": set mlflow.username and mlflow.password (MNISTOPS_MLFLOW__USERNAME,"
            " MNISTOPS_MLFLOW__PASSWORD); for a mnistops stack, `mnistops stack env` prints them"
        )
    if response.status_code != 200:
        raise TrackingError(f"the MLflow server at {uri} answered {response.status_code}")


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id (made if missing), marked as one of model training."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name)
        except MlflowException as exc:  # made by another process just now
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise TrackingError(f"the experiment '{name}' could not be created")
    key, kind = c.EXPERIMENT_KIND
    if (experiment.tags or {}).get(key) != kind:
        client.set_experiment_tag(experiment.experiment_id, key, kind)
    return str(experiment.experiment_id)
