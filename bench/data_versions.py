"""Publishing and pulling dataset versions: mnistops against the tutorial's DVC way.

On the full MNIST (70,000 images), in one run, against one embedded stack:
  baseline: `dvc add` + `dvc push` of the PNG folders for v1.0 (train 30k + test 10k),
            then again after adding the other 30k (v2.0), then `dvc pull` of v2.0 in a
            fresh clone with an empty cache (a worker without a cache);
  mnistops: `mnistops data version v1.0`, `data add` + `data version v2.0`, then
            `mnistops data pull v2.0` with an empty state dir (cold), again into a new
            folder with the objects cached, and again into the folder that has it.
Every step runs as the command a user types. Usage: .venv/bin/python bench/data_versions.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr
from scratch import scratch_settings

from mnistops import stack
from mnistops.clients import CHECKSUM_ENV, client_env, s3_client, s3_keys
from mnistops.settings import load_settings

BIN = Path(sys.executable).parent


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    began = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed, result.stdout + result.stderr


def copy_splits(mnist: Path, target: Path, splits: dict[str, str]) -> None:
    for source, name in splits.items():
        shutil.copytree(mnist / source, target / name, dirs_exist_ok=True)


def point_at_store(repo: Path, env: dict[str, str]) -> None:
    """The machine-specific endpoint of the DVC remote, kept out of git as DVC advises."""
    timed(
        [
            str(BIN / "dvc"),
            "remote",
            "modify",
            "--local",
            "storage",
            "endpointurl",
            env["AWS_ENDPOINT_URL"],
        ],
        repo,
        env,
    )


def run_baseline(mnist: Path, work: Path, env: dict[str, str]) -> dict[str, float | str]:
    repo = work / "tutorial"
    repo.mkdir()
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    timed(["git", "init", "-q"], repo, env)
    timed([str(BIN / "dvc"), "init", "-q"], repo, env)
    timed([str(BIN / "dvc"), "remote", "add", "-d", "storage", "s3://baseline/dvc"], repo, env)
    point_at_store(repo, env)
    copy_splits(mnist, repo / "MNIST", {"train": "train", "test": "test"})
    figures: dict[str, float | str] = {}
    figures["v1 add"], _ = timed([str(BIN / "dvc"), "add", "MNIST"], repo, env)
    figures["v1 push"], _ = timed([str(BIN / "dvc"), "push"], repo, env)
    timed([*git, "add", "-A"], repo, env)
    timed([*git, "commit", "-qm", "v1.0"], repo, env)
    timed([*git, "tag", "v1.0"], repo, env)
    copy_splits(mnist, repo / "MNIST", {"train_v2": "train"})
    figures["v2 add"], _ = timed([str(BIN / "dvc"), "add", "MNIST"], repo, env)
    figures["v2 push"], out = timed([str(BIN / "dvc"), "push"], repo, env)
    pushed = re.search(r"(\d+) files? pushed", out)
    figures["v2 objects"] = pushed.group(1) if pushed else "?"
    figures["v2 bytes"] = sum(p.stat().st_size for p in (mnist / "train_v2").rglob("*.png"))
    timed([*git, "add", "-A"], repo, env)
    timed([*git, "commit", "-qm", "v2.0"], repo, env)
    clone = work / "worker"
    timed(["git", "clone", "-q", str(repo), str(clone)], work, env)
    point_at_store(clone, env)
    figures["pull cold"], _ = timed([str(BIN / "dvc"), "pull"], clone, env)
    return figures


def run_mnistops(config_dir: Path, work: Path, env: dict[str, str]) -> dict[str, float | str]:
    cli = [str(BIN / "mnistops"), "--config-dir", str(config_dir)]
    settings = load_settings(config_dir)
    figures: dict[str, float | str] = {}
    figures["v1 publish"], _ = timed([*cli, "data", "version", "v1.0", "-m", "v1"], work, env)
    timed([*cli, "data", "add", str(settings.mnist_dir / "train_v2")], work, env)
    figures["v2 publish"], out = timed([*cli, "data", "version", "v2.0", "-m", "v2"], work, env)
    sent = re.search(r"in (\d+) new objects, ([\d.]+) MB sent", out)
    figures["v2 objects"], figures["v2 bytes"] = (
        (sent.group(1), float(sent.group(2)) * 1e6) if sent else ("?", 0)
    )
    # A worker: only the stack's variables, an empty HOME and an empty state dir.
    worker = work / "worker"
    worker.mkdir()
    worker_env = {"PATH": env["PATH"], "HOME": str(worker), **client_env(settings)}
    worker_env["MNISTOPS_S3__BUCKETS__DVC"] = settings.s3.buckets.dvc
    pull = [str(BIN / "mnistops"), "data", "pull", "v2.0", "--to"]
    figures["pull cold"], _ = timed([*pull, str(worker / "a")], worker, worker_env)
    figures["pull cached"], _ = timed([*pull, str(worker / "b")], worker, worker_env)
    figures["pull again"], _ = timed([*pull, str(worker / "b")], worker, worker_env)
    # The same check in-process, without the interpreter's start-up and imports.
    from mnistops.data import pulling

    worker_settings = load_settings(config_dir).model_copy(update={"home": worker / ".mnistops"})
    keys = s3_keys(settings)
    worker_settings.s3 = worker_settings.s3.model_copy(
        update={
            "endpoint_url": settings.s3_endpoint,
            "access_key_id": keys.access_key_id,
            "secret_access_key": SecretStr(keys.secret_access_key),
        }
    )
    began = time.perf_counter()
    assert pulling.pull(worker_settings, "v2.0", worker / "b").already_there
    figures["pull again in-process"] = time.perf_counter() - began
    return figures


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        settings = scratch_settings(root)
        print("starting a stack and ingesting the full MNIST ...", flush=True)
        stack.up(settings)
        try:
            env = {**os.environ, **client_env(settings), **CHECKSUM_ENV}
            timed(
                [str(BIN / "mnistops"), "--config-dir", str(root / "config"), "data", "ingest"],
                root,
                env,
            )
            s3_client(settings).create_bucket(Bucket="baseline")
            pristine = root / "pristine"
            shutil.copytree(settings.mnist_dir, pristine)
            base_dir = root / "base"
            base_dir.mkdir()
            print("baseline: dvc add + dvc push ...", flush=True)
            base = run_baseline(pristine, base_dir, env)
            print("mnistops ...", flush=True)
            ours = run_mnistops(root / "config", root, env)
        finally:
            stack.down(settings)

    base_publish = base["v1 add"] + base["v1 push"] + base["v2 add"] + base["v2 push"]
    our_publish = ours["v1 publish"] + ours["v2 publish"]
    rows = [
        ("publish v1.0 (40,000 images)", base["v1 add"] + base["v1 push"], ours["v1 publish"]),
        ("publish v2.0 (+30,000 images)", base["v2 add"] + base["v2 push"], ours["v2 publish"]),
        ("publish v1.0 + v2.0", base_publish, our_publish),
        ("pull v2.0, empty cache (70,000 images)", base["pull cold"], ours["pull cold"]),
    ]
    print(f"\n{'step':<42}{'dvc add+push/pull':>18}{'mnistops':>10}{'speed-up':>10}")
    for name, theirs, mine in rows:
        print(f"{name:<42}{theirs:>17.1f}s{mine:>9.1f}s{theirs / mine:>9.1f}x")
    print(f"{'pull v2.0, objects cached, new folder':<42}{'':>18}{ours['pull cached']:>9.1f}s")
    print(f"{'pull v2.0, into the folder that has it':<42}{'':>18}{ours['pull again']:>9.2f}s")
    print(
        f"{'  the same, in-process (no start-up)':<42}{'':>18}"
        f"{ours['pull again in-process']:>9.2f}s"
    )
    print(
        f"\nbaseline detail: v1 add {base['v1 add']:.1f}s, v1 push {base['v1 push']:.1f}s, "
        f"v2 add {base['v2 add']:.1f}s, v2 push {base['v2 push']:.1f}s"
    )
    print(
        f"sent for v2.0: baseline {base['v2 objects']} objects, {base['v2 bytes'] / 1e6:.1f} MB"
        f" of PNGs; mnistops {ours['v2 objects']} objects, {ours['v2 bytes'] / 1e6:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
