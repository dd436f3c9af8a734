"""The MLflow contract: every name mnistops writes to MLflow and reads back from it.

Users' scripts and dashboards read these names too: they are promised, listed in
`docs/mlflow.md` (a test keeps the page and this module in step). Every reader and
writer in the package uses the constants here, never the strings.
"""

from __future__ import annotations

# The registry
CHAMPION = "champion"
"""the alias of the model version that is served; moved only by the gate or by hand"""

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""an experiment tag: without it, MLflow 3's UI opens an experiment on its GenAI pages"""

# Tags of a training run
PHASE_TAG = "phase"
"""`experimental` (`mnistops train`, the demo) or `retraining` (the Prefect flow)"""
EXPERIMENTAL = "experimental"
RETRAINING = "retraining"
UNTRACKED = "untracked"
"""the data version of a run on a plain folder"""
DEVICE_TAG = "device"
DATA_VERSION_TAG = "data_version"
"""the data version trained on (also on the model version), `untracked` for a folder"""
DATA_HASH_TAG = "data_content_hash"
"""the content hash of the training and test images (also on the model version)"""
DATA_TRACKED_TAG = "data_tracked"
DATA_FOLDER_TAG = "data_folder"
DATA_COMMIT_TAG = "data_registry_commit"
PACKAGE_VERSION_TAG = "mnistops_version"
USER_TAG = "user"
CODE_COMMIT_TAG = "code_commit"
MLFLOW_USER_TAG = "mlflow.user"
"""MLflow's own: the user its UI shows"""
MLFLOW_COMMIT_TAG = "mlflow.source.git.commit"
"""MLflow's own: the commit its UI shows"""
FLOW_RUN_ID_TAG = "prefect_flow_run_id"
"""on a run started by the retraining flow: its Prefect flow run"""
FLOW_RUN_NAME_TAG = "prefect_flow_run_name"
ERROR_TAG = "error"
"""on a FAILED or KILLED run: why"""
MODEL_VERSION_TAG = "model_version"
"""on a run: the version it registered"""
CHAMPION_MOVED_TAG = "champion_moved"
GATE_REASON_TAG = "gate_reason"

# Tags of a model version (most also on its run)
ACCURACY_TAG = "test_accuracy"
"""the test accuracy (also the run's metric of that name)"""
RUN_ID_TAG = "run_id"
MODEL_TAG = "model"
"""the architecture: digitnet2, digitnet or seednet"""
RECIPE_TAG = "recipe"
"""16 hex digits naming the hyperparameters that change what is learned"""
SUBSET_TAG = "data_subset"
"""true for a model trained on a share of the images (`--fast`)"""
CHAMPION_REASON_TAG = "champion_reason"
"""on a version that became champion: why"""
CHALLENGER_TAG = "challenger"
"""on a version the gate kept out: why"""
PREVIOUS_TAG = "previous_champion"
"""on a version that became champion: the version it replaced (what `rollback` goes back to)"""
PROMOTED_BY_TAG = "promoted_by"
PROMOTED_AT_TAG = "promoted_at"
PROMOTED_REASON_TAG = "promoted_reason"
GATE_TAGS = (
    "gate_champion",
    "gate_p_value",
    "gate_new_errors",
    "gate_champion_errors",
    "gate_new_only",
    "gate_champion_only",
    "gate_worst_class",
    "gate_worst_class_change",
)
"""on a judged version and its run: the champion it was compared with and the evidence"""
FILES_TAG = "model_files"
"""JSON, path -> SHA-256 of every file of the model (also on the run)"""
SIGNATURE_TAG = "model_signature"
"""HMAC-SHA256 of `model_files` with the stack's model key"""
TRUSTED_BY_TAG = "model_trusted_by"
"""on a version registered elsewhere and signed by hand: who, and when"""

# Metrics of a run (besides per-epoch `train_loss`, `val_accuracy`, ...)
TEST_ACCURACY_METRIC = ACCURACY_TAG
GATE_P_VALUE_METRIC = "gate_p_value"
GATE_WORST_CLASS_METRIC = "gate_worst_class_change"

# Runs of the monitoring experiment (`monitoring.experiment_name`, MNIST-monitoring)
WINDOW_START_TAG = "window_start"
"""the first time of the answers a monitoring run judged (ISO 8601, UTC)"""
WINDOW_END_TAG = "window_end"
"""the time its window ended: the next monitoring run starts there"""
WINDOW_BY_HAND_TAG = "window_by_hand"
"""`true` on a run whose window was asked for (`monitor --here --since`): outside the
chain of windows, the next run does not start at its end"""
MONITORED_MODEL_TAG = "monitored_model"
"""`NAME/VERSION` of the champion whose answers were judged"""
DRIFT_TAG = "drift"
"""`true` when the window was judged drift (the event `mnistops.monitoring.drift` was due)"""
REPORT_TAG = "report"
"""the `s3://` address of the HTML report (also the run's artifact `report.html`)"""
NOTE_TAG = "mlflow.note.content"
"""MLflow's own: the run's description, a line of what the window showed"""
