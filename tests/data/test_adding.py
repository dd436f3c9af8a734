"""`data add` is all or none, also when it is interrupted while copying (Ctrl-C): the
copies made are taken back and a relabelled image returns to its old digit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistops.data import adding
from mnistops.settings import load_settings
from tests.helpers import write_stack_config

pytestmark = [pytest.mark.unit, pytest.mark.bad_input]


def png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_an_interrupted_add_takes_back_what_it_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(write_stack_config(tmp_path))
    train = settings.mnist_dir / "train"
    png(train / "9" / "moved.png", 1)
    png(train / "3" / "kept.png", 2)
    before = tree(train)
    source = tmp_path / "new"
    (source / "8").mkdir(parents=True)
    shutil.copy2(train / "9" / "moved.png", source / "8" / "moved.png")
    for i in range(5):
        png(source / str(i) / f"new-{i}.png", 10 + i)
    real_copy = shutil.copy2
    calls = []

    def copy_then_interrupt(src: object, dst: object) -> object:
        calls.append(dst)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_copy(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(adding.shutil, "copy2", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        adding.add_images(settings, source, relabel=True)
    assert tree(train) == before, "an interrupted add leaves the training set as it was"

    monkeypatch.setattr(adding.shutil, "copy2", real_copy)
    added = adding.add_images(settings, source, relabel=True)
    assert sum(added.values()) == 6
    assert (train / "8" / "moved.png").is_file() and not (train / "9" / "moved.png").exists()
