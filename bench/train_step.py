"""A digitnet training step on CPU, as `train/loop.py` runs it and as plain PyTorch would,
in one run: images/s of batch-256 steps (augmentation, forward, backward, AdamW), fp32
or bf16 as `precision: auto` picks on this CPU.

  plain: deterministic algorithms with their default NaN fill of new tensors, glibc's
         default malloc (freed activations unmapped), `nn.Dropout` (`bernoulli_`);
  ours:  the fill off, freed memory kept (`loop.keep_freed_memory`), `models.Dropout`.
Each variant runs in a process of its own (malloc's settings are per process), the two
alternating for --rounds rounds; the row is the median round.
Usage: .venv/bin/python bench/train_step.py [--rounds 3] [--steps 60]
  (`ONEDNN_MAX_CPU_ISA=AVX2` in front: as on a CPU without native bf16 or AVX-512)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

BATCH = 256


def steps_per_s(variant: str, steps: int) -> float:
    """Images/s of `steps` training steps, after 5 to warm up, in this process."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mnistops.data import mnist
    from mnistops.settings import HyperParameters
    from mnistops.train import loop, models

    torch.use_deterministic_algorithms(True, warn_only=True)
    if variant == "ours":
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        loop.keep_freed_memory()
    else:
        models.Dropout = nn.Dropout  # type: ignore[misc]
    source = mnist.load(mnist.packaged_dir())
    x = loop.as_tensor(source.train_images, "cpu")
    y = torch.from_numpy(source.train_labels.astype(np.int64))
    torch.manual_seed(0)
    model = models.build("digitnet").to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.004, weight_decay=0.01, fused=True)
    generator = torch.Generator().manual_seed(0)
    bf16 = loop.uses_bf16(HyperParameters(), "cpu")
    model.train()
    began = 0.0
    for step in range(steps + 5):
        if step == 5:
            began = time.perf_counter()
        index = torch.randint(0, len(y), (BATCH,), generator=generator)
        batch = loop._augment(x[index], generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(batch), y[index], label_smoothing=0.1)
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variant", choices=("plain", "ours"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(steps_per_s(args.variant, args.steps))
        return 0
    found: dict[str, list[float]] = {"plain": [], "ours": []}
    for _ in range(args.rounds):
        for variant in found:
            done = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            found[variant].append(float(done.stdout.split()[-1]))
    from drift import cpu_name

    from mnistops.compat import bf16_is_native

    native = bf16_is_native()
    print(
        f"CPU: {cpu_name()} ({'native bf16' if native else 'no native bf16: fp32'}),"
        f" {os.cpu_count()} cores; digitnet, batch {BATCH}, {args.steps} steps a round"
    )
    for variant, speeds in found.items():
        rounds = ", ".join(f"{s:,.0f}" for s in speeds)
        print(f"{variant:<6} {statistics.median(speeds):>7,.0f} images/s (rounds: {rounds})")
    gain = statistics.median(found["ours"]) / statistics.median(found["plain"])
    print(f"ours / plain: {gain:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
