"""The model registry: every good run becomes a version; `champion` moves only for a better one.

A version's tags hold what the gate and `mnistops models` need (test accuracy, data
version, phase, run). The alias is set last, after the model is fully logged and
registered, so `champion` never points at a half-made version.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mnistops.clients import mlflow_tracking_uri
from mnistops.errors import BadInput
from mnistops.settings import Settings

CHAMPION = "champion"
CHALLENGER_TAG = "challenger"
CHAMPION_REASON_TAG = "champion_reason"
ACCURACY_TAG = "test_accuracy"
PREVIOUS_TAG = "previous_champion"
"""on a version that became champion: the version it replaced (what `rollback` goes back to)"""
PROMOTED_BY_TAG = "promoted_by"
PROMOTED_AT_TAG = "promoted_at"
PROMOTED_REASON_TAG = "promoted_reason"


@dataclass(frozen=True)
class GateDecision:
    moved: bool
    reason: str
    previous_version: str | None
    previous_accuracy: float | None


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def accuracy_of(client: MlflowClient, version: ModelVersion) -> float | None:
    """A version's test accuracy: its tag, else its run's metric (a version registered by
    hand has no tag); None if neither is known."""
    value = (version.tags or {}).get(ACCURACY_TAG)
    if value is not None:
        return float(value)
    if version.run_id:
        try:
            metric = client.get_run(version.run_id).data.metrics.get(ACCURACY_TAG)
        except MlflowException:
            return None
        return float(metric) if metric is not None else None
    return None


def decide(accuracy: float, current: float | None, margin: float) -> tuple[bool, str]:
    """Whether a version with `accuracy` takes `champion` from one with `current`."""
    if current is None:
        return True, "first model: no champion yet"
    gain = accuracy - current
    if gain > 0 and gain >= margin:
        return True, f"test accuracy {accuracy:.4f} beats the champion's {current:.4f}"
    wanted = "more than" if margin == 0 else f"at least +{margin:.4f} over"
    return False, f"test accuracy {accuracy:.4f} is not {wanted} the champion's {current:.4f}"


Lock = Callable[[], AbstractContextManager[object]]


def _decided(client: MlflowClient, name: str, version: ModelVersion) -> GateDecision | None:
    """The decision already recorded on a version (a retried registration), if any."""
    tags = version.tags or {}
    if CHAMPION_REASON_TAG in tags:
        return GateDecision(True, tags[CHAMPION_REASON_TAG], None, None)
    if CHALLENGER_TAG in tags:
        return GateDecision(False, tags[CHALLENGER_TAG], None, None)
    return None


def gate(
    client: MlflowClient, name: str, version: ModelVersion, margin: float, lock: Lock
) -> GateDecision:
    """Decide whether `version` takes `champion`, holding `lock` (one gate at a time,
    across machines) from reading the champion to moving the alias."""
    accuracy = float((version.tags or {})[ACCURACY_TAG])
    with lock():
        current = champion(client, name)
        previous = accuracy_of(client, current) if current else None
        broken = model_problem(client, name, current) if current else None
        if current is not None and broken is not None:
            moved, reason = (
                True,
                (
                    f"the champion v{current.version} cannot be loaded ({broken}); this model,"
                    " which can, replaces it"
                ),
            )
        elif current is not None and previous is None:
            moved, reason = (
                False,
                (
                    f"the champion v{current.version} has no recorded test accuracy: compare"
                    " by hand and promote the better one"
                ),
            )
        else:
            moved, reason = decide(accuracy, previous, margin)
        if moved:
            client.set_model_version_tag(name, version.version, CHAMPION_REASON_TAG, reason)
            if current is not None:
                client.set_model_version_tag(name, version.version, PREVIOUS_TAG, current.version)
            client.set_registered_model_alias(name, CHAMPION, version.version)
        else:
            client.set_model_version_tag(name, version.version, CHALLENGER_TAG, reason)
    return GateDecision(moved, reason, current.version if current else None, previous)


def model_problem(client: MlflowClient, name: str, version: ModelVersion) -> str | None:
    """Why a version's model cannot be loaded: its MLmodel file is not in the artifact
    store. None when it is there, and when the store cannot be asked now (a passing
    failure must never crown a worse model)."""
    import mlflow

    try:
        uri = client.get_model_version_download_uri(name, version.version)
        with mlflow_tracking_uri(client.tracking_uri):
            listed = mlflow.artifacts.list_artifacts(uri, tracking_uri=client.tracking_uri)
    except Exception:  # noqa: BLE001
        return None
    found = {a.path.rsplit("/", 1)[-1] for a in listed}
    return None if "MLmodel" in found else "its MLmodel file is missing"


def version_of_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version of `name` registered from run `run_id`, if there is one."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _new_version(
    client: MlflowClient, name: str, model_uri: str, tags: dict[str, str]
) -> ModelVersion:
    """What `mlflow.register_model` does for a logged model (`models:/<model id>`),
    through the client, which prints nothing of its own."""
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(
        name,
        source=model_uri,
        run_id=tags["run_id"],
        tags=tags,
        model_id=model_uri.removeprefix("models:/"),
    )


def register(
    client: MlflowClient,
    name: str,
    model_uri: str,
    tags: dict[str, str],
    margin: float,
    lock: Lock,
) -> tuple[ModelVersion, GateDecision]:
    """Register the run's model as a version of `name`, then apply the champion gate.

    Idempotent: a retry finds the version of its own run and finishes it (its tags, the
    gate) instead of registering another; a decision already made is kept.
    """
    version = version_of_run(client, name, tags["run_id"])
    if version is None:
        version = _new_version(client, name, model_uri, tags)
    else:
        for key, value in tags.items():
            if (version.tags or {}).get(key) != value:
                client.set_model_version_tag(name, version.version, key, value)
    version = client.get_model_version(name, version.version)
    decision = _decided(client, name, version) or gate(client, name, version, margin, lock)
    return client.get_model_version(name, version.version), decision


def aliases(client: MlflowClient, name: str) -> dict[str, list[str]]:
    """version -> its aliases. Read from the registered model: `search_model_versions`
    returns versions without their aliases."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    found: dict[str, list[str]] = {}
    for alias, version in sorted((model.aliases or {}).items()):
        found.setdefault(str(version), []).append(alias)
    return found


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of the model, newest first."""
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def registered_versions(settings: Settings) -> tuple[list[ModelVersion], dict[str, list[str]]]:
    """Every version of the settings' model, newest first, and each version's aliases."""
    from mnistops.clients import mlflow_client
    from mnistops.tracking.server import TrackingError, check_tracking_server

    check_tracking_server(settings)
    client = mlflow_client(settings)
    name = settings.model_registry.name
    try:
        return versions(client, name), aliases(client, name)
    except MlflowException as exc:
        raise TrackingError(f"the model registry at {settings.mlflow_uri}: {exc}") from None


class PromotionRefused(BadInput):
    """`models promote` or `rollback` cannot move the alias; the message says why."""


@dataclass(frozen=True)
class Promotion:
    version: str
    previous: str | None
    reason: str


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    reason: str,
    user: str,
    lock: Lock,
    rollback: bool = False,
) -> Promotion:
    """Move `champion` to `version` by hand, holding the gate's lock. Refused when the
    version does not exist, is champion already, or its model cannot be loaded. The
    version's tags record who, when and why (`promoted_*`), and the champion it replaced
    (`previous_champion`). A `rollback` keeps the target's own `previous_champion`, so
    the next rollback goes further back; no promotion overwrites a gate's reason."""
    import datetime as dt

    with lock():
        try:
            target = client.get_model_version(name, version)
        except MlflowException:
            known = ", ".join(v.version for v in versions(client, name)) or "none"
            raise PromotionRefused(
                f"{name} has no version {version} (registered: {known})"
            ) from None
        current = champion(client, name)
        if current is not None and current.version == target.version:
            raise PromotionRefused(f"{name} v{version} is champion already")
        problem = model_problem(client, name, target)
        if problem is not None:
            raise PromotionRefused(f"{name} v{version} cannot be served: {problem}")
        why = f"promoted by {user}: {reason}"
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        tags = {PROMOTED_BY_TAG: user, PROMOTED_AT_TAG: now, PROMOTED_REASON_TAG: why}
        if CHAMPION_REASON_TAG not in (target.tags or {}):
            tags[CHAMPION_REASON_TAG] = why
        if not rollback:
            tags[PREVIOUS_TAG] = current.version if current is not None else ""
        for key, value in tags.items():
            client.set_model_version_tag(name, target.version, key, value)
        client.set_registered_model_alias(name, CHAMPION, target.version)
    return Promotion(target.version, current.version if current else None, why)


def previous_champion(client: MlflowClient, name: str) -> tuple[str, str]:
    """(the champion, the version it replaced): what `rollback` goes back to."""
    current = champion(client, name)
    if current is None:
        raise PromotionRefused(f"{name} has no champion: nothing to roll back")
    previous = (current.tags or {}).get(PREVIOUS_TAG)
    if not previous:
        raise PromotionRefused(
            f"{name} v{current.version} replaced no recorded champion: promote a version"
            " by hand (`mnistops models promote VERSION`)"
        )
    return current.version, previous


def _user(settings: Settings) -> str:
    import getpass

    return settings.developer_name or getpass.getuser()


def promote_champion(
    settings: Settings, version: str, reason: str, rollback: bool = False
) -> Promotion:
    """`promote` on the settings' registry, holding the stack-wide gate lock."""
    from mnistops.clients import mlflow_client
    from mnistops.stack.locks import champion_lock_name, held
    from mnistops.tracking.server import check_tracking_server

    check_tracking_server(settings)
    name = settings.model_registry.name
    return promote(
        mlflow_client(settings),
        name,
        version,
        reason,
        _user(settings),
        lambda: held(settings, champion_lock_name(name)),
        rollback,
    )


def roll_back_champion(settings: Settings, reason: str) -> Promotion:
    """Back to the champion the current one replaced."""
    from mnistops.clients import mlflow_client
    from mnistops.tracking.server import check_tracking_server

    check_tracking_server(settings)
    current, previous = previous_champion(mlflow_client(settings), settings.model_registry.name)
    return promote_champion(
        settings, previous, f"rollback from v{current}: {reason}", rollback=True
    )
