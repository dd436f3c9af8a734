"""The model registry: every good run becomes a version; `champion` moves only for a better one.

A version's tags hold what the gate and `mnistops models` need (test accuracy, data
version, phase, run). The alias is set last, after the model is fully logged and
registered, so `champion` never points at a half-made version.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
CHALLENGER_TAG = "challenger"
CHAMPION_REASON_TAG = "champion_reason"
ACCURACY_TAG = "test_accuracy"


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


def accuracy_of(version: ModelVersion) -> float | None:
    value = (version.tags or {}).get(ACCURACY_TAG)
    return float(value) if value is not None else None


def decide(accuracy: float, current: float | None, margin: float) -> tuple[bool, str]:
    """Whether a version with `accuracy` takes `champion` from one with `current`."""
    if current is None:
        return True, "first model: no champion yet"
    gain = accuracy - current
    if gain > 0 and gain >= margin:
        return True, f"test accuracy {accuracy:.4f} beats the champion's {current:.4f}"
    wanted = "more than" if margin == 0 else f"at least +{margin:.4f} over"
    return False, f"test accuracy {accuracy:.4f} is not {wanted} the champion's {current:.4f}"


def register(
    client: MlflowClient,
    name: str,
    model_uri: str,
    tags: dict[str, str],
    margin: float,
) -> tuple[ModelVersion, GateDecision]:
    """Register the run's model as a new version of `name`, then apply the champion gate."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=tags)
    current = champion(client, name)
    previous_accuracy = accuracy_of(current) if current else None
    moved, reason = decide(float(tags[ACCURACY_TAG]), previous_accuracy, margin)
    if moved:
        client.set_model_version_tag(name, version.version, CHAMPION_REASON_TAG, reason)
        client.set_registered_model_alias(name, CHAMPION, version.version)
    else:
        client.set_model_version_tag(name, version.version, CHALLENGER_TAG, reason)
    decision = GateDecision(moved, reason, current.version if current else None, previous_accuracy)
    return client.get_model_version(name, version.version), decision


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of the model, newest first."""
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)
