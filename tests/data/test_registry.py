"""Dataset versions against the real stack: ingest, publish, pull elsewhere, diff, failures."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mnistops import stack
from mnistops.clients import s3_client
from mnistops.data import packs, pulling, reader, registry, remote
from mnistops.settings import Settings, load_settings
from tests.held_proxy import HeldProxy
from tests.helpers import cli_command, client_config, kill_service, run_cli

pytestmark = pytest.mark.integration


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*.png")
    }


@pytest.fixture(scope="module")
def publisher(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The config dir of a machine that ingests MNIST (--fast) into its own DVC bucket."""
    root = tmp_path_factory.mktemp("publisher")
    config_dir = client_config(stack_settings, root, bucket=f"dvc-{uuid.uuid4().hex[:8]}")
    result = run_cli("data", "ingest", "--fast", config_dir=config_dir)
    assert result.returncode == 0, result.stderr
    yield config_dir


def settings_of(config_dir: Path) -> Settings:
    return load_settings(config_dir)


def git(settings: Settings, *args: str) -> str:
    """The output of a git command in the data registry."""
    return subprocess.run(
        ["git", "-C", str(settings.registry_dir), *args], capture_output=True, text=True
    ).stdout


def git_tags(settings: Settings) -> list[str]:
    return git(settings, "tag").split()


def elsewhere(publisher: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of another machine: only what `stack env` prints (and the bucket),
    an empty HOME, so an empty state dir and object cache."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    exported = run_cli("stack", "env", config_dir=publisher).stdout
    for line in exported.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    env["MNISTOPS_S3__BUCKETS__DVC"] = settings_of(publisher).s3.buckets.dvc
    return env


def test_ingest_writes_the_splits_and_is_safe_to_rerun(publisher: Path) -> None:
    settings = settings_of(publisher)
    counts = {
        split: len(list((settings.mnist_dir / split).rglob("*.png")))
        for split in ("train", "train_v2", "test")
    }
    assert counts == {"train": 600, "train_v2": 600, "test": 200}
    again = run_cli("data", "ingest", "--fast", config_dir=publisher)
    assert again.returncode == 0
    assert again.stdout.count(" 0 files written") == 3


def test_ingest_refuses_a_damaged_source(tmp_path: Path) -> None:
    from mnistops.data import mnist

    for name in mnist.FILES.values():
        (tmp_path / name).write_bytes((mnist.packaged_dir() / name).read_bytes())
    damaged = tmp_path / mnist.FILES["test_labels"]
    payload = bytearray(damaged.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    damaged.write_bytes(bytes(payload))
    result = run_cli("data", "ingest", "--source", str(tmp_path), config_dir=tmp_path, cwd=tmp_path)
    assert result.returncode != 0
    assert str(damaged) in result.stderr and "SHA-256" in result.stderr
    assert not (tmp_path / "data").exists(), "nothing is written from a damaged source"


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server on loopback serving a copy of the four MNIST files."""
    import socket
    import sys
    import time

    from mnistops.data import mnist

    folder = tmp_path / "mirror"
    folder.mkdir()
    for name in mnist.FILES.values():
        (folder / name).write_bytes((mnist.packaged_dir() / name).read_bytes())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", folder
    finally:
        server.terminate()
        server.wait(10)


def test_ingest_from_a_mirror_checks_the_download(mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, folder = mirror
    work = tmp_path / "work"
    work.mkdir()
    good = run_cli("data", "ingest", "--url", url, "--fast", config_dir=work, cwd=work)
    assert good.returncode == 0, good.stderr
    assert len(list((work / "data" / "MNIST" / "test").rglob("*.png"))) == 200
    damaged = folder / "train-labels-idx1-ubyte.gz"
    payload = bytearray(damaged.read_bytes())
    payload[100] ^= 0xFF
    damaged.write_bytes(bytes(payload))
    other = tmp_path / "other"
    other.mkdir()
    bad = run_cli("data", "ingest", "--url", url, "--fast", config_dir=other, cwd=other)
    assert bad.returncode != 0
    assert "train-labels-idx1-ubyte.gz" in bad.stderr and "SHA-256" in bad.stderr
    assert not (other / "data").exists()


def test_publish_v1_then_v2_pull_elsewhere_and_diff(publisher: Path, tmp_path: Path) -> None:
    settings = settings_of(publisher)
    v1 = run_cli("data", "version", "v1.0", "-m", "first 30k", config_dir=publisher)
    assert v1.returncode == 0, v1.stdout + v1.stderr
    assert "published v1.0" in v1.stdout
    assert "no deployment listens for it yet" in " ".join(v1.stdout.split())
    expected = {"v1.0": tree_hashes(settings.mnist_dir)}

    exists = run_cli("data", "version", "v1.0", "-m", "again", config_dir=publisher)
    assert exists.returncode != 0 and "exists already" in exists.stderr
    same = run_cli("data", "version", "v1.1", "-m", "same", config_dir=publisher)
    assert same.returncode != 0 and "nothing changed since v1.0" in same.stderr

    added = run_cli("data", "add", str(settings.mnist_dir / "train_v2"), config_dir=publisher)
    assert added.returncode == 0, added.stderr
    assert "added 600 images" in added.stdout
    result = registry.publish(settings, "v2.0", "more images")
    expected["v2.0"] = tree_hashes(settings.mnist_dir)
    v1_record = reader.find_record(settings, "v1.0")
    assert result.record.previous == "v1.0"
    assert result.new_images == 600
    assert set(v1_record.files.values()) - {v1_record.manifest_md5} <= set(
        result.record.files.values()
    ), "v2.0 reuses every pack of v1.0"
    assert result.new_objects == len(
        set(result.record.files.values()) - set(v1_record.files.values())
    )

    listing = run_cli("data", "list", config_dir=publisher)
    assert "v1.0" in listing.stdout and "v2.0" in listing.stdout and "1200" in listing.stdout

    changes = registry.diff(settings, "v1.0", "v2.0")
    train_v2 = settings.mnist_dir / "train_v2"
    for change in changes:
        count = len(list((train_v2 / str(change.label)).glob("*.png")))
        assert (change.added, change.removed) == ((count, 0) if change.split == "train" else (0, 0))

    # The plain git and dvc commands work in the registry, and the remote is in sync.
    reg = settings.registry_dir
    assert git_tags(settings) == ["v1.0", "v2.0"]
    dvc = Path(os.sys.executable).parent / "dvc"
    status = subprocess.run([str(dvc), "status", "-c"], cwd=reg, capture_output=True, text=True)
    assert status.returncode == 0 and "in sync" in status.stdout, status.stdout + status.stderr

    # Another machine: only what `stack env` prints, an empty HOME, an empty state dir.
    env = elsewhere(publisher, tmp_path)
    elsewhere_dir = tmp_path / "elsewhere"
    elsewhere_dir.mkdir()
    for tag in ("v1.0", "v2.0"):
        pulled = run_cli(
            "data", "pull", tag, "--to", str(elsewhere_dir / tag), env=env, cwd=elsewhere_dir
        )
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        want = {k: v for k, v in expected[tag].items() if k.startswith(("train/", "test/"))}
        assert tree_hashes(elsewhere_dir / tag) == want, tag
    assert len(want) == 1400
    again = run_cli(
        "data", "pull", "v2.0", "--to", str(elsewhere_dir / "v2.0"), env=env, cwd=elsewhere_dir
    )
    assert again.returncode == 0 and "already there" in again.stdout
    assert not (tmp_path / "home" / ".mnistops").exists()

    replaced = run_cli("data", "version", "v2.0", "-m", "replaced", "--force", config_dir=publisher)
    assert replaced.returncode == 0, replaced.stderr
    assert reader.find_record(settings, "v2.0").message == "replaced"
    assert "replaced" in git(settings, "tag", "-n", "v2.0")


@pytest.mark.bad_input
def test_bad_dataset_publishes_nothing(publisher: Path) -> None:
    settings = settings_of(publisher)
    bad = settings.mnist_dir / "train" / "4" / "broken.png"
    bad.write_text("not an image")
    try:
        before = [r.tag for r in reader.list_versions(settings)]
        result = run_cli("data", "version", "v9.9", "-m", "bad", config_dir=publisher)
        assert result.returncode != 0
        assert str(bad) in result.stderr and "nothing was recorded" in result.stderr
        assert [r.tag for r in reader.list_versions(settings)] == before
        assert "v9.9" not in git_tags(settings)
    finally:
        bad.unlink()


@pytest.mark.integrity
def test_corrupt_remote_object_is_named_and_never_written(publisher: Path, tmp_path: Path) -> None:
    settings = settings_of(publisher)
    record = reader.find_record(settings, "v1.0")
    pack = next(m for name, m in record.files.items() if name.startswith("packs/"))
    client = s3_client(settings)
    key = remote.object_key(pack)
    original = client.get_object(Bucket=settings.s3.buckets.dvc, Key=key)["Body"].read()
    client.put_object(
        Bucket=settings.s3.buckets.dvc,
        Key=key,
        Body=original[:100] + bytes([original[100] ^ 0xFF]) + original[101:],
    )
    fresh = settings.model_copy(update={"home": tmp_path / "fresh-home"})
    try:
        with pytest.raises(packs.StoreError) as info:
            pulling.pull(fresh, "v1.0", tmp_path / "out")
        assert key in str(info.value) and "corrupt" in str(info.value)
        assert not (tmp_path / "out").exists()
        assert not packs.ObjectCache(tmp_path / "fresh-home" / "cache" / "objects").has(pack)
    finally:
        client.put_object(Bucket=settings.s3.buckets.dvc, Key=key, Body=original)


@contextmanager
def store_dies_at(
    stack_settings: Settings, proc: Callable[[str], subprocess.Popen[str]], method: bytes
) -> Iterator[subprocess.Popen[str]]:
    """The command started by `proc` (given the store's URL) reaches the store through a
    proxy that holds its first request to send or fetch an object; the store dies while
    the command waits on that request's answer: a crash in mid-transfer. The command's
    own speed cannot win that race. The stack is started again at the end."""
    try:
        with HeldProxy(stack_settings.s3.port, method, b"/files/md5/") as proxy:
            started = proc(proxy.url)
            try:
                assert proxy.held.wait(120), f"it never sent a {method!r} of an object"
                kill_service(stack_settings, "s3")
                yield started
            finally:
                started.kill()
    finally:
        stack.up(stack_settings)


def started(
    *args: str,
    endpoint: str,
    env: dict[str, str],
    config_dir: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[str]:
    """A `mnistops` command that uses the object store at `endpoint`."""
    return subprocess.Popen(
        cli_command(args, config_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "AWS_ENDPOINT_URL": endpoint, "MNISTOPS_S3__ENDPOINT_URL": endpoint},
        cwd=cwd,
    )


@pytest.mark.faults
def test_store_killed_while_a_version_is_pushed_then_rerun(
    publisher: Path, stack_settings: Settings, tmp_path: Path
) -> None:
    import numpy as np
    from PIL import Image

    settings = settings_of(publisher)
    # a new image (a copy of another digit's would now be refused: two labels)
    noise = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise, mode="L").save(settings.mnist_dir / "train" / "0" / "extra.png")
    commit = git(settings, "rev-parse", "HEAD")
    version = ("data", "version", "v3.0", "-m", "store dies")
    with store_dies_at(
        stack_settings,
        lambda url: started(*version, endpoint=url, env=dict(os.environ), config_dir=publisher),
        b"PUT ",
    ) as proc:
        killed = time.monotonic()
        output, _ = proc.communicate(timeout=120)
        took = time.monotonic() - killed
        assert proc.returncode == 1, output
        assert "pushing" in output, output
        assert "object store" in output and "Nothing was tagged" in output, output
        assert "Traceback" not in output
        assert took < 30, f"{took:.0f} s to give up"
        assert "v3.0" not in git_tags(settings)
        assert git(settings, "rev-parse", "HEAD") == commit, "nothing committed"
    assert "v3.0" not in [r.tag for r in reader.list_versions(settings)]

    done = run_cli("data", "version", "v3.0", "-m", "store back", config_dir=publisher)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "v3.0" in git_tags(settings)
    pulled = run_cli(
        "data",
        "pull",
        "v3.0",
        "--to",
        str(tmp_path / "v3"),
        env=elsewhere(publisher, tmp_path),
        cwd=tmp_path,
    )
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    want = {
        k: v
        for k, v in tree_hashes(settings.mnist_dir).items()
        if k.startswith(("train/", "test/"))
    }
    assert tree_hashes(tmp_path / "v3") == want
    assert len(want) == 1401


@pytest.mark.faults
def test_store_killed_while_a_version_is_pulled_then_rerun(
    publisher: Path, stack_settings: Settings, tmp_path: Path
) -> None:
    settings = settings_of(publisher)
    record = reader.find_record(settings, "v1.0")
    rows = reader.load_manifest(settings, record)
    env = elsewhere(publisher, tmp_path)
    machine = tmp_path / "machine"
    machine.mkdir()
    target = tmp_path / "pulled" / "v1.0"
    pull = ("data", "pull", "v1.0", "--to", str(target))
    with store_dies_at(
        stack_settings,
        lambda url: started(*pull, endpoint=url, env=env, cwd=machine),
        b"GET ",
    ) as proc:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 1, output
        assert "downloading" in output, output
        assert "object store" in output and f"Nothing was written to {target}" in output, output
        assert "Traceback" not in output
        assert not target.exists()
        assert not target.parent.exists() or not any(target.parent.iterdir()), "half-written"
        cache = packs.ObjectCache(machine / ".mnistops" / "cache" / "objects")
        kept = [p for p in cache.root.rglob("*") if p.is_file()] if cache.root.exists() else []
        for path in kept:
            assert packs.md5_bytes(path.read_bytes()) == path.parent.name + path.name, path

    again = run_cli("data", "pull", "v1.0", "--to", str(target), env=env, cwd=machine)
    assert again.returncode == 0, again.stdout + again.stderr
    assert tree_hashes(target) == {row.key: row.sha256 for row in rows}
    verified = run_cli(
        "data", "pull", "v1.0", "--to", str(target), "--verify", env=env, cwd=machine
    )
    assert verified.returncode == 0 and "already there" in verified.stdout, verified.stdout
