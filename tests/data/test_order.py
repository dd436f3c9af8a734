"""Which version is `latest` is decided by the object store, not by clocks: a publisher
whose clock is 14 minutes behind (libfaketime), a record that claims a date in the
future, and two hosts publishing at the same moment all leave one order every host
sees, in which nothing published is lost."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mnistops.data import reader
from mnistops.settings import Settings, load_settings
from tests.helpers import cli_command, client_config, client_with_v1, craft_version, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.integrity]


@pytest.fixture(scope="module")
def publisher(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield client_with_v1(stack_settings, tmp_path_factory.mktemp("order"))


def add_image(settings: Settings, name: str) -> None:
    pixels = np.random.default_rng(abs(hash(name)) % 2**32).integers(0, 255, (28, 28), np.uint8)
    folder = settings.mnist_dir / "train" / "4"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(folder / f"{name}.png")


def faketime() -> str:
    found = shutil.which("faketime")
    if found is None:
        message = "no faketime: apt-get install faketime"
        if os.environ.get("MNISTOPS_REQUIRE_FAKETIME") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def listed(config_dir: Path) -> tuple[list[str], str]:
    """(the tags `data list` shows, in its order; its warnings)."""
    done = run_cli("data", "list", config_dir=config_dir)
    assert done.returncode == 0, done.stderr
    tags = [
        cells[1]
        for line in done.stdout.splitlines()
        if len(cells := [c.strip() for c in line.split("│")][1:-1]) == 7 and cells[0] != "#"
    ]
    return tags, " ".join(done.stderr.split())


def test_a_clock_behind_or_a_date_in_the_future_never_decides_latest(publisher: Path) -> None:
    settings = load_settings(publisher)
    add_image(settings, "order-3")
    assert run_cli("data", "version", "v3.0", "-m", "three", config_dir=publisher).returncode == 0
    add_image(settings, "order-4")
    behind = subprocess.run(
        [faketime(), "-f", "-14m", *cli_command(("data", "version", "v4.0", "-m", "4"), publisher)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert behind.returncode == 0, behind.stdout + behind.stderr
    assert (
        reader.find_record(settings, "v4.0").created < reader.find_record(settings, "v3.0").created
    )

    filler = next((settings.mnist_dir / "test" / "0").glob("*.png")).read_bytes()
    craft_version(settings, "v9.9", {}, filler=filler)  # claims 2099, written by hand
    tags, warnings = listed(publisher)
    assert tags == ["v9.9", "v1.0", "v3.0", "v4.0"], tags
    assert "v4.0 claims an earlier date" in warnings and "published after it" in warnings
    assert "v9.9 has no place in the order of publication" in warnings
    assert reader.find_record(settings, "latest").tag == "v4.0"
    pulled = run_cli(
        "data", "pull", "latest", "--to", str(settings.data_dir / "l"), config_dir=publisher
    )
    assert pulled.returncode == 0 and "v4.0" in pulled.stdout, pulled.stdout + pulled.stderr


def test_two_hosts_publishing_at_once_both_get_a_place(
    publisher: Path, stack_settings: Settings, tmp_path: Path
) -> None:
    """Two machines with their own registries and the same bucket publish different tags
    at the same moment: both versions are listed, one after the other, on both."""
    bucket = load_settings(publisher).s3.buckets.dvc
    hosts = []
    for name in ("a", "b"):
        config_dir = client_config(stack_settings, tmp_path / name)
        config = yaml.safe_load((config_dir / "stack.yml").read_text())
        config["s3"]["buckets"] = {"dvc": bucket}
        (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
        pulled = run_cli(
            "data",
            "pull",
            "latest",
            "--to",
            str(tmp_path / name / "data" / "MNIST"),
            config_dir=config_dir,
        )
        assert pulled.returncode == 0, pulled.stderr
        add_image(load_settings(config_dir), f"host-{name}")
        hosts.append(config_dir)
    procs = [
        subprocess.Popen(
            cli_command(("data", "version", f"v5-{name}", "-m", name), config_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, config_dir in zip("ab", hosts, strict=True)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _out, _err in results), results
    orders = [listed(config_dir)[0] for config_dir in (*hosts, publisher)]
    assert orders[0] == orders[1] == orders[2], orders
    assert sorted(orders[0][-2:]) == ["v5-a", "v5-b"], orders[0]
    places = reader.version_listing(load_settings(publisher)).places
    assert places["v5-a"] != places["v5-b"]
