"""A registered model's weights as an ONNX graph, run by ONNX Runtime: what `serve` and
`predict` answer with when the graph was checked at registration.

The graph is written by mnistops from `train.architecture` and the weights (the batch
norms folded into their convolutions, as the NumPy runtime does; one after a pooling is
a per-channel Mul and Add), never exported by tracing code, and logged beside the
weights (`tracking.model_files`), where the signed file record covers it. At
registration its digits on the whole test set are compared with PyTorch's, as the NumPy
runtime's are; only a graph that passed is run. ONNX Runtime's
kernels take about half the time of NumPy's matrix products for these small convolutions
and release the GIL for the whole pass (`bench/runtime.py`), so the service's event loop
keeps answering while a batch runs.

Writing the graph needs the `onnx` package (registration only); running it, only
`onnxruntime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mnistops.train import architecture as a
from mnistops.train.runtime import batch_norm_affine, convolution_parameters

GRAPH_VERSION = "1"
"""the way this module writes a graph; a graph checked under another is not run"""
OPSET = 17
INPUT, OUTPUT = "images", "logits"


def graph_bytes(architecture: str, weights: dict[str, np.ndarray]) -> bytes:
    """The architecture with these weights (checked by the caller against
    `architecture.tensors`) as a serialized ONNX model: (N, 1, 28, 28) float32 images in
    [0, 1] -> (N, 10) float32 logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = a.ARCHITECTURES[architecture]
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []
    current = INPUT

    def node(op: str, inputs: list[str], **attributes: Any) -> None:
        nonlocal current
        name = f"{op.lower()}{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        current = name

    def constant(name: str, array: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    for index, layer in enumerate(layers):
        if isinstance(layer, a.Conv):
            weight, bias = convolution_parameters(layers, index, weights)
            pad = layer.kernel // 2
            node(
                "Conv",
                [current, constant(f"{index}.weight", weight), constant(f"{index}.bias", bias)],
                kernel_shape=[layer.kernel, layer.kernel],
                pads=[pad, pad, pad, pad],
            )
        elif isinstance(layer, a.BatchNorm) and not isinstance(layers[index - 1], a.Conv):
            scale, shift = batch_norm_affine(weights, index, layer.eps)
            node("Mul", [current, constant(f"{index}.scale", scale[:, None, None])])
            node("Add", [current, constant(f"{index}.shift", shift[:, None, None])])
        elif isinstance(layer, a.ReLU):
            node("Relu", [current])
        elif isinstance(layer, a.LeakyReLU):
            node("LeakyRelu", [current], alpha=layer.slope)
        elif isinstance(layer, a.MaxPool):
            node("MaxPool", [current], kernel_shape=[layer.size] * 2, strides=[layer.size] * 2)
        elif isinstance(layer, a.Flatten):
            node("Flatten", [current], axis=1)
        elif isinstance(layer, a.Linear):
            weight = weights[f"{index}.weight"].astype(np.float32)
            node(
                "Gemm",
                [
                    current,
                    constant(f"{index}.weight", weight),
                    constant(f"{index}.bias", weights[f"{index}.bias"]),
                ],
                transB=1,
            )
    nodes[-1].output[0] = OUTPUT
    graph = helper.make_graph(
        nodes,
        f"mnistops-{architecture}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", 10])],
        constants,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mnistops"
    )
    model.ir_version = 8  # what every onnxruntime of the last years reads
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@dataclass
class OnnxNet:
    """(N, 1, 28, 28) float32 images in [0, 1] -> (N, 10) float32 logits, by ONNX Runtime."""

    architecture: str
    session: Any

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(batch, dtype=np.float32)
        if not len(images):
            return np.zeros((0, 10), np.float32)
        found: np.ndarray = self.session.run([OUTPUT], {INPUT: images})[0]
        return found


def load_graph(architecture: str, data: bytes, threads: int = 1) -> OnnxNet:
    """An ONNX Runtime session of a graph this module wrote, on `threads` threads that do
    not spin between passes (the service's other threads need the cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no memory arena: a batch's buffers are returned (13 MB less after a 256-image
    # batch, at the same speed for these small tensors)
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return OnnxNet(architecture, session)


def runtime_available() -> bool:
    """onnxruntime can be imported here (a wheel exists for this platform)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
