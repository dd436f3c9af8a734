"""`config/flow.yml`: the deployment of the retraining, its schedule, and the model
registry with its champion gate."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)

from mnistops.settings.base import Device, Section

DEFAULT_POOLS: dict[str, Device] = {"mnist-cpu": "cpu", "mnist-gpu": "cuda"}


class DeploymentSettings(Section):
    """`config/flow.yml`, key `deployment`: the Prefect deployment of the retraining flow,
    the work pools `deploy` creates and the one the deployment runs on."""

    flow_name: str = "MNIST"
    deploy_name: str = "mnist-retraining"
    # Declared before pool_name: its validator reads the pools.
    pools: dict[str, Device] = Field(
        default_factory=DEFAULT_POOLS.copy,
        description="work pool -> the device its runs train on",
    )
    pool_name: str = "mnist-cpu"
    queue_name: str = "default"

    @field_validator("pool_name")
    @classmethod
    def _one_of_the_pools(cls, value: str, info: ValidationInfo) -> str:
        pools = info.data.get("pools")
        if pools is not None and value not in pools:
            raise ValueError(
                f"'{value}' is not one of deployment.pools ({', '.join(pools) or 'none'})"
            )
        return value

    @property
    def full_name(self) -> str:
        """`FLOW/DEPLOYMENT`, how Prefect names the deployment."""
        return f"{self.flow_name}/{self.deploy_name}"

    @property
    def device(self) -> Device:
        """The device of the deployment's runs: its pool's."""
        return self.pools[self.pool_name]


class SchedulerSettings(Section):
    """`config/flow.yml`, key `scheduler`: when the retraining runs."""

    method: Literal["interval", "cron", "rrule"] = "cron"
    timezone: str = "UTC"
    interval: int = Field(86400, gt=0, description="seconds between runs (method: interval)")
    cron: str = "0 3 * * *"
    rrule: str = "FREQ=WEEKLY;BYDAY=MO;BYHOUR=3;BYMINUTE=0"


class ModelRegistrySettings(Section):
    """`config/flow.yml`, key `model_registry`: where models go and when `champion` moves."""

    name: str = Field("mnist-classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    champion_margin: float = Field(
        0.0, ge=0, le=1, description="test accuracy a new model must gain to become champion"
    )
    significance: float = Field(
        0.05,
        gt=0,
        le=1,
        description="a new model becomes champion only if the exact one-sided McNemar test"
        " on paired test predictions gives p below this",
    )
    max_class_drop: float = Field(
        0.5,
        ge=0,
        le=100,
        description="most accuracy points any one digit may lose for a new model to become"
        " champion",
    )
    signing_key: SecretStr | None = Field(
        None,
        description="the key that signs the file record of every model mnistops registers;"
        " the same on every machine that trains or loads models. Default with the embedded"
        " MLflow: generated into <home>/model-signing-key",
    )

    @field_validator("signing_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "the model signing key must be at least 32 characters: generate one, e.g."
                " `openssl rand -hex 24`"
            )
        return value


class MonitoringSettings(Section):
    """`config/flow.yml`, key `monitoring`: the flow `MNIST monitoring`, which compares
    the logged predictions of each window with the champion's training data."""

    flow_name: str = "MNIST monitoring"
    deploy_name: str = "mnist-monitoring"
    interval_s: int = Field(3600, ge=60, le=7 * 86400, description="seconds between runs")
    experiment_name: str = Field(
        "MNIST-monitoring", min_length=1, description="the MLflow experiment of its runs"
    )
    min_predictions: int = Field(
        100, ge=20, le=1_000_000, description="a window with fewer is reported, never judged"
    )
    reference_images: int = Field(
        5000, ge=500, le=60_000, description="training images the inputs are compared with"
    )
    alpha: float = Field(
        0.001, gt=0, lt=1, description="significance of each test (Bonferroni across them)"
    )
    min_effect: float = Field(
        0.15,
        gt=0,
        le=1,
        description="a shift counts only this large too: the KS statistic of an input"
        " feature, or the total variation of the predicted digits",
    )
    low_confidence: float = Field(0.5, gt=0, lt=1, description="an answer below this is unsure")
    max_low_confidence_share: float = Field(
        0.15, gt=0, le=1, description="drift when more answers than this are unsure"
    )
    min_feedback: int = Field(
        20, ge=1, description="labels a window needs before its feedback accuracy is judged"
    )
    min_feedback_accuracy: float = Field(
        0.5,
        ge=0,
        le=1,
        description="an alarm below this share of labelled answers right (people label"
        " mostly the wrong ones: keep it low)",
    )
    retrain_on_drift: bool = Field(
        True, description="the retraining deployment runs on the newest data on a drift event"
    )

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.deploy_name}"
