"""Training speed and accuracy: the tutorial's recipe against our pipeline, in one run.

Data: v2.0's content as PNG folders (train/ = MNIST's 60,000 training images, test/ =
its 10,000 test images), written once into a temp dir.

  tutorial: seednet, AdamW, batch 8, lr 1e-3, 2 epochs, val_size 0.2, the PNGs decoded
            every epoch by a 4-worker torch DataLoader (the tutorial's training loop);
  seednet:  the same model and hyperparameters in our pipeline (PNGs decoded once into a
            cached uint8 array; epochs read tensors);
  digitnet: our default model with config/hyp.yml's hyperparameters.

Training images/s counts the images trained on (validation excluded); wall time is the
training epochs plus their validation, without the one-off data loading (reported apart).
Usage: .venv/bin/python bench/train.py [--skip-tutorial]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mnistops.data import ingest, mnist
from mnistops.settings import HyperParameters, Settings, load_settings
from mnistops.train import data, loop, models

TUTORIAL = {
    "model": "seednet",
    "batch_size": 8,
    "learning_rate": 1e-3,
    "n_epochs": 2,
    "val_size": 0.2,
    "random_seed": 42,
    "shuffle_data": True,
    "schedule": "constant",
    "augment": False,
    "weight_decay": 0.01,
}


def write_v2_pngs(root: Path) -> Path:
    """MNIST's 60,000 training and 10,000 test images as train/ and test/ PNG folders."""
    source = mnist.load(mnist.packaged_dir())
    folder = root / "v2.0"
    for split, images, labels in (
        ("train", source.train_images, source.train_labels),
        ("test", source.test_images, source.test_labels),
    ):
        ids = np.arange(len(labels))
        ingest.write_split(folder / split, ids, images, labels, lambda _n: None, [])
    return folder


class PngFolder(Dataset):
    """The tutorial's dataset: one PNG file decoded per item, every epoch."""

    def __init__(self, files: list[tuple[Path, int]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).unsqueeze(0), label


def png_files(folder: Path) -> list[tuple[Path, int]]:
    return sorted((p, int(p.parent.name)) for p in folder.glob("*/*.png"))


def run_tutorial(folder: Path) -> dict[str, float]:
    """The tutorial's loop: DataLoader(num_workers=4) over PNG files, seednet, AdamW."""
    torch.manual_seed(TUTORIAL["random_seed"])
    files = png_files(folder / "train")
    train_idx, val_idx = loop.split_train_val(
        len(files), TUTORIAL["val_size"], TUTORIAL["random_seed"]
    )
    batch = TUTORIAL["batch_size"]
    train_loader = DataLoader(
        PngFolder([files[i] for i in train_idx]), batch_size=batch, shuffle=True, num_workers=4
    )
    val_loader = DataLoader(PngFolder([files[i] for i in val_idx]), batch_size=batch, num_workers=4)
    test_loader = DataLoader(PngFolder(png_files(folder / "test")), batch_size=batch, num_workers=4)
    model = models.seednet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=TUTORIAL["learning_rate"])
    began = time.perf_counter()
    trained_s = 0.0
    for _epoch in range(TUTORIAL["n_epochs"]):
        model.train()
        epoch_began = time.perf_counter()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained_s += time.perf_counter() - epoch_began
        accuracy(model, val_loader)
    wall = time.perf_counter() - began
    return {
        "images_per_s": len(train_idx) * TUTORIAL["n_epochs"] / trained_s,
        "wall_s": wall,
        "test_accuracy": accuracy(model, test_loader),
    }


def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def run_ours(arrays: data.Arrays, hyp: HyperParameters) -> dict[str, float]:
    result = loop.train(arrays, hyp)
    return {
        "images_per_s": result.images_per_s,
        "wall_s": result.train_seconds,
        "test_accuracy": result.test.accuracy,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tutorial", action="store_true", help="only our two runs")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        print("writing v2.0's 70,000 PNGs ...", flush=True)
        folder = write_v2_pngs(root)
        settings: Settings = load_settings().model_copy(update={"home": root / ".mnistops"})
        began = time.perf_counter()
        arrays = data.load_folder(settings, folder)
        first_load = time.perf_counter() - began
        began = time.perf_counter()
        arrays = data.load_folder(settings, folder)
        cached_load = time.perf_counter() - began
        print(
            f"our data loading: first {first_load:.1f}s (validate + decode once),"
            f" cached {cached_load:.2f}s",
            flush=True,
        )
        figures = {}
        if not args.skip_tutorial:
            print("tutorial recipe (PNG DataLoader, 4 workers) ...", flush=True)
            figures["tutorial recipe"] = run_tutorial(folder)
        print("seednet, the tutorial's hyperparameters, our pipeline ...", flush=True)
        figures["seednet, ours"] = run_ours(arrays, HyperParameters(**TUTORIAL))
        hyp = settings.hyperparameter
        print(f"digitnet, config/hyp.yml: {hyp.model_dump()} ...", flush=True)
        figures["digitnet (default)"] = run_ours(arrays, hyp)

    print(f"\n{'run':<22}{'train img/s':>12}{'wall':>9}{'test acc':>10}")
    for name, f in figures.items():
        print(
            f"{name:<22}{f['images_per_s']:>12,.0f}{f['wall_s']:>8.1f}s{f['test_accuracy']:>10.2%}"
        )
    if "tutorial recipe" in figures:
        base, seed = figures["tutorial recipe"], figures["seednet, ours"]
        speed = seed["images_per_s"] / base["images_per_s"]
        points = 100 * (seed["test_accuracy"] - base["test_accuracy"])
        print(
            f"\nseednet ours / tutorial: {speed:.2f}x images/s (target >= 2.5x),"
            f" test accuracy {points:+.2f} points (target within 0.3)"
        )
    best = figures["digitnet (default)"]
    print(
        f"digitnet: {best['test_accuracy']:.2%} test accuracy (target >= 99.40%),"
        f" {best['wall_s']:.0f}s training (target < 180s); {torch.get_num_threads()} threads"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
