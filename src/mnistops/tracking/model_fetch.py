"""A registered version's files brought from the MLflow server, then checked by
`model_files`: over MLflow's client (`download`), or file by file over the server's REST
route where a lean process must not import that client (`fetch_recorded`); and the two
uses of a whole version, loading it checked and signing it for a person who vouches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnistops.settings import Settings
from mnistops.tracking.contract import TRUSTED_BY_TAG
from mnistops.tracking.model_files import (
    WEIGHTS_PATH,
    ModelRefused,
    ModelUnavailable,
    build_checked,
    check_format,
    check_graph,
    load_checked,
    load_for_answers,
    read_weights,
)
from mnistops.tracking.model_record import file_record, record_tags, signed_record


def download(client: Any, uri: str, destination: Path) -> Path:
    """A model's files (`models:/...`) into `destination`, through the MLflow server."""
    import mlflow

    from mnistops.clients import mlflow_tracking_uri

    try:
        with mlflow_tracking_uri(client.tracking_uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=client.tracking_uri
            )
    except Exception as exc:  # noqa: BLE001  any download failure: named, worth a retry
        raise ModelUnavailable(f"{exc.__class__.__name__}: {exc}") from None
    return Path(local)


LOGGED_MODEL_FILES = "/ajax-api/2.0/mlflow/logged-models/{}/artifacts/files"
"""the MLflow server's route for one file of a logged model (what its UI downloads)"""


def fetch_recorded(settings: Settings, source: str, record: dict[str, str], into: Path) -> bool:
    """The files a version's signed record lists, each fetched over the MLflow server's
    REST API, without importing MLflow's client (a second of import and 100 MB in a
    lean process). False where that route does not apply (a tracking URI that is not
    http(s), a source that is not a logged model): use `download`. ModelUnavailable
    when the server cannot give a file now; the checks that follow refuse anything else.
    """
    from mnistops.tracking.server import TrackingError, rest_get

    model_id = source.removeprefix("models:/")
    if not settings.mlflow_uri.startswith(("http://", "https://")) or not (
        source.startswith("models:/m-") and model_id.replace("-", "").isalnum()
    ):
        return False
    route = LOGGED_MODEL_FILES.format(model_id)
    for name in record:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise ModelRefused(f"the record names {name!r}, a path outside the model")
        try:
            answer = rest_get(settings, route, {"artifact_file_path": name}, timeout_s=60)
        except TrackingError as exc:
            raise ModelUnavailable(str(exc)) from None
        if answer.status_code >= 500 or answer.status_code == 429:
            raise ModelUnavailable(f"the MLflow server answered {answer.status_code} for {name}")
        if answer.status_code == 200:
            target = into.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(answer.content)
    return True


def load_registered(client: Any, version: Any, key: bytes | None, for_answers: bool = False) -> Any:
    """A registered version's model, downloaded into a temporary folder and checked: as a
    PyTorch module, what the gate scores; or `for_answers`, as `predict` and `serve` will
    load it (NumPy where checked at registration), what `models promote` tries before
    moving the alias."""
    import tempfile

    source = str(version.source)
    signed_record(version.tags or {}, key, source, str(version.version))
    uri = f"models:/{version.name}/{version.version}"
    load = load_for_answers if for_answers else load_checked
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        return load(download(client, uri, Path(tmp)), version.tags or {}, key, source)


def trust(client: Any, version: Any, key: bytes, who: str) -> dict[str, str]:
    """Sign the files a version has now, for a person who vouches for them (`models
    promote --trust-unsigned`): only a model in mnistops' format can be trusted, and
    its weights must load. Returns the tags written."""
    import tempfile

    uri = f"models:/{version.name}/{version.version}"
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        folder = download(client, uri, Path(tmp))
        record = file_record(folder)
        architecture = check_format(folder)
        arrays = read_weights(folder / WEIGHTS_PATH)
        build_checked(architecture, arrays)
        check_graph(folder, architecture, arrays)
    tags = {**record_tags(key, record, str(version.source)), TRUSTED_BY_TAG: who}
    for name, value in tags.items():
        client.set_model_version_tag(version.name, version.version, name, value)
    return tags
