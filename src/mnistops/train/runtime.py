"""A registered model's weights run by NumPy alone: what `predict` and `serve` answer with.

Importing PyTorch takes most of a second and a half and 300 MB of memory, for a forward
pass of a few small matrix products. Here each layer of `train.architecture` becomes one
NumPy step on channels-last activations (N, H, W, C): a convolution is one matrix product
over its patches, with the batch norm after it folded into its weights and bias (one
after a pooling is a per-channel scale and shift); the
linear layer's columns are reordered once, so that flattening channels-last gives
PyTorch's order. Inference only: dropout is the identity, batch norm uses its running
statistics, as in PyTorch's eval mode.

Whether it computes what PyTorch computes is checked when a model is registered: its
digits on the whole test set are compared with PyTorch's (`verify`), and only a model
that passed is served this way (`tracking.model_files`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mnistops.train import architecture as a

Step = Callable[[np.ndarray], np.ndarray]
CHUNK = 64
"""images per pass: bounds the patches' memory (a 5x5 convolution's are 25x the input)"""


def _patch_index(height: int, width: int, channels: int, kernel: int) -> np.ndarray:
    """For each output pixel, the flat positions in the zero-padded (H, W, C) input of its
    kernel x kernel x C patch, in (row, column, channel) order."""
    pad = kernel // 2
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    dy, dx = np.meshgrid(np.arange(kernel), np.arange(kernel), indexing="ij")
    corner = (rows[:, :, None, None] + dy) * (width + 2 * pad) + columns[:, :, None, None] + dx
    found: np.ndarray = (corner * channels)[..., None] + np.arange(channels)
    return found.reshape(height * width, kernel * kernel * channels)


PATCH_ROW_VIEWED = 16
"""a patch row (kernel x channels floats, contiguous channels-last) at least this long is
copied out of a strided view; shorter ones (a first layer's one channel) are gathered by
index, which is faster for them (`bench/runtime.py` measures both ways)"""


def _convolution(weight: np.ndarray, bias: np.ndarray, height: int, width: int) -> Step:
    """One matrix product over the patches. The patches are a strided view of the
    zero-padded input, laid out (row, column, channel) like the weight's rows, copied
    once by the matrix product's reshape; for a kernel row of few floats, gathered by a
    precomputed index instead."""
    outputs, inputs, kernel, _ = weight.shape
    pad = kernel // 2
    viewed = kernel * inputs >= PATCH_ROW_VIEWED
    index = None if viewed else _patch_index(height, width, inputs, kernel)
    matrix = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, outputs))

    def step(x: np.ndarray) -> np.ndarray:
        n = len(x)
        padded = np.zeros((n, height + 2 * pad, width + 2 * pad, inputs), np.float32)
        padded[:, pad : pad + height, pad : pad + width] = x
        if index is None:
            across, down, right, channel = padded.strides
            patches = as_strided(
                padded,
                (n, height, width, kernel, kernel, inputs),
                (across, down, right, down, right, channel),
                writeable=False,
            )
        else:
            patches = np.take(padded.reshape(n, -1), index, axis=1)
        out: np.ndarray = patches.reshape(n * height * width, -1) @ matrix
        out += bias
        return out.reshape(n, height, width, outputs)

    return step


def _scale_and_shift(scale: np.ndarray, shift: np.ndarray) -> Step:
    """A batch norm in eval mode that no convolution absorbed: per channel, channels last."""

    def step(x: np.ndarray) -> np.ndarray:
        x *= scale
        x += shift
        return x

    return step


def _relu(x: np.ndarray) -> np.ndarray:
    found: np.ndarray = np.maximum(x, 0, out=x)
    return found


def _leaky(slope: float) -> Step:
    def step(x: np.ndarray) -> np.ndarray:
        found: np.ndarray = np.where(x > 0, x, x * np.float32(slope))
        return found

    return step


def _max_pool(size: int) -> Step:
    """The maximum of each size x size block: rows first, then columns, as element-wise
    maxima of strided views (several times faster than a reshape and `max` over axes)."""

    def step(x: np.ndarray) -> np.ndarray:
        n, h, w, _ = x.shape
        x = x[:, : h - h % size, : w - w % size]
        rows = x[:, 0::size]
        for offset in range(1, size):
            rows = np.maximum(rows, x[:, offset::size])
        found: np.ndarray = rows[:, :, 0::size]
        for offset in range(1, size):
            found = np.maximum(found, rows[:, :, offset::size])
        return found

    return step


def _linear(weight: np.ndarray, bias: np.ndarray, before: tuple[int, int, int] | None) -> Step:
    """`before`: the (C, H, W) map flattened into this layer, whose columns are then
    reordered for channels-last input."""
    if before is not None:
        c, h, w = before
        weight = weight.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)
    matrix = np.ascontiguousarray(weight.T)

    def step(x: np.ndarray) -> np.ndarray:
        found: np.ndarray = x.reshape(x.shape[0], -1) @ matrix + bias
        return found

    return step


@dataclass
class NumpyNet:
    """(N, 1, 28, 28) float32 images in [0, 1] -> (N, 10) float32 logits."""

    architecture: str
    steps: list[Step]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32).transpose(0, 2, 3, 1)
        parts = []
        for start in range(0, len(x), CHUNK):
            part = x[start : start + CHUNK]
            for step in self.steps:
                part = step(part)
            parts.append(part)
        return np.concatenate(parts) if parts else np.zeros((0, 10), np.float32)


def compile_net(architecture: str, weights: dict[str, np.ndarray]) -> NumpyNet:
    """The architecture's steps with these weights (checked by the caller against
    `architecture.tensors`)."""
    layers = a.ARCHITECTURES[architecture]
    steps: list[Step] = []
    shape = (1, 28, 28)
    flattened: tuple[int, int, int] | None = None
    for index, layer in enumerate(layers):
        if isinstance(layer, a.Conv):
            weight, bias = convolution_parameters(layers, index, weights)
            steps.append(_convolution(weight, bias, shape[1], shape[2]))
            shape = (layer.outputs, shape[1], shape[2])
        elif isinstance(layer, a.BatchNorm) and not isinstance(layers[index - 1], a.Conv):
            steps.append(_scale_and_shift(*batch_norm_affine(weights, index, layer.eps)))
        elif isinstance(layer, a.ReLU):
            steps.append(_relu)
        elif isinstance(layer, a.LeakyReLU):
            steps.append(_leaky(layer.slope))
        elif isinstance(layer, a.MaxPool):
            steps.append(_max_pool(layer.size))
            shape = (shape[0], shape[1] // layer.size, shape[2] // layer.size)
        elif isinstance(layer, a.Flatten):
            flattened = shape
        elif isinstance(layer, a.Linear):
            weight = weights[f"{index}.weight"].astype(np.float32)
            steps.append(_linear(weight, weights[f"{index}.bias"].astype(np.float32), flattened))
            flattened = None
    return NumpyNet(architecture, steps)


def convolution_parameters(
    layers: tuple[a.Layer, ...], index: int, weights: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of the convolution `layers[index]`, float32, with the batch norm
    that follows it, if one does, folded in (eval mode)."""
    layer = layers[index]
    assert isinstance(layer, a.Conv)
    weight = weights[f"{index}.weight"].astype(np.float32)
    bias = (
        weights[f"{index}.bias"].astype(np.float32)
        if layer.bias
        else np.zeros(layer.outputs, np.float32)
    )
    follower = layers[index + 1] if index + 1 < len(layers) else None
    if isinstance(follower, a.BatchNorm):
        weight, bias = fold_batch_norm(weight, bias, weights, index + 1, follower.eps)
    return weight, bias


def fold_batch_norm(
    weight: np.ndarray, bias: np.ndarray, weights: dict[str, np.ndarray], index: int, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """A convolution followed by batch norm (eval mode) as one convolution."""
    scale, shift = batch_norm_affine(weights, index, eps)
    return (
        (weight * scale[:, None, None, None]).astype(np.float32),
        (bias * scale + shift).astype(np.float32),
    )


def batch_norm_affine(
    weights: dict[str, np.ndarray], index: int, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """The batch norm `layers[index]` in eval mode as (scale, shift) per channel, float32."""
    scale = weights[f"{index}.weight"] / np.sqrt(weights[f"{index}.running_var"] + eps)
    shift = weights[f"{index}.bias"] - weights[f"{index}.running_mean"] * scale
    return scale.astype(np.float32), shift.astype(np.float32)


TIE = 1e-4
"""logits closer than this (relative to their size) are a tie that float rounding
decides: PyTorch's own digit for such an image changes with its thread count or batch"""


def agreement(net: Step, images: np.ndarray, digits: np.ndarray) -> tuple[int, int]:
    """(images of `images` ((N, 28, 28) uint8) where `net` gives PyTorch's digit
    (`digits`) or ties it within float rounding, of them the ties)."""
    same = ties = 0
    for start in range(0, len(images), 1000):
        logits = net(images[start : start + 1000, None].astype(np.float32) / 255.0)
        theirs = digits[start : start + 1000]
        mine = logits.argmax(axis=1)
        rows = np.arange(len(logits))
        gap = logits[rows, mine] - logits[rows, theirs]
        tied = (mine != theirs) & (gap <= TIE * (1 + np.abs(logits).max(axis=1)))
        same += int((mine == theirs).sum()) + int(tied.sum())
        ties += int(tied.sum())
    return same, ties
