"""The classifiers as PyTorch modules, built from their layers in `train.architecture`:
`seednet` (the tutorial's CNN, unchanged), `digitnet2` (our default) and `digitnet` (the
default before it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mnistops.train import architecture as a

LANES = 1 << 16
"""the values of one 16-bit lane of random bits"""


class Dropout(nn.Dropout):
    """`nn.Dropout` whose mask is drawn 16 bits an element: one 64-bit draw of the
    seeded generator gives four elements' lanes, where `torch.rand_like` spends one
    draw and a float conversion on each (`bernoulli_` is slower still). A 16-bit lane is
    kept when it is at or above p's share of its 65,536 values, so p is kept to 1/65,536,
    and the kept elements are scaled by the exact inverse of the share kept. The same
    seed gives the same masks. On a CPU without native bf16 the mask of a digitnet2
    batch took 0.9 ms instead of 3.7 ms. Not used in evaluation, as any dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        dropped = round(self.p * LANES)
        if self.p >= 1 or dropped >= LANES:
            return torch.zeros_like(x)
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
        lanes = draws.random_(-(1 << 63), None).view(torch.int16)[: x.numel()].view(x.shape)
        keep = lanes >= dropped - LANES // 2
        return x * keep * (LANES / (LANES - dropped))


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


def digitnet2() -> nn.Module:
    """Our default (`architecture.DIGITNET2`, whose docstring says why it is so)."""
    return build("digitnet2")


def digitnet() -> nn.Module:
    """The default before `digitnet2` (`architecture.DIGITNET`)."""
    return build("digitnet")


MODELS: dict[str, Callable[[], nn.Module]] = {
    "digitnet2": digitnet2,
    "digitnet": digitnet,
    "seednet": seednet,
}
