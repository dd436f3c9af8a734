"""Training speed and accuracy: the tutorial's recipe against our pipeline, in one run.

Data: v2.0's content as PNG folders (train/ = MNIST's 60,000 training images, test/ =
its 10,000 test images), written once into a temp dir.

  tutorial: seednet, AdamW, batch 8, lr 1e-3, 2 epochs, val_size 0.2, the PNGs decoded
            every epoch by a 4-worker torch DataLoader (the tutorial's training loop);
  seednet:  the same model and hyperparameters in our pipeline (PNGs decoded once into a
            cached uint8 array; epochs read tensors);
  default:  the default recipe (config/hyp.yml), over --seeds seeds;
  previous: the default recipe before it (digitnet, peak learning rate 0.004), over the
            same seeds, alternating with the default so that a change of load on the
            machine touches both alike.

Training images/s counts the images trained on (validation excluded); wall time is the
training epochs plus their validation, without the one-off data loading (reported apart).
Usage: .venv/bin/python bench/train.py [--skip-tutorial] [--seeds 3] [--also KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from drift import cpu_name
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mnistops.compat import bf16_is_native
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


PREVIOUS = {"model": "digitnet", "learning_rate": 0.004}
"""the default recipe until the default changed; the rest as config/hyp.yml"""


def run_ours(arrays: data.Arrays, hyp: HyperParameters) -> dict[str, float]:
    result = loop.train(arrays, hyp)
    return {
        "images_per_s": result.images_per_s,
        "wall_s": result.train_seconds,
        "test_accuracy": result.test.accuracy,
    }


def recipes(settings: Settings, also: list[str]) -> dict[str, HyperParameters]:
    """The default and previous recipes, and the default with each `key=value` of `also`
    (an ablation: what one change of the default does)."""
    default = settings.hyperparameter
    found = {"default": default, "previous": default.model_copy(update=PREVIOUS)}
    for change in also:
        key, _, value = change.partition("=")
        found[change] = HyperParameters(**{**default.model_dump(), key: value})
    return found


def compare_recipes(
    arrays: data.Arrays, settings: Settings, seeds: int, also: list[str]
) -> dict[str, list]:
    """Each recipe once per seed, alternating: {recipe: [figures per seed]}."""
    found: dict[str, list] = {name: [] for name in recipes(settings, also)}
    for seed in range(seeds):
        for name, hyp in recipes(settings, also).items():
            run = hyp.model_copy(update={"random_seed": 42 + seed})
            print(f"{name} recipe, seed {42 + seed} ...", flush=True)
            figures = run_ours(arrays, run)
            print(
                f"  {figures['test_accuracy']:.2%} in {figures['wall_s']:.1f}s,"
                f" {figures['images_per_s']:,.0f} img/s",
                flush=True,
            )
            found[name].append(figures)
    return found


def print_recipes(settings: Settings, found: dict[str, list], also: list[str]) -> None:
    for name, hyp in recipes(settings, also).items():
        changed = {k: v for k, v in hyp.model_dump().items() if k in PREVIOUS}
        print(f"{name}: {changed}")
    width = max(10, *(len(name) + 2 for name in found))
    print(
        f"\n{'recipe':<{width}}{'seeds':>6}{'mean acc':>10}{'min':>8}{'max':>8}"
        f"{'img/s':>9}{'wall mean':>11}{'wall max':>10}"
    )
    for name, runs in found.items():
        acc = np.array([r["test_accuracy"] for r in runs])
        wall = np.array([r["wall_s"] for r in runs])
        speed = np.mean([r["images_per_s"] for r in runs])
        print(
            f"{name:<{width}}{len(runs):>6}{acc.mean():>10.2%}{acc.min():>8.2%}{acc.max():>8.2%}"
            f"{speed:>9,.0f}{wall.mean():>10.1f}s{wall.max():>9.1f}s"
        )
    default = found["default"]
    mean = np.mean([r["test_accuracy"] for r in default])
    slowest = max(r["wall_s"] for r in default)
    native = bf16_is_native()
    print(
        f"\ndefault recipe: mean test accuracy {mean:.2%} (target >= 99.50%), slowest"
        f" training {slowest:.0f}s (target <= {120 if native else 110}s);"
        f" {torch.get_num_threads()} threads"
    )
    bf16 = "native bf16" if native else "no native bf16: the recipe trains in fp32"
    print(f"CPU: {cpu_name()} ({bf16}), {os.cpu_count()} cores")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-tutorial", action="store_true", help="only the recipes, not the tutorial's runs"
    )
    parser.add_argument("--seeds", type=int, default=3, help="runs per recipe (default 3)")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also the default recipe with this one change (repeatable), e.g. precision=fp32",
    )
    args = parser.parse_args()
    try:
        recipes(load_settings(), args.also)
    except ValueError as exc:  # pydantic's ValidationError is one
        parser.error(f"--also: {exc}")
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
        found = compare_recipes(arrays, settings, args.seeds, args.also)

    if figures:
        print(f"\n{'run':<22}{'train img/s':>12}{'wall':>9}{'test acc':>10}")
        for name, f in figures.items():
            print(
                f"{name:<22}{f['images_per_s']:>12,.0f}{f['wall_s']:>8.1f}s"
                f"{f['test_accuracy']:>10.2%}"
            )
        base, seed = figures["tutorial recipe"], figures["seednet, ours"]
        speed = seed["images_per_s"] / base["images_per_s"]
        points = 100 * (seed["test_accuracy"] - base["test_accuracy"])
        print(
            f"\nseednet ours / tutorial: {speed:.2f}x images/s (target >= 2.5x),"
            f" test accuracy {points:+.2f} points (target within 0.3)"
        )
    print_recipes(settings, found, args.also)
    return 0


if __name__ == "__main__":
    sys.exit(main())
