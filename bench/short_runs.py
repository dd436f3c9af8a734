"""How much a model learns in a very short run, per architecture and peak learning rate:
one epoch of 540 training images (600 with validation, a `data ingest --fast` v1.0) at
batch 32, i.e. 17 steps, test accuracy on 2,000 MNIST test images, over --seeds seeds.

Why: digitnet2 at digitnet's learning rate (0.004) learned little in such a run, where
the suite's short trainings expect a model that learned something; at 0.008 it learns
about as much as digitnet does at 0.004. Usage: .venv/bin/python bench/short_runs.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from drift import cpu_name

from mnistops.compat import bf16_is_native
from mnistops.data import mnist
from mnistops.settings import HyperParameters
from mnistops.train.data import Arrays, DataSource
from mnistops.train.loop import train

RECIPES = (("digitnet", 0.004), ("digitnet2", 0.004), ("digitnet2", 0.008))


def short_arrays() -> Arrays:
    """600 of v1.0's training images and 2,000 test images, the same every run."""
    data = mnist.load(mnist.packaged_dir())
    rng = np.random.default_rng(0)
    train_at, test_at = rng.permutation(30_000)[:600], rng.permutation(10_000)[:2_000]
    return Arrays(
        data.train_images[train_at],
        data.train_labels[train_at].astype(np.int64),
        data.test_images[test_at],
        data.test_labels[test_at].astype(np.int64),
        DataSource("short", "", ""),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    arrays = short_arrays()
    print(f"{'model':10} {'lr':>6}  test accuracy per seed (42...)       mean")
    for model, lr in RECIPES:
        found = []
        for seed in range(42, 42 + args.seeds):
            hyp = HyperParameters(
                model=model, learning_rate=lr, n_epochs=1, batch_size=32, random_seed=seed
            )
            found.append(train(arrays, hyp).test.accuracy)
        shown = " ".join(f"{a:6.1%}" for a in found)
        print(f"{model:10} {lr:6.3f}  {shown}  {statistics.mean(found):6.1%}")
    native = "native bf16" if bf16_is_native() else "no native bf16: fp32 steps"
    print(f"CPU: {cpu_name()} ({native}), {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
