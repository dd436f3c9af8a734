"""`config/dataset.yml` and `config/hyp.yml`: how MNIST is split, and how a model is
trained."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from mnistops.settings.base import Device, Section


class DatasetSettings(Section):
    """`config/dataset.yml`, key `dataset`: how MNIST is split into PNG folders."""

    name: str = Field("MNIST", pattern=r"^[A-Za-z0-9_.-]+$")
    train_size: int = Field(30000, ge=10, le=60000, description="images in train/")
    new_data_size: int = Field(
        30000, ge=0, le=60000, description="images kept aside in train_v2/ as new data"
    )
    test_size: int = Field(10000, ge=10, le=10000, description="images in test/")
    fast_fraction: float = Field(0.02, gt=0, le=1, description="share of each split in --fast")
    registry: Path | None = Field(None, description="git+DVC registry; default <home>/registry")

    @model_validator(mode="after")
    def _fits_mnist(self) -> DatasetSettings:
        if self.train_size + self.new_data_size > 60000:
            raise ValueError(
                "train_size + new_data_size must be at most 60000 (MNIST's training set)"
            )
        return self


class HyperParameters(Section):
    """`config/hyp.yml`, key `hyperparameter`: the tutorial's keys, then ours."""

    random_seed: int = Field(42, ge=0, le=2**32 - 1)
    val_size: float = Field(0.1, gt=0, lt=1, description="share of train held out to validate")
    shuffle_data: bool = True
    batch_size: int = Field(256, gt=0)
    learning_rate: float = Field(0.008, gt=0)
    n_epochs: int = Field(8, gt=0)
    model: str = Field(
        "digitnet2",
        description="digitnet2 (our default), digitnet (the default before it) or seednet"
        " (the tutorial's CNN)",
    )
    schedule: Literal["constant", "onecycle"] = "onecycle"
    weight_decay: float = Field(0.01, ge=0)
    augment: bool = Field(True, description="random small shifts, turns and zooms while training")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    calibrate: bool = Field(
        True,
        description="fit a temperature on the validation images so that confidence matches"
        " accuracy (folded into the last layer; the predicted digits do not change)",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="arithmetic of the training steps on the CPU: bf16 where the CPU has it"
        " natively (auto), else fp32; evaluation is always fp32",
    )
    device: Device = "auto"
    threads: int | None = Field(None, gt=0, description="CPU threads; default: all cores")
