"""SHA-256 checksums of the files mnistops ships, in `sha256sum`'s SHA256SUMS format."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sums(path: Path) -> dict[str, str]:
    """file name -> sha256, from a SHA256SUMS file."""
    sums = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if digest:
            sums[name.strip()] = digest
    return sums


def write_sum(sums: Path, file: Path) -> None:
    """Record `file`'s checksum in `sums`, in place of any it had there."""
    found = read_sums(sums) if sums.exists() else {}
    found[file.name] = sha256_of(file)
    sums.write_text("".join(f"{digest}  {name}\n" for name, digest in found.items()))
