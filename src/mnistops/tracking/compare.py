"""Two registered versions side by side: what `mnistops models --compare A B` prints.

Each version's figures come from its run (metrics, hyperparameters); when both runs
stored predictions on the same test images, the paired test says whether B is better
than A beyond noise, as the champion gate would judge it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mnistops.errors import BadInput
from mnistops.settings import Settings
from mnistops.tracking.contract import ACCURACY_TAG, DATA_VERSION_TAG
from mnistops.tracking.predictions import stored_digests, verified
from mnistops.tracking.registry import aliases, versions
from mnistops.tracking.significance import Paired, paired
from mnistops.train.robustness import KINDS

PARAMS = ("model", "n_epochs", "batch_size", "learning_rate", "label_smoothing", "precision")


class NoSuchVersion(BadInput):
    pass


@dataclass(frozen=True)
class Row:
    label: str
    a: str
    b: str
    change: str = ""


@dataclass(frozen=True)
class Comparison:
    name: str
    a: str
    b: str
    rows: list[Row]
    evidence: Paired | None
    """B against A on the same test images; None when the runs share none"""
    why_not_paired: str = ""


def _version(client: MlflowClient, name: str, number: str) -> ModelVersion:
    try:
        return client.get_model_version(name, number)
    except MlflowException:
        known = ", ".join(v.version for v in versions(client, name)) or "none"
        raise NoSuchVersion(f"{name} has no version '{number}' (registered: {known})") from None


def _run_data(
    client: MlflowClient, version: ModelVersion
) -> tuple[dict[str, float], dict[str, str]]:
    if not version.run_id:
        return {}, {}
    try:
        run = client.get_run(version.run_id)
    except MlflowException:
        return {}, {}
    return dict(run.data.metrics), dict(run.data.params)


def _number(text: str | None) -> float | None:
    """A tag's number (tags are anyone's text), or None."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def _points(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{100 * (b - a):+.2f} pts"


def _metric_rows(ma: dict[str, float], mb: dict[str, float]) -> list[Row]:
    rows = []
    shown = [(ACCURACY_TAG, "test accuracy")]
    shown += [(f"test_accuracy_digit_{d}", f"  digit {d}") for d in range(10)]
    shown += [(f"robust_accuracy_{k}", f"robust: {k}") for k in (*KINDS, "all")]
    for key, label in shown:
        a, b = ma.get(key), mb.get(key)
        if a is not None or b is not None:
            rows.append(Row(label, _percent(a), _percent(b), _points(a, b)))
    for key, label, fmt in (
        ("test_loss", "test loss", "{:.4f}"),
        ("test_ece", "calibration error (ECE)", "{:.4f}"),
        ("train_seconds", "training seconds", "{:.0f}"),
    ):
        a, b = ma.get(key), mb.get(key)
        if a is not None or b is not None:
            change = "" if a is None or b is None else fmt.replace("{:", "{:+").format(b - a)
            rows.append(
                Row(
                    label,
                    "" if a is None else fmt.format(a),
                    "" if b is None else fmt.format(b),
                    change,
                )
            )
    return rows


def _paired(client: MlflowClient, a: ModelVersion, b: ModelVersion) -> tuple[Paired | None, str]:
    if not (a.run_id and b.run_id):
        return None, "a version without a run has no stored test predictions"
    common = sorted(set(stored_digests(client, a.run_id)) & set(stored_digests(client, b.run_id)))
    for digest in common:
        found_a, found_b = verified(client, a.run_id, digest), verified(client, b.run_id, digest)
        if found_a is None or found_b is None:
            continue
        if np.array_equal(found_a[1], found_b[1]):
            return paired(found_a[1], found_b[0], found_a[0]), ""
    return None, "the two runs stored no (intact) predictions on the same test images"


def compare(client: MlflowClient, name: str, a_number: str, b_number: str) -> Comparison:
    a, b = _version(client, name, a_number), _version(client, name, b_number)
    (ma, pa), (mb, pb) = _run_data(client, a), _run_data(client, b)
    ta, tb = a.tags or {}, b.tags or {}
    alias_of = aliases(client, name)
    for metrics, tags in ((ma, ta), (mb, tb)):
        tagged = _number(tags.get(ACCURACY_TAG))
        if ACCURACY_TAG not in metrics and tagged is not None:
            metrics[ACCURACY_TAG] = tagged
    rows = [
        Row(
            "aliases",
            ", ".join(alias_of.get(a.version, [])),
            ", ".join(alias_of.get(b.version, [])),
        ),
        Row("data version", ta.get(DATA_VERSION_TAG, ""), tb.get(DATA_VERSION_TAG, "")),
        *(Row(p, pa.get(p, ""), pb.get(p, "")) for p in PARAMS if p in pa or p in pb),
        *_metric_rows(ma, mb),
    ]
    evidence, why = _paired(client, a, b)
    return Comparison(name, a.version, b.version, rows, evidence, why)


def compare_versions(settings: Settings, a: str, b: str) -> Comparison:
    """`compare` on the settings' registry."""
    from mnistops.clients import mlflow_client
    from mnistops.tracking.server import check_tracking_server

    check_tracking_server(settings)
    return compare(mlflow_client(settings), settings.model_registry.name, a, b)
