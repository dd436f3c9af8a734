"""`mnistops data ...`: dataset versions: ingest, add, version, list, pull, diff."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mnistops.cli._ui import console, err, progress_bars, settings, warn, warn_refused
from mnistops.settings import Settings

if TYPE_CHECKING:
    from mnistops.data.ingest import IngestResult
    from mnistops.data.packs import VersionRecord
    from mnistops.data.registry import PublishResult
    from mnistops.flows.events import Announcement
    from mnistops.loop.labels import FeedbackAdded

app = typer.Typer(
    help="Dataset versions: ingest, add, version, list, pull, diff.", no_args_is_help=True
)


@app.command("ingest")
def ingest(
    source: Annotated[
        Path | None,
        typer.Option(
            "--source",
            help="Folder with the four MNIST .gz IDX files (default: the copy "
            "shipped with mnistops).",
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="Mirror URL of the folder holding the four files; verified by SHA-256."
        ),
    ] = None,
    fast: Annotated[bool, typer.Option("--fast", help="A small subset of every split.")] = False,
) -> None:
    """Write MNIST as PNG folders: <data_dir>/MNIST/{train,train_v2,test}/<digit>/<id>.png."""
    from mnistops.data.ingest import ingest_mnist

    with progress_bars() as progress_for:
        result = ingest_mnist(settings(), source, url, fast, progress_for)
    show_ingested(result)


def show_ingested(result: IngestResult) -> None:
    for split, count in result.written.items():
        console.print(f"{split:<9} {count:>6} files written")
    console.print(f"PNG folders in {result.root}")


@app.command("add")
def add(
    folder: Annotated[
        Path | None, typer.Argument(help="Folder of label folders: DIR/<digit>/*.png")
    ] = None,
    feedback: Annotated[
        bool,
        typer.Option(
            "--feedback",
            help="Add the predictions labelled through the service's /feedback instead.",
        ),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="With --feedback: predictions from this date or time on."),
    ] = None,
) -> None:
    """Merge a folder of labelled 28x28 grayscale PNGs (or the labelled predictions of
    the service, --feedback) into the training set."""
    if feedback == (folder is not None):
        raise typer.BadParameter("give a FOLDER, or --feedback (not both)")
    if since is not None and not feedback:
        raise typer.BadParameter("--since goes with --feedback")
    if folder is not None:
        add_images(settings(), folder)
    else:
        add_feedback(settings(), since)


def add_feedback(cfg: Settings, since: str | None) -> None:
    from mnistops.loop.labels import add_feedback as add_labelled
    from mnistops.loop.store import parse_since

    with progress_bars() as progress_for:
        report = add_labelled(cfg, parse_since(since), progress_for)
    show_feedback_added(cfg, report)


def show_feedback_added(cfg: Settings, report: FeedbackAdded) -> None:
    from mnistops.data.images import shown_name

    warn_refused(cfg, report.refused)
    for name, why in report.logged_twice:
        where = f"s3://{cfg.s3.buckets.dvc}/{shown_name(name)}"
        warn(f"{where}: {why}; the first is used")
    for name, twin in report.in_test:
        warn(
            f"{name} refused: its pixels are those of the test image {twin}, as"
            " sent or as the service converts it (the test set stays unseen)"
        )
    for name, twin, rms in report.near_test:
        warn(
            f"{name} refused: it is nearly the test image {twin} ({rms:.1f} grey levels"
            " apart, root mean square; different digits are about 50 apart)"
        )
    for name, twin in report.in_train:
        warn(
            f"{name} refused: its pixels are those of the training image {twin}"
            " (one image never holds two labels)"
        )
    for name, why in report.same_drawing:
        warn(f"{name} refused: {why}")
    for name in report.blank:
        warn(f"{name} refused: nothing is drawn in it (every pixel the same)")
    if report.unmatched:
        warn(
            f"{report.unmatched} label(s) name a prediction that is not in the log: shed by a"
            " full buffer, in a batch refused above, or not written yet (a batch is written"
            " within serve.log.batch_s)"
        )
    added = report.added
    total = sum(added.values())
    per_class = ", ".join(f"{d}: {n}" for d, n in added.items())
    console.print(
        f"{report.labels} labelled prediction(s); added {total} images to"
        f" {cfg.mnist_dir / 'train'} ({per_class or 'none new'})"
        + (f", {report.moved} of them moved from another digit" if report.moved else "")
        + (f", {report.already} already there" if report.already else "")
    )


def add_images(cfg: Settings, folder: Path) -> None:
    from mnistops.data import adding

    with progress_bars() as progress_for:
        added = adding.add_images(cfg, folder, progress_for)
    total = sum(added.values())
    per_class = ", ".join(f"{d}: {n}" for d, n in added.items())
    console.print(f"added {total} images to {cfg.mnist_dir / 'train'} ({per_class or 'none new'})")


@app.command("version")
def version(
    tag: Annotated[str, typer.Argument(help="Version tag, e.g. v1.0")],
    message: Annotated[str, typer.Option("-m", "--message", help="What this version is.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing tag.")] = False,
) -> None:
    """Validate the dataset, record it with DVC, push it, and tag it.

    Images must be 8-bit grayscale 28x28 PNGs in label folders 0-9: other modes and sizes
    are refused, not converted. No image may be in both train and test, no class empty.
    """
    publish(settings(), tag, message, force)


def publish(cfg: Settings, tag: str, message: str, force: bool = False) -> None:
    """Publish a version with progress bars, show it, and announce it to Prefect."""
    from mnistops.data import registry
    from mnistops.flows.events import announce

    with progress_bars() as progress_for:
        result = registry.publish(cfg, tag, message, force, progress_for, console.log)
    show_published(result)
    show_announced(announce(cfg, result.record.tag, result.record.content_hash))


def show_published(result: PublishResult) -> None:
    record = result.record
    table = Table(title=f"{record.tag}: images per class", header_style="bold", box=None)
    table.add_column("split")
    for digit in range(10):
        table.add_column(str(digit), justify="right")
    table.add_column("total", justify="right")
    for split, per in record.counts.items():
        table.add_row(split, *(str(per[str(d)]) for d in range(10)), str(sum(per.values())))
    console.print(table)
    if record.previous:
        added = sum(c.added for c in result.changes)
        removed = sum(c.removed for c in result.changes)
        console.print(f"since {record.previous}: +{added} -{removed} images")
    console.print(
        f"published {record.tag} ({record.content_hash[:12]}): {result.new_images} new "
        f"images in {result.new_objects} new objects, {result.new_bytes / 1e6:.1f} MB sent"
    )


def show_announced(announcement: Announcement) -> None:
    from mnistops.flows.events import PUBLISHED_EVENT

    if announcement.problem:
        warn(announcement.problem)
    elif announcement.listener:
        console.print(f"event {PUBLISHED_EVENT} sent: {announcement.listener} starts a retraining")
    else:
        console.print(
            f"event {PUBLISHED_EVENT} sent; no deployment listens for it yet"
            " (`mnistops deploy` creates the retraining deployment)"
        )


@app.command("list")
def list_versions() -> None:
    """Show every published version."""
    show_versions(settings())


def show_versions(cfg: Settings) -> None:
    from mnistops.data import reader

    listing = reader.version_listing(cfg)
    show_versions_of(listing.records, listing.problems, listing.places, listing.warnings)


def show_versions_of(
    records: list[VersionRecord],
    problems: list[str],
    places: dict[str, int] | None = None,
    warnings: list[str] | None = None,
) -> None:
    """The table of versions in the order they were published (#: their place, which
    every host sees; the date is what the publisher's clock said), and the records that
    were skipped as invalid or whose claims disagree with that order."""
    table = Table(title="data versions, oldest first", header_style="bold")
    for column in ("#", "tag", "date", "message", "train", "test", "content hash"):
        table.add_column(column)
    for r in records:
        place = (places or {}).get(r.tag)
        table.add_row(
            str(place) if place is not None else "-",
            r.tag,
            r.created[:19].replace("T", " "),
            escape(r.message),
            str(r.images.get("train", 0)),
            str(r.images.get("test", 0)),
            r.content_hash[:12],
        )
    console.print(table if records else "no data version published yet")
    for warning in warnings or []:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    for problem in problems:
        err.print(f"[yellow]skipped:[/] {escape(problem)}", highlight=False)


@app.command("pull")
def pull(
    tag: Annotated[str, typer.Argument(help="Version tag, or 'latest'")],
    to: Annotated[Path, typer.Option("--to", help="Folder to write the PNG folders into.")],
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="If the folder already holds the version, check every file's size "
            "(default: the count of files per folder).",
        ),
    ] = False,
) -> None:
    """Write exactly that version as PNG folders (needs only the object store)."""
    from mnistops.data import pulling

    with progress_bars() as progress_for:
        result = pulling.pull(settings(), tag, to, progress_for, verify, console.log)
    state = "already there" if result.already_there else f"{result.downloaded} objects downloaded"
    console.print(f"{result.record.tag}: {result.images} images in {result.target} ({state})")


@app.command("diff")
def diff(
    a: Annotated[str, typer.Argument(help="Older version tag")],
    b: Annotated[str, typer.Argument(help="Newer version tag")],
) -> None:
    """Images added and removed per class from version A to version B."""
    from mnistops.data import registry

    changes = registry.diff(settings(), a, b)
    table = Table(title=f"{a} -> {b}", header_style="bold")
    for column in ("split", "digit", "added", "removed", "from feedback"):
        table.add_column(column, justify="right")
    for c in changes:
        if c.added or c.removed:
            table.add_row(
                c.split, str(c.label), f"+{c.added}", f"-{c.removed}", str(c.from_feedback)
            )
    console.print(table if any(c.added or c.removed for c in changes) else "no difference")
    feedback = sum(c.from_feedback for c in changes)
    if feedback:
        console.print(f"{feedback} of the added images came from feedback (/feedback labels)")
