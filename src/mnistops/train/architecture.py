"""The classifiers' layers, said once and without PyTorch: `train.models` builds them as
PyTorch modules (training, the gate), `train.runtime` runs them with NumPy alone
(`predict`, `serve`), and `tracking.model_files` checks a weights file against them.

Both take a batch of 1x28x28 float images scaled to [0, 1] and return 10 logits. A layer's
index in the tuple is its index in the PyTorch `nn.Sequential`, so its tensors are named
`"<index>.weight"` and so on, as in the model's `state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Conv:
    """A square convolution, stride 1, padded to keep the image's size."""

    inputs: int
    outputs: int
    kernel: int
    bias: bool


@dataclass(frozen=True)
class BatchNorm:
    channels: int
    eps: float = 1e-5


@dataclass(frozen=True)
class ReLU:
    pass


@dataclass(frozen=True)
class LeakyReLU:
    slope: float = 0.01


@dataclass(frozen=True)
class MaxPool:
    size: int = 2


@dataclass(frozen=True)
class Flatten:
    """(N, C, H, W) to (N, C*H*W), in that order, as `nn.Flatten` does."""


@dataclass(frozen=True)
class Dropout:
    p: float


@dataclass(frozen=True)
class Linear:
    inputs: int
    outputs: int


Layer = Conv | BatchNorm | ReLU | LeakyReLU | MaxPool | Flatten | Dropout | Linear

SEEDNET: tuple[Layer, ...] = (
    Conv(1, 32, 5, bias=True),
    LeakyReLU(),
    MaxPool(2),
    Conv(32, 4, 5, bias=True),
    LeakyReLU(),
    Flatten(),
    Linear(4 * 14 * 14, 10),
)
"""Exactly the tutorial's CNN, so that its results can be compared with ours."""

DIGITNET: tuple[Layer, ...] = (
    Conv(1, 16, 5, bias=False),
    BatchNorm(16),
    ReLU(),
    MaxPool(2),
    Conv(16, 32, 5, bias=False),
    BatchNorm(32),
    ReLU(),
    MaxPool(2),
    Conv(32, 64, 3, bias=False),
    BatchNorm(64),
    ReLU(),
    Flatten(),
    Dropout(0.25),
    Linear(64 * 7 * 7, 10),
)
"""A small CNN with batch norm, sized for speed on a few CPU cores (3.7 M MACs/image);
the default before `DIGITNET2`, with a learning rate of 0.004.

Designed for 28x28: few channels where the image is large (16 at 28x28, 32 at 14x14),
more where it is small (64 at 7x7), so no layer does much work on empty margins; batch
norm lets it train at a high learning rate; one linear layer on the 7x7 map keeps where
strokes are, which a global pooling would throw away.

What the default recipe adds around it lives in `config/hyp.yml` and the training loop
(`train/loop.py`), each kept because it measured better on v2.0 (`bench/train.py`,
figures in the README): batch 256 (more images/s than 128 on a CPU), bf16 training
steps where the CPU has them natively (1.35x the images/s of fp32 at the same
accuracy; evaluation stays fp32), label smoothing 0.1 (+0.15 points in the ablation),
a one-cycle schedule over 8 epochs (10 gave no more), and small random shifts, turns
and zooms (digits are never flipped). Tried in single exploratory runs and dropped: an
average of the weights (EMA; the one-cycle schedule's annealing already settles the
weights, and it gained nothing measurable), and a wider network (24-48-64 channels,
twice the multiply-adds: no better).
"""

DIGITNET2: tuple[Layer, ...] = (
    Conv(1, 16, 5, bias=False),
    MaxPool(2),
    BatchNorm(16),
    ReLU(),
    Conv(16, 32, 3, bias=False),
    MaxPool(2),
    BatchNorm(32),
    ReLU(),
    *DIGITNET[8:],  # the 3x3 convolution to 64 channels at 7x7 and the rest, unchanged
)
"""Our default (2.2 M MACs/image): `DIGITNET` with its middle convolution 3x3 instead
of 5x5, and each of its first two poolings moved before its batch norm and ReLU
(convolution, pooling, batch norm, ReLU, as fast CNN recipes have it).

Why: on a CPU without native bf16 (fp32 steps) the 5x5 convolution was 40 % of a
training step, and batch norm and ReLU now run on a quarter of the pixels; a step takes
~0.7x the time of `DIGITNET`'s in the loop. It wants twice digitnet's learning rate
(0.008): at 0.004 a short run learned little (one epoch of 540 images: 20 % test
accuracy over five seeds, digitnet 46 %; at 0.008 41 %: `bench/short_runs.py`); the
default recipe's figures at 0.008 are `bench/train.py`'s, in the README. A batch norm
after a pooling is not folded into the convolution before it when served (a negative
scale does not commute with the maximum): the runtimes apply it as a per-channel scale
and shift. `DIGITNET` stays, for the models registered with it."""

ARCHITECTURES: dict[str, tuple[Layer, ...]] = {
    "digitnet2": DIGITNET2,
    "digitnet": DIGITNET,
    "seednet": SEEDNET,
}


def unknown_model(name: str) -> str | None:
    """Why `name` is no model we have; None when it is one."""
    if name in ARCHITECTURES:
        return None
    return f"unknown model '{name}' (known: {', '.join(ARCHITECTURES)})"


FLOAT = np.dtype(np.float32)


def tensors(architecture: str) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every tensor of the architecture's `state_dict`: name -> (dtype, shape)."""
    found: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for index, layer in enumerate(ARCHITECTURES[architecture]):
        if isinstance(layer, Conv):
            found[f"{index}.weight"] = (
                FLOAT,
                (layer.outputs, layer.inputs, layer.kernel, layer.kernel),
            )
            if layer.bias:
                found[f"{index}.bias"] = (FLOAT, (layer.outputs,))
        elif isinstance(layer, BatchNorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                found[f"{index}.{name}"] = (FLOAT, (layer.channels,))
            found[f"{index}.num_batches_tracked"] = (np.dtype(np.int64), ())
        elif isinstance(layer, Linear):
            found[f"{index}.weight"] = (FLOAT, (layer.outputs, layer.inputs))
            found[f"{index}.bias"] = (FLOAT, (layer.outputs,))
    return found
