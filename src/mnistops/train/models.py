"""The classifiers: `seednet` (the tutorial's CNN, unchanged) and `digitnet` (our default).

Both take a batch of 1x28x28 float images scaled to [0, 1] and return 10 logits.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def seednet() -> nn.Module:
    """Exactly the tutorial's CNN, so that its results can be compared with ours."""
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=5, padding="same"),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 4, kernel_size=5, padding="same"),
        nn.LeakyReLU(),
        nn.Flatten(),
        nn.Linear(4 * 14 * 14, 10),
    )


def _conv_block(inputs: int, outputs: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    ]


def digitnet() -> nn.Module:
    """A small CNN with batch norm, sized for speed on a few CPU cores (3.7 M MACs/image)."""
    return nn.Sequential(
        *_conv_block(1, 16, 5),
        nn.MaxPool2d(2),
        *_conv_block(16, 32, 5),
        nn.MaxPool2d(2),
        *_conv_block(32, 64, 3),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 7 * 7, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"digitnet": digitnet, "seednet": seednet}


def build(name: str) -> nn.Module:
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(MODELS)})") from None
