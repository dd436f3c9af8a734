"""The training loop: tensors in memory, seeded, with a callback per batch and per epoch."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnistops.compat import bf16_is_native
from mnistops.errors import MnistopsError
from mnistops.settings import HyperParameters
from mnistops.train import models
from mnistops.train.architecture import unknown_model
from mnistops.train.data import Arrays


class TrainingError(MnistopsError):
    """Training cannot start or cannot go on; the message says why."""


class NonFiniteLoss(TrainingError):
    def __init__(self, epoch: int):
        super().__init__(f"non-finite loss at epoch {epoch}")
        self.epoch = epoch


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    images_per_s: float


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    predicted: np.ndarray
    confidence: np.ndarray


@dataclass
class Fitted:
    """A trained model and its epochs, before the test images are seen."""

    model: nn.Module
    device: str
    epochs: list[EpochMetrics]
    train_seconds: float
    """wall time of the epochs (training and validation), not of loading or testing"""
    train_images: int
    val_images: int
    threads: int
    temperature: float = 1.0
    """what the logits were divided by so that confidence matches accuracy (1: not scaled)"""

    @property
    def images_per_s(self) -> float:
        trained = sum(e.images_per_s * e.seconds for e in self.epochs)
        return trained / max(sum(e.seconds for e in self.epochs), 1e-9)


@dataclass(kw_only=True)
class TrainResult(Fitted):
    test: Evaluation


def pick_device(wanted: str) -> str:
    """'auto' -> cuda when there is one, else cpu; 'cuda' without one is an error."""
    available = torch.cuda.is_available()
    if wanted == "cuda" and not available:
        raise TrainingError(
            "device 'cuda' was asked for, but this machine has no usable CUDA GPU"
            " (torch.cuda.is_available() is False); use --device cpu or auto"
        )
    if wanted == "auto":
        return "cuda" if available else "cpu"
    return wanted


def check_hyperparameters(hyp: HyperParameters) -> None:
    """What pydantic does not see: the model name must be one we have."""
    why = unknown_model(hyp.model)
    if why:
        raise TrainingError(why)


def as_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """(N, 1, 28, 28) floats in [0, 1]; with one channel this layout is channels_last too."""
    tensor = torch.from_numpy(np.array(images)).to(device).unsqueeze(1).float().div_(255.0)
    return tensor.contiguous(memory_format=torch.channels_last)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (up to 2 px), turn (up to 10 degrees) and zoom (+-10 %) per image."""
    n = batch.shape[0]
    rand = torch.rand(n, 4, generator=generator, device="cpu").to(batch.device) * 2 - 1
    angle = rand[:, 0] * math.radians(10)
    scale = 1 + rand[:, 1] * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = rand[:, 2:] * (2 * 2 / 28)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, align_corners=False, padding_mode="zeros")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> Evaluation:
    model.eval()
    losses, predicted, confidence = [], [], []
    with torch.no_grad():
        for start in range(0, len(y), batch):
            logits = model(x[start : start + batch])
            target = y[start : start + batch]
            losses.append(F.cross_entropy(logits, target, reduction="sum").item())
            probs = logits.softmax(1)
            conf, pred = probs.max(1)
            predicted.append(pred.cpu().numpy())
            confidence.append(conf.cpu().numpy())
    predicted_all = np.concatenate(predicted) if predicted else np.zeros(0, np.int64)
    n = max(len(y), 1)
    return Evaluation(
        loss=sum(losses) / n,
        accuracy=float((predicted_all == y.cpu().numpy()).sum()) / n,
        predicted=predicted_all,
        confidence=np.concatenate(confidence) if confidence else np.zeros(0, np.float32),
    )


def split_train_val(n: int, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation images, as the seed decides."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_size))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def thread_count(hyp: HyperParameters) -> int:
    return hyp.threads or os.cpu_count() or 1


def uses_bf16(hyp: HyperParameters, device: str) -> bool:
    """bf16 training steps: asked for, or `auto` on a CPU with native bf16 (oneDNN)."""
    if device != "cpu" or hyp.precision == "fp32":
        return False
    return hyp.precision == "bf16" or bf16_is_native()


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
"""glibc's `mallopt` parameters (malloc.h)"""


def keep_freed_memory() -> None:
    """Keep the memory of freed tensors in the process for the next training step.

    glibc maps each tensor over its mmap threshold afresh and unmaps it when freed, so
    every step faulted in its activations' pages again (a sixth of a CPU step); the
    largest of a digitnet batch is 13 MB. Linux with glibc only: elsewhere nothing
    changes. The process keeps that memory until it exits."""
    import ctypes
    import sys

    if sys.platform != "linux":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # musl has none: nothing changes
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    mallopt(M_TOP_PAD, 64 << 20)


def fit(
    arrays: Arrays,
    hyp: HyperParameters,
    on_epoch: Callable[[EpochMetrics], None] = lambda _m: None,
    on_batch: Callable[[int], None] = lambda _n: None,
) -> Fitted:
    """Train `hyp.model` on the arrays; the same seed, data and CPU give the same metrics."""
    check_hyperparameters(hyp)
    device = pick_device(hyp.device)
    threads = thread_count(hyp)
    torch.set_num_threads(threads)
    torch.manual_seed(hyp.random_seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, against kernels that read
    # memory they did not write; none of ours does (the same seed gives the same metrics,
    # tests/tracking/test_runs.py), and the fills cost a tenth of a CPU step. Both stay
    # so for the rest of the process, as the thread count does.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    if device == "cpu":
        keep_freed_memory()
    generator = torch.Generator().manual_seed(hyp.random_seed)
    shuffle_rng = np.random.default_rng(hyp.random_seed)

    train_idx, val_idx = split_train_val(len(arrays.train_y), hyp.val_size, hyp.random_seed)
    x_train = as_tensor(arrays.train_x[train_idx], device)
    y_train = torch.from_numpy(arrays.train_y[train_idx]).to(device)
    x_val = as_tensor(arrays.train_x[val_idx], device)
    y_val = torch.from_numpy(arrays.train_y[val_idx]).to(device)

    # channels_last + a fused optimizer: about 2x the images/s of the defaults on CPU.
    model = models.build(hyp.model).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=hyp.learning_rate, weight_decay=hyp.weight_decay, fused=True
    )
    steps_per_epoch = math.ceil(len(y_train) / hyp.batch_size)
    scheduler = (
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=hyp.learning_rate, total_steps=steps_per_epoch * hyp.n_epochs
        )
        if hyp.schedule == "onecycle"
        else None
    )
    bf16 = uses_bf16(hyp, device)
    history: list[EpochMetrics] = []
    began = time.perf_counter()
    for epoch in range(1, hyp.n_epochs + 1):
        epoch_began = time.perf_counter()
        model.train()
        order = (
            torch.from_numpy(shuffle_rng.permutation(len(y_train))).to(device)
            if hyp.shuffle_data
            else torch.arange(len(y_train), device=device)
        )
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), hyp.batch_size):
            index = order[start : start + hyp.batch_size]
            batch, target = x_train[index], y_train[index]
            if hyp.augment:
                batch = _augment(batch, generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(batch)
                loss = F.cross_entropy(logits, target, label_smoothing=hyp.label_smoothing)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += value * len(index)
            correct += int((logits.argmax(1) == target).sum())
            on_batch(len(index))
        seconds = time.perf_counter() - epoch_began
        val = evaluate(model, x_val, y_val)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=loss_sum / len(y_train),
            train_accuracy=correct / len(y_train),
            val_loss=val.loss,
            val_accuracy=val.accuracy,
            seconds=seconds,
            images_per_s=len(y_train) / max(seconds, 1e-9),
        )
        if not math.isfinite(metrics.val_loss):
            raise NonFiniteLoss(epoch)
        history.append(metrics)
        on_epoch(metrics)
    train_seconds = time.perf_counter() - began
    model = model.to(memory_format=torch.contiguous_format).eval()
    temperature = fold_temperature(model, x_val, y_val) if hyp.calibrate else 1.0
    return Fitted(
        model, device, history, train_seconds, len(y_train), len(y_val), threads, temperature
    )


TEMPERATURES = (0.05, 20.0)
"""the temperatures `best_temperature` chooses from: a model that learned little (a
`--fast` run) can fit a temperature near zero, which multiplied its logits a thousandfold
(once by infinity: NaN weights, registered and served)"""


def best_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The T within TEMPERATURES for which softmax(logits / T) fits the labels best (least
    cross-entropy): temperature scaling, the standard fix for a network that claims more,
    or less, confidence than it has. Label smoothing trains a model to claim less.

    The cross-entropy is convex in 1/T, so a golden-section search over log T finds it."""
    scores = logits.double()

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(scores / math.exp(log_t), target))

    low, high = (math.log(t) for t in TEMPERATURES)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > 1e-6:
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2)


def fold_temperature(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """Fit the temperature on the validation images and divide the last linear layer by
    it, so the saved model gives honest confidences with no extra step when serving.
    The predicted digits do not change (one positive scale keeps the largest logit)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if not len(y_val):
        return 1.0
    with torch.no_grad():
        logits = torch.cat([model(x_val[i : i + 1000]) for i in range(0, len(y_val), 1000)])
    temperature = best_temperature(logits.float().cpu(), y_val.cpu())
    with torch.no_grad():
        last.weight.div_(temperature)
        if last.bias is not None:
            last.bias.div_(temperature)
    return temperature


def score_on_test(fitted: Fitted, arrays: Arrays) -> TrainResult:
    """The fitted model on the test images (never seen while training)."""
    device = fitted.device
    x = as_tensor(arrays.test_x, device)
    evaluation = evaluate(fitted.model, x, torch.from_numpy(arrays.test_y).to(device))
    if not math.isfinite(evaluation.loss):
        raise TrainingError(
            "the trained model's answers on the test images are not finite numbers"
            " (try a lower learning rate)"
        )
    return TrainResult(**vars(fitted), test=evaluation)


def train(
    arrays: Arrays,
    hyp: HyperParameters,
    on_epoch: Callable[[EpochMetrics], None] = lambda _m: None,
    on_batch: Callable[[int], None] = lambda _n: None,
) -> TrainResult:
    """`fit`, then `score_on_test`."""
    return score_on_test(fit(arrays, hyp, on_epoch, on_batch), arrays)
