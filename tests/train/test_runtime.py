"""The NumPy runtime computes what the PyTorch module computes, from the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnistops.data import mnist
from mnistops.predict import softmax
from mnistops.train import architecture, models, runtime

pytestmark = pytest.mark.unit


def random_weights(name: str, seed: int) -> torch.nn.Module:
    """The architecture with random weights and batch-norm statistics (none at their
    defaults, so that folding the batch norm is tested), in eval mode."""
    model = models.build(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.dtype.is_floating_point:
                continue
            if key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize("name", sorted(architecture.ARCHITECTURES))
def test_the_layers_name_every_tensor_of_the_pytorch_module(name: str) -> None:
    expected = {
        key: (tensor.numpy().dtype, tuple(tensor.shape))
        for key, tensor in models.build(name).state_dict().items()
    }
    assert architecture.tensors(name) == expected


@pytest.mark.parametrize("name", sorted(architecture.ARCHITECTURES))
@pytest.mark.parametrize("size", [1, 7, runtime.CHUNK + 3])
def test_numpy_gives_pytorchs_logits(name: str, size: int) -> None:
    model = random_weights(name, seed=size)
    net = runtime.compile_net(name, {k: v.numpy() for k, v in model.state_dict().items()})
    gives_pytorchs_logits(net, model, size)


def gives_pytorchs_logits(net: runtime.Step, model: torch.nn.Module, size: int) -> None:
    """`net`'s logits for `size` random images are the module's, within float rounding."""
    images = np.random.default_rng(size).random((size, 1, 28, 28), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(images)).numpy()
    found = net(images)
    assert found.shape == (size, 10) and found.dtype == np.float32
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert (found.argmax(axis=1) == expected.argmax(axis=1)).all()
    probabilities = softmax(found)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_an_empty_batch_is_no_logits() -> None:
    model = random_weights("digitnet", seed=0)
    net = runtime.compile_net("digitnet", {k: v.numpy() for k, v in model.state_dict().items()})
    assert net(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)


def test_agreement_counts_the_same_digits_on_real_images() -> None:
    data = mnist.load(mnist.packaged_dir())
    images = data.test_images[:500]
    model = random_weights("digitnet", seed=1)
    with torch.inference_mode():
        digits = model(torch.from_numpy(images[:, None].astype(np.float32) / 255)).argmax(1)
    net = runtime.compile_net("digitnet", {k: v.numpy() for k, v in model.state_dict().items()})
    assert runtime.agreement(net, images, digits.numpy()) == (500, 0)
    wrong = digits.numpy().copy()
    wrong[:3] = (wrong[:3] + 1) % 10
    assert runtime.agreement(net, images, wrong) == (497, 0)


def test_a_tie_within_float_rounding_is_no_disagreement() -> None:
    """A model whose logits are all but equal (a --fast model's): PyTorch's digit there is
    float rounding's choice, so another digit of the tie counts as agreeing, and is
    counted as a tie; a digit far from the top does not."""
    model = random_weights("digitnet", seed=2)
    weights = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    weights["13.weight"] *= 0
    weights["13.bias"] = np.array([1, 1 + 1e-6, 0, 0, 0, 0, 0, 0, 0, 0], np.float32)
    net = runtime.compile_net("digitnet", weights)
    images = np.zeros((4, 28, 28), np.uint8)
    assert runtime.agreement(net, images, np.array([1, 1, 0, 0])) == (4, 2)
    assert runtime.agreement(net, images, np.array([1, 1, 2, 2])) == (2, 0)
