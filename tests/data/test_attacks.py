"""An attacker with the S3 keys writes crafted versions into the bucket: every command that
reads them names the bad version, writes nothing outside its destination, and the good
versions still list and pull."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistops.data import reader
from mnistops.settings import Settings, load_settings
from tests.data.test_images import bomb_png
from tests.helpers import client_with_v1, craft_version, put_object, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.security]

PAYLOAD = b"import os; open(os.path.expanduser('~/pwned'), 'w').write('pwned')\n"
OLD = "2000-01-01T00:00:00+00:00"


def digit_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def victim(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A machine with one good version v1.0 in its own bucket."""
    yield client_with_v1(stack_settings, tmp_path_factory.mktemp("victim"))


def refused_cleanly(done, *expected: str) -> str:
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode in (1, 2), text
    assert "Traceback" not in done.stderr, done.stderr
    for part in expected:
        assert part in text, text
    return text


def test_a_manifest_path_leading_outside_writes_nothing(victim: Path, tmp_path: Path) -> None:
    settings = load_settings(victim)
    venv = tmp_path / "venv" / "site-packages"
    venv.mkdir(parents=True)
    out = tmp_path / "pulled"
    climb = "/".join([".."] * (len(out.parts) + 2))
    escape = f"train/0/{climb}{venv}/zz.pth"
    craft_version(settings, "evil", {escape: PAYLOAD}, filler=digit_png(), created=OLD)
    done = run_cli("data", "pull", "evil", "--to", str(out), config_dir=victim)
    refused_cleanly(done, "evil", "not train|test/<digit>/<file name>", "not used")
    assert list(venv.iterdir()) == [], "nothing reached the venv"
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "venv"]
    good = run_cli("data", "pull", "v1.0", "--to", str(out), config_dir=victim)
    assert good.returncode == 0, good.stderr
    assert len(list(out.rglob("*.png"))) == 800


def test_a_record_that_lies_about_its_tag_is_skipped(victim: Path, tmp_path: Path) -> None:
    settings = load_settings(victim)
    target = settings.home.parent / "victim.json"
    target.write_text("keep")
    key = craft_version(settings, "../../../victim", {}, key="liar", filler=digit_png())
    put_object(settings, "versions/broken.json", b"{not json")
    put_object(settings, "versions/..%2f..%2fx.json", b"{}")
    listed = run_cli("data", "list", config_dir=victim)
    assert listed.returncode == 0, listed.stderr
    assert "v1.0" in listed.stdout and "Traceback" not in listed.stderr
    stderr = " ".join(listed.stderr.split())
    for name in (key, "versions/broken.json", "not a usable tag", "is invalid", "skipped"):
        assert name in stderr, stderr
    for tag in ("liar", "broken", "../../../victim"):
        pulled = run_cli("data", "pull", tag, "--to", str(tmp_path / "x"), config_dir=victim)
        refused_cleanly(pulled)
    assert target.read_text() == "keep"
    latest = run_cli("data", "pull", "latest", "--to", str(tmp_path / "latest"), config_dir=victim)
    assert latest.returncode == 0 and "v1.0: 800 images" in latest.stdout, latest.stderr
    tags = [r.tag for r in reader.list_versions(settings)]
    assert "v1.0" in tags and not {"liar", "broken", "../../../victim"} & set(tags)


def test_training_on_a_crafted_version_is_refused_by_name(victim: Path, tmp_path: Path) -> None:
    settings = load_settings(victim)
    bomb = bomb_png(tmp_path / "bomb.png", side=5000).read_bytes()
    craft_version(settings, "bomb", {"train/3/bomb.png": bomb}, filler=digit_png(), created=OLD)
    done = run_cli("train", "--fast", "--data-version", "bomb", config_dir=victim)
    refused_cleanly(done, "train/3/bomb.png", "decompression bomb", "not used")
    arrays = (settings.home / "cache" / "arrays").glob("*.npz")
    cached = [p for p in arrays if p.name != "ingested.npz"]  # what `data ingest` wrote
    assert cached == [], "nothing cached from a refused version"


def test_a_record_lying_about_its_content_poisons_no_cache(victim: Path) -> None:
    """A version whose record claims v1.0's content hash (which names v1.0's array cache)
    over other images: refused, and v1.0's cache is not written from it."""
    settings = load_settings(victim)
    v1 = reader.find_record(settings, "v1.0")
    craft_version(
        settings, "hashswap", {}, filler=digit_png(), created=OLD, content_hash=v1.content_hash
    )
    done = run_cli("train", "--fast", "--data-version", "hashswap", config_dir=victim)
    refused_cleanly(done, "hashswap", "does not match the record's content hash")
    assert not (settings.home / "cache" / "arrays" / f"{v1.content_hash}.npz").exists()
