"""The ONNX graph mnistops writes computes what the PyTorch module computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnistops.train import architecture, onnx_graph
from tests.train.test_runtime import random_weights

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(architecture.ARCHITECTURES))
@pytest.mark.parametrize("size", [1, 7, 67])
def test_onnx_runtime_gives_pytorchs_logits(name: str, size: int) -> None:
    model = random_weights(name, seed=size)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    net = onnx_graph.load_graph(name, onnx_graph.graph_bytes(name, weights))
    images = np.random.default_rng(size).random((size, 1, 28, 28), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(images)).numpy()
    found = net(images)
    assert found.shape == (size, 10) and found.dtype == np.float32
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert (found.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_an_empty_batch_is_no_logits() -> None:
    model = random_weights("seednet", seed=0)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    net = onnx_graph.load_graph("seednet", onnx_graph.graph_bytes("seednet", weights))
    assert net(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)


def test_the_same_weights_give_the_same_graph() -> None:
    """Registration writes the graph once; the same weights always give the same bytes,
    so a graph is a function of the signed weights and this module's GRAPH_VERSION."""
    weights = {k: v.numpy() for k, v in random_weights("digitnet", seed=3).state_dict().items()}
    assert onnx_graph.graph_bytes("digitnet", weights) == onnx_graph.graph_bytes(
        "digitnet", weights
    )
