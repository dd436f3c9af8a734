"""`mnistops predictions`: what the prediction service logged."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mnistops.cli._ui import console, settings, warn


def predictions(
    since: Annotated[
        str | None,
        typer.Option("--since", help="From this date (2026-12-03) or time (UTC) on."),
    ] = None,
) -> None:
    """How many answers the prediction service logged, per model version and per digit."""
    from mnistops.loop.store import parse_since, summary

    cfg = settings()
    found = summary(cfg, parse_since(since))
    for name, why in found.refused:
        warn(f"s3://{cfg.s3.buckets.dvc}/{escape(name)} refused: {escape(why)}")
    where = f"s3://{cfg.s3.buckets.dvc}/predictions/"
    if not found.images:
        console.print(f"no predictions logged{f' since {since}' if since else ''} in {where}")
        return
    span = f"{found.first:%Y-%m-%d %H:%M:%S} to {found.last:%Y-%m-%d %H:%M:%S} UTC"
    console.print(
        f"{found.images} images in {found.requests} requests logged ({span}),"
        f" {found.labels} of them labelled through /feedback"
    )
    versions = Table(header_style="bold")
    versions.add_column("model")
    versions.add_column("images", justify="right")
    for version, n in sorted(found.per_version.items()):
        versions.add_row(version, str(n))
    digits = Table(header_style="bold")
    digits.add_column("digit", justify="right")
    digits.add_column("images", justify="right")
    for digit in range(10):
        digits.add_row(str(digit), str(found.per_digit.get(digit, 0)))
    console.print(versions)
    console.print(digits)
