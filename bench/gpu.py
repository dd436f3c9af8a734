"""Training on CUDA against the CPU, and whether CUDA training is deterministic.

What a worker of pool `mnist-gpu` runs is the retraining's own loop (`train.loop.train`,
device cuda); this runs that loop on v2.0's content (MNIST's 60,000 training and 10,000
test images, read from the IDX files in the package) with config/hyp.yml's
hyperparameters:

  cuda, seed 42, twice: the two runs must give the same metrics, epoch by epoch, and the
                        same test predictions;
  cpu,  seed 42:        the same recipe on this machine's CPU cores (--cpu-epochs of them,
                        default 1: images/s is per epoch), the baseline of the same run.

Usage: python bench/gpu.py [--cpu-epochs N]   (exits 2 where no CUDA GPU is usable)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np
import torch

from mnistops.clients import library_defaults
from mnistops.data import mnist
from mnistops.settings import HyperParameters, load_settings
from mnistops.train import loop
from mnistops.train.data import Arrays, DataSource


def v2_arrays() -> Arrays:
    source = mnist.load(mnist.packaged_dir())
    origin = DataSource("v2.0 (packaged IDX)", "idx", "package", tracked=False)
    copies = (np.array(a) for a in (source.train_images, source.train_labels))
    tests = (np.array(a) for a in (source.test_images, source.test_labels))
    return Arrays(*copies, *tests, origin)


def run(arrays: Arrays, hyp: HyperParameters) -> tuple[loop.TrainResult, float]:
    began = time.perf_counter()
    result = loop.train(arrays, hyp)
    return result, time.perf_counter() - began


def fingerprint(result: loop.TrainResult) -> str:
    """Every epoch's metrics (not the timings) and the test predictions, hashed."""
    digest = hashlib.sha256()
    for e in result.epochs:
        digest.update(repr((e.train_loss, e.train_accuracy, e.val_loss, e.val_accuracy)).encode())
    digest.update(np.asarray(result.test.predicted).tobytes())
    return digest.hexdigest()[:16]


def steady_images_per_s(result: loop.TrainResult) -> float:
    """Images/s of the epochs after the first (which pays for CUDA's warm-up)."""
    later = result.epochs[1:] or result.epochs
    return sum(e.images_per_s * e.seconds for e in later) / sum(e.seconds for e in later)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-epochs", type=int, default=1)
    args = parser.parse_args()
    library_defaults()
    if not torch.cuda.is_available():
        print("no usable CUDA GPU here (torch.cuda.is_available() is False)")
        return 2
    hyp = load_settings().hyperparameter
    arrays = v2_arrays()
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name(0)},"
        f" {os.cpu_count()} CPU cores; CUBLAS_WORKSPACE_CONFIG="
        f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG')}; recipe {hyp.model_dump()}",
        flush=True,
    )
    rows = []
    for name in ("cuda, run 1", "cuda, run 2"):
        result, wall = run(arrays, hyp.model_copy(update={"device": "cuda"}))
        rows.append((name, result, wall, steady_images_per_s(result)))
        print(f"{name}: done in {wall:.1f}s", flush=True)
    cpu_hyp = hyp.model_copy(update={"device": "cpu", "n_epochs": args.cpu_epochs})
    result, wall = run(arrays, cpu_hyp)
    rows.append((f"cpu, {args.cpu_epochs} epoch(s)", result, wall, result.images_per_s))

    print(f"\n{'run':<20}{'train img/s':>12}{'wall':>9}{'test acc':>10}  fingerprint")
    for name, result, wall, speed in rows:
        print(
            f"{name:<20}{speed:>12,.0f}{wall:>8.1f}s{result.test.accuracy:>10.2%}"
            f"  {fingerprint(result)}"
        )
    same = fingerprint(rows[0][1]) == fingerprint(rows[1][1])
    print(f"\ncuda deterministic (same seed, same metrics and predictions): {same}")
    print(f"cuda / cpu images/s: {rows[0][3] / rows[2][3]:.1f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
