"""Ingest writes the same PNG files, and records the same hashes, on one core or many."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from mnistops.data import folder_guard, images, ingest
from mnistops.settings import load_settings
from tests.helpers import write_stack_config

pytestmark = pytest.mark.unit


def _write(folder: Path, cores: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list]:
    monkeypatch.setattr(ingest.os, "cpu_count", lambda: cores)
    rng = np.random.default_rng(0)
    n = 4 * ingest.CHUNK + 7  # enough for the worker processes, and a short last chunk
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    seen: list[int] = []
    checked: list[tuple[Path, str, str]] = []
    written = ingest.write_split(folder, np.arange(n), images, labels, seen.append, checked)
    assert sum(seen) == n
    return written, [(p.relative_to(folder), sha, pixels) for p, sha, pixels in checked]


def test_many_images_are_written_by_worker_processes_as_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = _write(tmp_path / "one", 1, monkeypatch)
    two = _write(tmp_path / "two", 2, monkeypatch)
    assert one == two and one[0] == 4 * ingest.CHUNK + 7
    for relative, sha, _pixels in two[1]:
        assert hashlib.sha256((tmp_path / "two" / relative).read_bytes()).hexdigest() == sha
    assert sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png")) == (
        sorted(relative for relative, _s, _p in two[1])
    )
    assert _write(tmp_path / "two", 2, monkeypatch)[0] == 0  # again: nothing rewritten


def test_an_interrupted_ingest_is_refused_for_publishing_until_it_is_run_again(
    tmp_path: Path,
) -> None:
    """An outside try published a test split of 5,939 images after a Ctrl-C in `test`."""
    settings = load_settings(write_stack_config(tmp_path))

    def interrupted(split: str, _n: int) -> ingest.Progress:
        def step(_k: int) -> None:
            if split == "test":
                raise KeyboardInterrupt

        return step

    with pytest.raises(KeyboardInterrupt):
        ingest.ingest_mnist(settings, fast=True, progress_for=interrupted)
    with pytest.raises(images.InvalidDataset, match="did not finish .interrupted"):
        folder_guard.check_ingest_finished(settings.mnist_dir)
    ingest.ingest_mnist(settings, fast=True)
    folder_guard.check_ingest_finished(settings.mnist_dir)


def test_a_full_ingest_cut_short_is_not_finished_by_a_fast_one(tmp_path: Path) -> None:
    """helper-31: after a killed full ingest, `--fast` wrote nothing new, cleared the mark,
    and the killed run's 1,036 test images were published."""
    settings = load_settings(write_stack_config(tmp_path))
    mark = settings.mnist_dir / folder_guard.UNFINISHED_INGEST
    settings.mnist_dir.mkdir(parents=True)
    mark.write_text("full: cut short\n")  # what a killed full ingest leaves
    ingest.ingest_mnist(settings, fast=True)
    with pytest.raises(images.InvalidDataset, match="without --fast after a full one"):
        folder_guard.check_ingest_finished(settings.mnist_dir)
    mark.write_text("fast: cut short\n")
    ingest.ingest_mnist(settings, fast=True)
    folder_guard.check_ingest_finished(settings.mnist_dir)
    assert not (settings.mnist_dir / folder_guard.UNFINISHED_INGEST).exists()


def test_a_second_ingest_of_the_same_folder_is_refused_by_name(tmp_path: Path) -> None:
    settings = load_settings(write_stack_config(tmp_path))
    with (
        folder_guard.dataset_in_use(settings.mnist_dir, settings.home / "locks", "data add"),
        pytest.raises(folder_guard.DatasetBusy, match="run `mnistops data ingest` again"),
    ):
        ingest.ingest_mnist(settings, fast=True)


def test_the_images_ingest_writes_are_known_to_the_arrays_cache(tmp_path: Path) -> None:
    """A version's first load copies what ingest wrote instead of decoding its PNGs:
    the cache file holds each file's pixels under the SHA-256 of the file."""
    from mnistops.train import data

    settings = load_settings(write_stack_config(tmp_path))
    ingest.ingest_mnist(settings, fast=True)
    files = sorted((settings.mnist_dir / "test").glob("*/*.png"))
    shas = [hashlib.sha256(path.read_bytes()).digest() for path in files]
    known = data.known_images(settings.home / "cache" / "arrays", set(shas))
    x = np.zeros((len(files), 28, 28), np.uint8)
    assert known.fill(x, shas) == []
    decoded = data._decode_all([(str(path), path.read_bytes()) for path in files])
    assert np.array_equal(x, decoded)
