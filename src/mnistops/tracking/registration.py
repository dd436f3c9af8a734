"""Registering a run's model: logged in mnistops' format, its file record signed, the
version made (or finished, when retried), judged by the champion gate, the decision
written on the run. And what becomes of a run's model when its training is interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities.model_registry import ModelVersion

from mnistops.clients import mlflow_client
from mnistops.settings import HyperParameters, Settings
from mnistops.tracking import contract as c
from mnistops.tracking import model_fetch, model_files, model_record
from mnistops.tracking.predictions import LabelledImages, champion_predictions
from mnistops.tracking.registry import Candidate, GateDecision, GateRules, register
from mnistops.tracking.runs import TrackedRun, log_metrics, recipe_of
from mnistops.train.data import Arrays
from mnistops.train.loop import TrainResult


def _log_model(
    run: TrackedRun, hyp: HyperParameters, result: TrainResult, arrays: Arrays, key: bytes
) -> tuple[str, dict[str, str]]:
    """(the logged model's URI, its signed file record). The model is saved here first
    (MLflow's PyTorch format with an exported `pt2` archive, for MLflow's own tools, and
    mnistops' weights, architecture and ONNX graph beside it, what mnistops loads), its
    record made from these local files, then uploaded and read back: anything changed or
    added on the server meanwhile is refused, so only what mnistops wrote is signed."""
    import tempfile

    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    example = (arrays.test_x[:2].astype(np.float32) / 255.0)[:, None]
    model = result.model.to("cpu")
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        weights = model_files.save_weights(model, Path(tmp))
        digits = np.asarray(result.test.predicted)
        graph = model_files.save_graph(weights, hyp.model)
        graph_checked = model_files.onnx_check(graph, hyp.model, arrays.test_x, digits)
        # NumPy answers only where the graph did not pass: one check per registration
        checked = (
            None
            if model_files.passed(graph_checked)
            else model_files.numpy_check(weights, hyp.model, arrays.test_x, digits)
        )
        folder = Path(tmp) / "model"
        mlflow.pytorch.save_model(
            model,
            str(folder),
            signature=signature,
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            serialization_format="pt2",
            extra_files=[str(weights), str(graph)],
            metadata=model_files.metadata(hyp.model, checked, graph_checked),
        )
        record = model_record.file_record(folder)
        model_files.check_format(folder)
        logged = run.client.create_logged_model(
            run.experiment_id, name="model", source_run_id=run.run_id
        )
        run.client.log_model_artifacts(logged.model_id, str(folder))
    uri = f"models:/{logged.model_id}"
    with tempfile.TemporaryDirectory(prefix="model-check-") as tmp:
        stored = model_fetch.download(run.client, uri, Path(tmp))
        try:
            model_record.check_files(stored, record)
        except model_files.ModelRefused as exc:
            raise model_files.ModelRefused(
                f"the model's files changed on the MLflow server while they were being"
                f" logged ({exc}): nothing was registered, nothing was signed"
            ) from None
    run.client.finalize_logged_model(logged.model_id, "READY")
    return uri, model_record.record_tags(key, record, uri)


def _registered_record(run: TrackedRun, name: str) -> tuple[str, dict[str, str]] | None:
    """(model URI, signed record) of the version this run registered already (a retried
    registration), if any: it is finished, never logged again."""
    from mnistops.tracking.registry import version_of_run

    version = version_of_run(run.client, name, run.run_id)
    tags = (version.tags or {}) if version is not None else {}
    if version is None or c.FILES_TAG not in tags or c.SIGNATURE_TAG not in tags:
        return None
    return str(version.source), {
        c.FILES_TAG: tags[c.FILES_TAG],
        c.SIGNATURE_TAG: tags[c.SIGNATURE_TAG],
    }


def register_logged(
    settings: Settings, run: TrackedRun, hyp: HyperParameters, arrays: Arrays, result: TrainResult
) -> tuple[str, GateDecision]:
    """Log the model, register it as a new version, apply the champion gate.

    Safe to retry (the flow's task does): a version already registered from this run is
    finished, not registered again; a model logged but not registered is logged anew.
    """
    from mnistops.stack.locks import champion_lock_name, held

    name = settings.model_registry.name
    rules = settings.model_registry
    test = LabelledImages(arrays.test_x, arrays.test_y)
    key = model_record.signing_key(settings)

    def load(version: ModelVersion) -> Any:
        return model_fetch.load_registered(run.client, version, key)

    candidate = Candidate(
        arrays.test_y,
        result.test.predicted,
        champion_predictions(run.client, test, load),
        key,
        load,
    )
    model_uri, record = _registered_record(run, name) or _log_model(run, hyp, result, arrays, key)
    run.client.set_tag(run.run_id, c.FILES_TAG, record[c.FILES_TAG])
    version, decision = register(
        run.client,
        name,
        model_uri,
        {
            c.ACCURACY_TAG: f"{result.test.accuracy:.6f}",
            c.DATA_VERSION_TAG: run.data_version,
            c.DATA_HASH_TAG: arrays.source.content_hash,
            c.PHASE_TAG: run.phase,
            c.RUN_ID_TAG: run.run_id,
            c.MODEL_TAG: hyp.model,
            c.RECIPE_TAG: recipe_of(hyp, len(arrays.train_y)),
            c.SUBSET_TAG: str(arrays.subset_of is not None).lower(),
            **record,
        },
        candidate,
        GateRules(rules.significance, rules.max_class_drop, rules.champion_margin),
        lambda: held(settings, champion_lock_name(name)),
    )
    _log_decision(run, version.version, decision)
    return version.version, decision


def _log_decision(run: TrackedRun, version: str, decision: GateDecision) -> None:
    """The gate's decision and evidence on the run too, where the MLflow UI shows them."""
    from mnistops.tracking.registry import evidence_tags

    tags = {
        c.MODEL_VERSION_TAG: version,
        c.CHAMPION_MOVED_TAG: str(decision.moved).lower(),
        c.GATE_REASON_TAG: decision.reason[:5000],
    }
    metrics = {}
    if decision.evidence is not None and decision.previous_version is not None:
        evidence = decision.evidence
        tags.update(evidence_tags(decision.previous_version, evidence))
        metrics = {
            c.GATE_P_VALUE_METRIC: evidence.p_value,
            c.GATE_WORST_CLASS_METRIC: evidence.worst_class_change,
        }
    log_metrics(run, metrics, tags=tags)


INTERRUPTED_GATE = "its training was interrupted before the champion gate decided"
FAILED_GATE = "its training failed before the champion gate decided"
UNJUDGED = (INTERRUPTED_GATE, FAILED_GATE)
"""challenger reasons of a version the gate never judged (it never counts as trained)"""


def settle_interrupted(settings: Settings, run: TrackedRun) -> str:
    """After Ctrl-C: what became of the run's model. A version registered but not yet
    through the gate is marked a challenger that never counted (a scheduled run does
    not skip because of it). Returns a sentence for the user."""
    return _settle(settings, run, "KILLED", INTERRUPTED_GATE)


def settle_failed(settings: Settings, run: TrackedRun) -> str:
    """After a failure outside the training loop (the gate's lock unreachable, say):
    what became of the run's model, as `settle_interrupted` says it."""
    return _settle(settings, run, "FAILED", FAILED_GATE)


def _settle(settings: Settings, run: TrackedRun, ended: str, unjudged: str) -> str:
    from mnistops.tracking.contract import CHALLENGER_TAG, CHAMPION_REASON_TAG
    from mnistops.tracking.registry import champion, version_of_run

    name = settings.model_registry.name
    try:
        client = mlflow_client(settings)
        version = version_of_run(client, name, run.run_id)
        if version is None:
            return f"the run is marked {ended}, nothing was registered"
        tags = version.tags or {}
        if CHAMPION_REASON_TAG not in tags and CHALLENGER_TAG not in tags:
            client.set_model_version_tag(name, version.version, CHALLENGER_TAG, unjudged)
            return (
                f"the run is marked {ended}; model version {version.version} was registered"
                " but not judged by the champion gate (tagged so), champion did not move"
            )
        current = champion(client, name)
        moved = current is not None and current.version == version.version
        return f"the run is marked {ended}; model version {version.version} was registered and" + (
            " is champion" if moved else " is a challenger"
        )
    except Exception:  # noqa: BLE001  the server may be what failed
        return f"the run is marked {ended}; whether its model was registered is unknown"
