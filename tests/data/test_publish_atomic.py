"""`data version` is atomic and exclusive: interrupted (Ctrl-C) after each of its steps it
leaves either nothing — no record, no tag — or the whole version, and the same command
then finishes it; two publishers at once never leave a record and a tag that disagree."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistops.clients import s3_client
from mnistops.data import reader, registry, remote
from mnistops.settings import Settings, load_settings
from tests.helpers import cli_command, client_with_v1, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.faults]

STEPS = ["validated", "packed", "pushed", "verified", "committed", "tagged", "recorded"]


@pytest.fixture(scope="module")
def publisher(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield client_with_v1(stack_settings, tmp_path_factory.mktemp("atomic"))


def add_image(settings: Settings, name: str) -> None:
    pixels = np.random.default_rng(abs(hash(name)) % 2**32).integers(0, 255, (28, 28), np.uint8)
    Image.fromarray(pixels, mode="L").save(settings.mnist_dir / "train" / "5" / f"{name}.png")


def state(settings: Settings, tag: str) -> tuple[str | None, str | None]:
    """(the commit the bucket's record names, the commit the git tag names)."""
    record = remote.read_record(s3_client(settings), settings.s3.buckets.dvc, tag)
    tagged = subprocess.run(
        ["git", "-C", str(settings.registry_dir), "rev-parse", "--verify", "-q", f"{tag}^{{}}"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (record.commit if record else None), (tagged or None)


@pytest.mark.parametrize("step", STEPS)
def test_ctrl_c_after_each_step_leaves_nothing_or_everything(publisher: Path, step: str) -> None:
    settings = load_settings(publisher)
    tag = f"v-{step}"
    add_image(settings, step)
    env = {**os.environ, registry.INTERRUPT_AT_ENV: step}
    cut = run_cli("data", "version", tag, "-m", f"cut after {step}", config_dir=publisher, env=env)
    assert cut.returncode != 0, cut.stdout
    assert "Traceback" not in cut.stderr
    recorded, tagged = state(settings, tag)
    if step == "recorded":
        assert recorded is not None and recorded == tagged, "the version is whole"
        again = run_cli("data", "version", tag, "-m", "again", config_dir=publisher)
        assert again.returncode != 0 and "exists already" in again.stderr
    else:
        assert (recorded, tagged) == (None, None), f"half a version after {step}"
        again = run_cli("data", "version", tag, "-m", "finished", config_dir=publisher)
        assert again.returncode == 0, again.stdout + again.stderr
        recorded, tagged = state(settings, tag)
        assert recorded is not None and recorded == tagged
    assert reader.find_record(settings, tag).tag == tag


def test_two_publishers_at_once_agree(publisher: Path) -> None:
    settings = load_settings(publisher)
    add_image(settings, "race")
    procs = [
        subprocess.Popen(
            cli_command(("data", "version", "v-race", "-m", f"publisher {n}"), publisher),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _out, _err in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, _out, err in results if code != 0)
    assert "another `mnistops data version`" in loser or "exists already" in loser, loser
    record = reader.find_record(settings, "v-race")
    winner = next(out for code, out, _err in results if code == 0)
    assert f"publisher {1 if 'publisher 1' in record.message else 2}" == record.message
    assert "published v-race" in winner
    recorded, tagged = state(settings, "v-race")
    assert recorded == tagged
    message = subprocess.run(
        ["git", "-C", str(settings.registry_dir), "tag", "-l", "-n1", "v-race"],
        capture_output=True,
        text=True,
    ).stdout
    assert record.message in message


def test_force_keeps_a_versions_place_in_the_history(publisher: Path) -> None:
    """Replacing an older version with --force does not make it 'latest', nor the newer
    version its predecessor."""
    settings = load_settings(publisher)
    add_image(settings, "history-a")
    assert run_cli("data", "version", "v-old", "-m", "old", config_dir=publisher).returncode == 0
    add_image(settings, "history-b")
    assert run_cli("data", "version", "v-new", "-m", "new", config_dir=publisher).returncode == 0
    old = reader.find_record(settings, "v-old")
    add_image(settings, "history-c")
    forced = run_cli("data", "version", "v-old", "-m", "replaced", "--force", config_dir=publisher)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    replaced = reader.find_record(settings, "v-old")
    assert replaced.message == "replaced" and replaced.previous == old.previous
    changes = registry.diff(settings, replaced.previous, "v-old")
    added, removed = sum(c.added for c in changes), sum(c.removed for c in changes)
    assert f"since {replaced.previous}: +{added} -{removed} images" in forced.stdout
    assert replaced.created == old.created
    assert reader.find_record(settings, "latest").tag == "v-new"
    recorded, tagged = state(settings, "v-old")
    assert recorded == tagged == replaced.commit


def stopped(pid: int, timeout_s: float = 60) -> None:
    """Wait until the process has stopped itself (SIGSTOP)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    raise AssertionError("the command never reached its pause")


@pytest.mark.bad_input
def test_files_changed_during_a_publish_are_named_and_nothing_is_published(
    publisher: Path,
) -> None:
    """Between validation and packing an image is removed and another added, and `data
    add` is tried on the same folder: the publish stops naming the file (no traceback,
    nothing recorded or tagged), `data add` is refused while it runs, and the same
    command then publishes."""
    import signal

    settings = load_settings(publisher)
    tag = "v-changed"
    for name in ("changed-a", "changed-b"):
        add_image(settings, name)
    gone = settings.mnist_dir / "train" / "5" / "changed-a.png"
    env = {**os.environ, registry.PAUSE_AT_ENV: "validated"}
    proc = subprocess.Popen(
        cli_command(("data", "version", tag, "-m", "while changing"), publisher),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        stopped(proc.pid)
        busy = run_cli("data", "add", str(settings.mnist_dir / "train"), config_dir=publisher)
        busy_said = " ".join(busy.stderr.split())
        assert busy.returncode == 2, busy.stderr
        assert "another `mnistops data ingest`, `mnistops data add` or" in busy_said
        gone.unlink()
        add_image(settings, "changed-c")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    said = " ".join(err.split())
    assert proc.returncode == 2 and "Traceback" not in err, out + err
    assert f"{gone}: removed or replaced after it was validated" in said, said
    assert "nothing was published" in said and f"mnistops data version {tag}` again" in said
    assert state(settings, tag) == (None, None)
    again = run_cli("data", "version", tag, "-m", "settled", config_dir=publisher)
    assert again.returncode == 0, again.stdout + again.stderr
    assert reader.find_record(settings, tag).images["train"] > 0


def test_a_folder_an_interrupted_ingest_left_is_not_published(publisher: Path) -> None:
    """An outside try: Ctrl-C during ingest's test split, then `data version` published a
    test split of 5,939 images. The mark ingest leaves until it finishes is refused by
    name (tests/data/test_ingest.py interrupts a real ingest)."""
    from mnistops.data import folder_guard

    settings = load_settings(publisher)
    tag = "v-half-ingested"
    add_image(settings, "half")
    mark = settings.mnist_dir / folder_guard.UNFINISHED_INGEST
    mark.write_text("interrupted\n")
    try:
        refused = run_cli("data", "version", tag, "-m", "half", config_dir=publisher)
    finally:
        mark.unlink()
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, said
    assert "`mnistops data ingest` into it did not finish" in said, said
    assert state(settings, tag) == (None, None)
    again = run_cli("data", "version", tag, "-m", "whole", config_dir=publisher)
    assert again.returncode == 0, again.stdout + again.stderr
