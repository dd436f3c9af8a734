"""The loop's tests share one service on the demo's stack."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import yaml

from mnistops.settings import Settings
from mnistops.stack.ports import free_port_pair
from tests.loop.service import Service


@pytest.fixture(scope="package")
def service(demo_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Its own port, batches of 1 s or 40 records, at most 60 labels a minute, and a copy
    of the demo's data folder (feedback goes there, not into the demo's); monitoring by
    its inputs and digits only."""
    root = tmp_path_factory.mktemp("loop")
    demo: Settings = demo_run["settings"]
    config_dir = root / "config"
    shutil.copytree(demo_run["config_dir"], config_dir)
    shutil.copytree(demo.mnist_dir, root / "data" / demo.dataset.name, symlinks=True)
    stack_yml = config_dir / "stack.yml"
    config = yaml.safe_load(stack_yml.read_text())
    config["home"] = str(demo.home.absolute())
    config["data_dir"] = str(root / "data")
    config["serve"] = {
        **config.get("serve", {}),
        "port": free_port_pair(),
        "log": {"batch_s": 1, "batch_records": 40, "feedback_per_minute": 60},
    }
    # the demo's --fast champion is unsure of nearly every answer: judge its inputs
    config["monitoring"] = {"low_confidence": 0.01}
    stack_yml.write_text(yaml.safe_dump(config))
    running = Service(config_dir, root)
    running.start()
    yield running
    running.stop()
