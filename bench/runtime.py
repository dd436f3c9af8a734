"""The runtimes `predict` and `serve` answer with: time per image of one forward pass of
each architecture at batch 1, 8 and 32, in alternating rounds, by
  - ONNX Runtime on the graph mnistops writes (`train/onnx_graph.py`; what answers for a
    version whose graph passed its check at registration),
  - the NumPy runtime (`train/runtime.py`; what answered before, and still answers for a
    version registered without a graph), its convolutions' patches copied from a strided
    view, and the same with every patch gathered by a precomputed index (the NumPy
    runtime before that); the two NumPy ways give the same logits bit for bit, and ONNX
    Runtime the same digits within float rounding, which the script checks.
Also the MNIST-way conversion of PNG uploads (`data/conversion.py`), which the service
runs for every upload: one at a time (as it did before), and in groups of 8 and 32 (as
its batcher converts the uploads of concurrent requests), the same pixels either way.

Weights are random (the time does not depend on them); one thread, as the service runs.
Usage: .venv/bin/python bench/runtime.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import numpy as np
from drift import cpu_name
from PIL import Image
from threadpoolctl import threadpool_limits

from mnistops.compat import bf16_is_native
from mnistops.data import mnist
from mnistops.data.conversion import image_from_bytes, images_from_bytes
from mnistops.train import architecture, onnx_graph, runtime

BATCHES = (1, 8, 32)
IMAGES_PER_ROUND = 2048


def random_weights(name: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for key, (dtype, shape) in architecture.tensors(name).items():
        values = rng.standard_normal(shape) * 0.3
        if key.endswith("running_var"):
            values = np.abs(values) + 0.5
        weights[key] = values.astype(dtype)
    return weights


def compiled(name: str, viewed: bool) -> runtime.NumpyNet:
    """The net with strided-view patches where ours uses them, or gathered everywhere."""
    kept = runtime.PATCH_ROW_VIEWED
    runtime.PATCH_ROW_VIEWED = kept if viewed else 1 << 30
    try:
        return runtime.compile_net(name, random_weights(name, 0))
    finally:
        runtime.PATCH_ROW_VIEWED = kept


def microseconds_per_image(net: runtime.Step, batch: np.ndarray) -> float:
    rounds = max(3, IMAGES_PER_ROUND // len(batch))
    net(batch)
    start = time.perf_counter()
    for _ in range(rounds):
        net(batch)
    return (time.perf_counter() - start) / (rounds * len(batch)) * 1e6


CONVERSION_GROUPS = (1, 8, 32)


def conversion_microseconds(bodies: list[bytes], group: int) -> float:
    """µs per upload, converted `group` at a time (1: `image_from_bytes`, one by one)."""
    start = time.perf_counter()
    if group == 1:
        for body in bodies:
            image_from_bytes(body)
    else:
        for at in range(0, len(bodies), group):
            images_from_bytes([(body, "upload") for body in bodies[at : at + group]])
    return (time.perf_counter() - start) / len(bodies) * 1e6


def png_bodies(images: np.ndarray) -> list[bytes]:
    bodies = []
    for image in images[:2048]:
        png = io.BytesIO()
        Image.fromarray(image).save(png, "PNG")
        bodies.append(png.getvalue())
    return bodies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    images = mnist.load(mnist.packaged_dir()).test_images
    batches = {n: (images[:n, None] / 255.0).astype(np.float32) for n in BATCHES}
    rows: dict[tuple[str, str, int], list[float]] = {}
    with threadpool_limits(1):
        for name in architecture.ARCHITECTURES:
            graph = onnx_graph.graph_bytes(name, random_weights(name, 0))
            nets: dict[str, runtime.Step] = {
                "numpy, gathered": compiled(name, False),
                "numpy, viewed": compiled(name, True),
                "onnxruntime (ours)": onnx_graph.load_graph(name, graph),
            }
            for n, batch in batches.items():
                found = [net(batch) for net in nets.values()]
                if not np.array_equal(found[0], found[1]):
                    raise SystemExit(f"{name}, batch {n}: the NumPy ways gave other logits")
                scale = np.abs(found[0]).max()
                if not np.allclose(found[2], found[0], rtol=1e-4, atol=1e-4 * scale):
                    raise SystemExit(f"{name}, batch {n}: ONNX Runtime gave other logits")
            for _ in range(args.rounds):
                for way, net in nets.items():
                    for n, batch in batches.items():
                        rows.setdefault((name, way, n), []).append(
                            microseconds_per_image(net, batch)
                        )
        bodies = png_bodies(images)
        conversion: dict[int, list[float]] = {group: [] for group in CONVERSION_GROUPS}
        for _ in range(args.rounds):
            for group in CONVERSION_GROUPS:
                conversion[group].append(conversion_microseconds(bodies, group))
    native = "native bf16" if bf16_is_native() else "no native bf16"
    print(f"\n{cpu_name()} ({native}), {os.cpu_count()} cores; one thread")
    print(f"median of {args.rounds} alternating rounds, microseconds per image at batch")
    print(f"  {'':<32}" + "".join(f"{n:>8}" for n in BATCHES))
    for name in architecture.ARCHITECTURES:
        for way in ("numpy, gathered", "numpy, viewed", "onnxruntime (ours)"):
            figures = [statistics.median(rows[(name, way, n)]) for n in BATCHES]
            print(f"  {name + ', ' + way:<32}" + "".join(f"{f:8.0f}" for f in figures))
    print("the MNIST-way conversion of 2,048 test PNGs (28x28), microseconds per upload:")
    print(
        ", ".join(
            f"{'one at a time' if group == 1 else f'{group} together'}"
            f" {statistics.median(conversion[group]):.0f}"
            for group in CONVERSION_GROUPS
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
