"""The classifiers as PyTorch modules, built from their layers in `train.architecture`:
`seednet` (the tutorial's CNN, unchanged) and `digitnet` (our default)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mnistops.train import architecture as a


class Dropout(nn.Dropout):
    """`nn.Dropout` with its mask drawn by `torch.rand_like`: the same distribution and
    the same seeded determinism, in a third of the time on CPU (`bernoulli_` took 9 %
    of a digitnet training step). Not used in evaluation, as any dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return torch.zeros_like(x)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # bf16 draws would be coarse
        return x * keep * (1.0 / (1.0 - self.p))


def _module(layer: a.Layer) -> nn.Module:
    if isinstance(layer, a.Conv):
        padding = layer.kernel // 2
        return nn.Conv2d(
            layer.inputs, layer.outputs, layer.kernel, padding=padding, bias=layer.bias
        )
    if isinstance(layer, a.BatchNorm):
        return nn.BatchNorm2d(layer.channels, eps=layer.eps)
    if isinstance(layer, a.ReLU):
        return nn.ReLU(inplace=True)
    if isinstance(layer, a.LeakyReLU):
        return nn.LeakyReLU(layer.slope)
    if isinstance(layer, a.MaxPool):
        return nn.MaxPool2d(layer.size)
    if isinstance(layer, a.Flatten):
        return nn.Flatten()
    if isinstance(layer, a.Dropout):
        return Dropout(layer.p)
    return nn.Linear(layer.inputs, layer.outputs)


def build(name: str) -> nn.Module:
    why = a.unknown_model(name)
    if why:
        raise ValueError(why)
    layers = a.ARCHITECTURES[name]
    return nn.Sequential(*(_module(layer) for layer in layers))


def seednet() -> nn.Module:
    """Exactly the tutorial's CNN (`architecture.SEEDNET`)."""
    return build("seednet")


def digitnet() -> nn.Module:
    """Our default (`architecture.DIGITNET`, whose docstring says why it is so)."""
    return build("digitnet")


MODELS: dict[str, Callable[[], nn.Module]] = {"digitnet": digitnet, "seednet": seednet}
