"""The ONNX graph mnistops writes computes what the PyTorch module computes."""

from __future__ import annotations

import numpy as np
import pytest

from mnistops.train import architecture, onnx_graph
from tests.train.test_runtime import gives_pytorchs_logits, random_weights

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(architecture.ARCHITECTURES))
@pytest.mark.parametrize("size", [1, 7, 67])
def test_onnx_runtime_gives_pytorchs_logits(name: str, size: int) -> None:
    model = random_weights(name, seed=size)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    gives_pytorchs_logits(
        onnx_graph.load_graph(name, onnx_graph.graph_bytes(name, weights)), model, size
    )


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
