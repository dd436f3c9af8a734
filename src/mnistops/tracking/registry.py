"""The model registry: every good run becomes a version; `champion` moves only for a better one.

"Better" is judged on paired test predictions (`tracking.significance`): better beyond
noise, and no digit much worse. A version's tags hold what `mnistops models` shows (test
accuracy, data version, phase, run, the gate's decision and evidence). The alias is set
last, after the model is fully logged and registered and the decision recorded, so
`champion` never points at a half-made version.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mnistops.clients import mlflow_tracking_uri
from mnistops.tracking.contract import (
    CHALLENGER_TAG,
    CHAMPION,
    CHAMPION_REASON_TAG,
    GATE_TAGS,
    PREVIOUS_TAG,
    RUN_ID_TAG,
)
from mnistops.tracking.model_record import ModelRefused, record_problem
from mnistops.tracking.predictions import ChampionPredictions
from mnistops.tracking.server import NOT_THERE
from mnistops.tracking.significance import Paired, evidence_of, judge, paired


@dataclass(frozen=True)
class GateRules:
    """When a new version takes `champion` (`model_registry` in config/flow.yml)."""

    significance: float = 0.05
    max_class_drop: float = 0.5
    margin: float = 0.0


@dataclass(frozen=True)
class Candidate:
    """What the gate judges: the new version's predictions on the test set, and how to
    get the champion's predictions on the same images."""

    labels: np.ndarray
    predicted: np.ndarray
    champion_predictions: ChampionPredictions
    signing_key: bytes | None
    """checks that the champion was registered by mnistops (`tracking.model_files`)"""
    load_champion: Callable[[ModelVersion], object] | None = None
    """the champion loaded the one checked way (its files downloaded and compared with
    its record): ModelRefused makes it "no usable champion", as predict would say"""


@dataclass(frozen=True)
class GateDecision:
    moved: bool
    reason: str
    previous_version: str | None
    evidence: Paired | None = None


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in NOT_THERE:
            return None
        raise


def evidence_tags(champion_version: str, evidence: Paired) -> dict[str, str]:
    values = (
        champion_version,
        f"{evidence.p_value:.6g}",
        str(evidence.new_errors),
        str(evidence.champion_errors),
        str(evidence.new_only),
        str(evidence.champion_only),
        str(evidence.worst_class),
        f"{evidence.worst_class_change:+.2f}",
    )
    return dict(zip(GATE_TAGS, values, strict=True))


Lock = Callable[[], AbstractContextManager[object]]


def _decided(client: MlflowClient, name: str, version: ModelVersion) -> GateDecision | None:
    """The decision already recorded on a version (a retried registration), if any."""
    tags = version.tags or {}
    evidence = evidence_of(tags)
    compared = tags.get(GATE_TAGS[0])
    if CHAMPION_REASON_TAG in tags:
        return GateDecision(True, tags[CHAMPION_REASON_TAG], compared, evidence)
    if CHALLENGER_TAG in tags:
        return GateDecision(False, tags[CHALLENGER_TAG], compared, evidence)
    return None


def _compare(
    client: MlflowClient, name: str, current: ModelVersion, candidate: Candidate, rules: GateRules
) -> tuple[bool, str, Paired | None]:
    """(moves, why, evidence) of the candidate against the champion `current`. A champion
    that cannot be loaded is no champion: any model that can replaces it."""
    broken = model_problem(client, name, current, candidate.signing_key)
    if broken is None:
        try:
            if candidate.load_champion is not None:
                candidate.load_champion(current)
            theirs = candidate.champion_predictions(current)
        except ModelRefused as exc:
            broken = str(exc)
        except Exception as exc:  # noqa: BLE001  never crown a model we could not compare
            return (
                False,
                f"the champion v{current.version} could not be scored on the test images now"
                f" ({exc.__class__.__name__}: {exc}); champion stays: the next run compares"
                " again",
                None,
            )
    if broken is not None:
        return (
            True,
            f"the champion v{current.version} cannot be loaded ({broken}); this model,"
            " which can, replaces it",
            None,
        )
    evidence = paired(candidate.labels, candidate.predicted, theirs)
    images = len(candidate.labels)
    moved, why = judge(evidence, rules.significance, rules.max_class_drop, rules.margin, images)
    return moved, f"against v{current.version}, {why}", evidence


def gate(
    client: MlflowClient,
    name: str,
    version: ModelVersion,
    candidate: Candidate,
    rules: GateRules,
    lock: Lock,
) -> GateDecision:
    """Decide whether `version` takes `champion`, holding `lock` (one gate at a time,
    across machines) from reading the champion to moving the alias. The decision and
    its evidence are written to the version's tags before the alias moves."""
    with lock():
        current = champion(client, name)
        evidence = None
        if current is None:
            moved, reason = True, "first model: no champion yet"
        else:
            moved, reason, evidence = _compare(client, name, current, candidate, rules)
        tags = {CHAMPION_REASON_TAG if moved else CHALLENGER_TAG: reason}
        if current is not None and evidence is not None:
            tags.update(evidence_tags(current.version, evidence))
        if moved and current is not None:
            tags[PREVIOUS_TAG] = current.version
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
        if moved:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    return GateDecision(moved, reason, current.version if current else None, evidence)


def model_problem(
    client: MlflowClient, name: str, version: ModelVersion, key: bytes | None
) -> str | None:
    """Why a version's model will not load, as far as its tags and file list tell (no
    download): no signed file record, or no MLmodel file in the artifact store. None
    when neither, and when the store cannot be asked now (a passing failure must never
    crown a worse model)."""
    import mlflow

    refused = record_problem(version.tags or {}, key, str(version.source), version.version)
    if refused is not None:
        return refused
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
        run_id=tags[RUN_ID_TAG],
        tags=tags,
        model_id=model_uri.removeprefix("models:/"),
    )


def register(
    client: MlflowClient,
    name: str,
    model_uri: str,
    tags: dict[str, str],
    candidate: Candidate,
    rules: GateRules,
    lock: Lock,
) -> tuple[ModelVersion, GateDecision]:
    """Register the run's model as a version of `name`, then apply the champion gate.

    Idempotent: a retry finds the version of its own run and finishes it (its tags, the
    gate) instead of registering another; a decision already made is kept.
    """
    version = version_of_run(client, name, tags[RUN_ID_TAG])
    if version is None:
        version = _new_version(client, name, model_uri, tags)
    else:
        for key, value in tags.items():
            if (version.tags or {}).get(key) != value:
                client.set_model_version_tag(name, version.version, key, value)
    version = client.get_model_version(name, version.version)
    decision = _decided(client, name, version) or gate(
        client, name, version, candidate, rules, lock
    )
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
