"""The `mnistops` command: a thin layer over the package's functions."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mnistops.logs import Verbosity, quiet_libraries
from mnistops.settings import ConfigError, Settings, load_settings, with_database_url

app = typer.Typer(
    help="MNIST MLOps: versioned data, tracked training, scheduled retraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(
    help="Start, stop and inspect the local stack of services.", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")

console = Console(log_path=False)
err = Console(stderr=True, soft_wrap=True)


class State:
    config_dir: Path | None = None
    noted = False
    """the notes of the settings (ignored keys) were printed"""


@app.callback()
def main(
    config_dir: Annotated[
        Path | None,
        typer.Option("--config-dir", help="Folder of the YAML settings (default ./config)."),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Also show what DVC, MLflow and Prefect log."),
    ] = False,
) -> None:
    State.config_dir = config_dir
    Verbosity.verbose = verbose
    quiet_libraries()


def settings() -> Settings:
    try:
        loaded = load_settings(State.config_dir)
    except ConfigError as exc:
        fail(str(exc), code=2)
    if not State.noted:
        State.noted = True
        for note in loaded.notes:
            err.print(f"[dim]note:[/] {escape(note)}", highlight=False)
    return loaded


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def print_urls(cfg: Settings) -> None:
    from mnistops import stack

    table = Table(title="mnistops stack", show_header=True, header_style="bold")
    table.add_column("service", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("pid", justify="right", no_wrap=True, min_width=5)
    table.add_column("URL", overflow="fold")
    table.add_column("reachable from", overflow="fold")
    statuses = stack.status(cfg)
    for st in statuses:
        state = (
            "[green]healthy[/]"
            if st.healthy
            else ("[yellow]unhealthy[/]" if st.running else "[red]down[/]")
        )
        if st.external:
            state += " (external)"
        table.add_row(st.title, state, str(st.pid or ""), st.url, st.reach)
    console.print(table)
    logs = sorted({str(_shorter(st.log.parent)) for st in statuses if st.log is not None})
    if logs:
        console.print(f"logs: {', '.join(logs)} (`mnistops stack logs NAME`)", soft_wrap=True)


def _shorter(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@stack_app.command("up")
def stack_up(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="PostgreSQL URL for MLflow and Prefect "
            "(postgresql://USER:PASSWORD@HOST:PORT); default SQLite in the state dir.",
        ),
    ] = None,
) -> None:
    """Start the S3 store, the MLflow server and the Prefect server; wait until healthy."""
    from mnistops import stack

    cfg = settings()
    if db:
        try:
            cfg = with_database_url(cfg, db)
        except ConfigError as exc:
            fail(str(exc), code=2)
    for warning in stack.exposure(cfg):
        err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    try:
        with console.status("starting the stack...") as spinner:
            stack.up(cfg, report=lambda msg: (console.log(msg), spinner.update(msg)))
    except (stack.StackError, FileNotFoundError) as exc:
        fail(str(exc))
    print_urls(cfg)
    console.print(
        f'Use it from another shell: [bold]eval "$(mnistops stack env)"[/]. '
        f"Stop it: [bold]mnistops stack down[/]. State: {cfg.home}"
    )


@stack_app.command("down")
def stack_down() -> None:
    """Stop every service started from this state dir (children included)."""
    from mnistops import stack

    cfg = settings()
    stopped = stack.down(cfg, report=console.log)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@stack_app.command("status")
def stack_status() -> None:
    """Show each service: running, pid, URL, healthy. Exit 1 if any is not healthy."""
    from mnistops import stack

    cfg = settings()
    require_stack(cfg)
    print_urls(cfg)
    if not all(st.healthy for st in stack.status(cfg)):
        raise typer.Exit(1)


def require_stack(cfg: Settings) -> None:
    """Stop with where we looked when no stack is found: the object store is ours to run
    but there is no state dir with its keys (a keyless `stack env` helps nobody)."""
    from mnistops.settings import where_looked

    if cfg.s3.endpoint_url is not None or (cfg.home / "credentials.json").is_file():
        return
    looked = where_looked() if cfg.home.parent == Path.cwd().absolute() else str(cfg.home)
    fail(
        f"no mnistops stack found: looked for its state dir (with the S3 keys) in {looked}."
        " Run this in the folder where you ran `mnistops stack up` (or below it), set"
        " MNISTOPS_HOME to its state dir, or start one here with `mnistops stack up`.",
        code=2,
    )


@stack_app.command("env")
def stack_env() -> None:
    """Print `export` lines with which dvc, mlflow, prefect, boto3 and mnistops use this stack."""
    from mnistops.stack.endpoints import client_env

    cfg = settings()
    require_stack(cfg)
    for key, value in client_env(cfg).items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@stack_app.command("serve")
def stack_serve(
    service: Annotated[str, typer.Argument(help="s3, mlflow or prefect")],
) -> None:
    """Run one service in the foreground (for a container or a systemd unit).

    The same server, flags and environment as `stack up` starts, from the same settings;
    ports, bind address, database (database_url) and object store (s3.*) included.
    """
    from mnistops import stack

    cfg = settings()
    try:
        stack.serve(cfg, service)
    except stack.StackError as exc:
        fail(str(exc), code=2)


@stack_app.command("logs")
def stack_logs(
    service: Annotated[str, typer.Argument(help="s3, mlflow or prefect")],
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many last lines.")] = 50,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing.")] = False,
) -> None:
    """Print the last lines of a service's log."""
    from mnistops import stack
    from mnistops.stack import process
    from mnistops.stack.services import SERVICE_NAMES

    cfg = settings()
    if service not in SERVICE_NAMES:
        fail(f"unknown service '{service}'; choose one of: {', '.join(SERVICE_NAMES)}", code=2)
    path = stack.log_dir(cfg) / f"{service}.log"
    if not path.exists():
        fail(f"no log for {service} yet ({path}); start the stack with `mnistops stack up`")
    typer.echo(process.tail(path, lines))
    if follow:
        with open(path, errors="replace") as handle:
            handle.seek(0, 2)
            while True:
                line = handle.readline()
                if line:
                    typer.echo(line, nl=False)
                else:
                    time.sleep(0.5)


DEMO_EPOCHS = 1


@app.command("demo")
def demo(
    fast: Annotated[
        bool, typer.Option("--fast", help="A small share of MNIST and 1 epoch (a smoke test).")
    ] = False,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Epochs of the demo's two trainings.")
    ] = DEMO_EPOCHS,
) -> None:
    """The whole walkthrough on the local stack, from nothing to a scheduled retraining.

    Stack up, MNIST as PNG folders, data version v1.0, a tracked experimental training
    on v1.0, new images and v2.0, the retraining deployment from config/flow.yml, a
    worker, a Quick run on v2.0, then a summary. Trainings are short (--epochs, default
    1) to keep the demo quick; `mnistops train` uses hyp.yml. Safe to re-run: what exists
    (versions, models, the deployment, the worker) is kept and reused.
    """
    from mnistops.data import registry

    epochs = 1 if fast else epochs
    stage(1, "the stack: object store, MLflow tracking, Prefect server")
    stack_up(db=None)
    stage(2, "MNIST as labelled PNG folders")
    data_ingest(source=None, url=None, fast=fast)
    cfg = settings()
    published = {r.tag for r in registry.list_versions(cfg)}
    stage(3, "data version v1.0")
    if "v1.0" in published:
        console.print("v1.0 exists already: kept")
    else:
        data_version("v1.0", "MNIST: the first training images and the test set", force=False)
    stage(4, "experimental training on v1.0, tracked in MLflow")
    demo_experiment(cfg, "v1.0", epochs, fast)
    stage(5, "new images: data version v2.0")
    if "v2.0" in published:
        console.print("v2.0 exists already: kept")
    else:
        data_add(cfg.mnist_dir / "train_v2")
        data_version("v2.0", "MNIST: the new training images added", force=False)
    stage(6, "scheduled retraining: the deployment from config/flow.yml")
    deploy_command()
    stage(7, f"a worker for work pool {cfg.deployment.pool_name}")
    demo_worker(cfg)
    stage(8, "Quick run of the deployment on v2.0")
    retrained = model_trained_on(cfg, "v2.0")
    if retrained:
        console.print(
            f"{cfg.model_registry.name} v{retrained} was trained on v2.0 by an earlier run:"
            " kept (no new data)"
        )
    else:
        start_and_follow(cfg, {"data_version": "v2.0", "epochs": epochs, "fast": fast}, True)
    demo_summary(cfg)


def stage(number: int, title: str) -> None:
    console.rule(f"[bold]{number}. {title}")


def model_trained_on(cfg: Settings, tag: str) -> str | None:
    """The newest registered version trained on data version `tag`, if any."""
    from mlflow import MlflowClient

    from mnistops.tracking.registry import versions
    from mnistops.tracking.runs import TrackingError, check_tracking_server

    try:
        check_tracking_server(cfg)
    except TrackingError as exc:
        fail(str(exc))
    found = [
        v.version
        for v in versions(MlflowClient(cfg.mlflow_uri), cfg.model_registry.name)
        if (v.tags or {}).get("data_version") == tag
    ]
    return found[0] if found else None


def demo_experiment(cfg: Settings, tag: str, epochs: int, fast: bool) -> None:
    """Train on `tag` unless a registered model was trained on it already."""
    found = model_trained_on(cfg, tag)
    if found:
        console.print(f"{cfg.model_registry.name} v{found} was trained on {tag}: kept")
        return
    train_command(
        data_version=tag,
        data_dir=None,
        model=None,
        epochs=epochs,
        batch_size=None,
        lr=None,
        seed=None,
        val_size=None,
        device=None,
        fast=fast,
    )


def demo_worker(cfg: Settings) -> None:
    from mnistops import stack

    name = f"{stack.WORKER_PREFIX}{cfg.deployment.pool_name}"
    for record in stack.worker_records(cfg):
        if record.name == name and stack.process.is_alive(record):
            console.print(f"the worker for this pool runs already (pid {record.pid})")
            return
    worker_command(pool=None, detach=True)


def demo_summary(cfg: Settings) -> None:
    from mlflow import MlflowClient

    from mnistops.flows.deploy import next_run
    from mnistops.tracking.registry import CHAMPION_REASON_TAG, accuracy_of, champion
    from mnistops.tracking.runs import experiment_runs

    console.rule("[bold]summary")
    data_list()
    runs = Table(title=f"MLflow experiment {cfg.experiment_name}")
    for column in ("run", "phase", "data", "model", "epochs", "test acc", "status"):
        runs.add_column(column, justify="right" if column == "test acc" else "left")
    for row in experiment_runs(cfg):
        accuracy = f"{row.test_accuracy:.2%}" if row.test_accuracy is not None else ""
        runs.add_row(
            row.name, row.phase, row.data_version, row.model, row.epochs, accuracy, row.status
        )
    console.print(runs)
    client = MlflowClient(cfg.mlflow_uri)
    best = champion(client, cfg.model_registry.name)
    if best is not None:
        tags = best.tags or {}
        accuracy = accuracy_of(client, best)
        shown = f"{accuracy:.2%}" if accuracy is not None else "unknown accuracy"
        console.print(
            f"champion: [bold]{cfg.model_registry.name} v{best.version}[/]"
            f" ({shown} on the test set, trained on {tags.get('data_version')},"
            f" {tags.get('phase')}): {tags.get(CHAMPION_REASON_TAG, 'set by hand')}",
            highlight=False,
        )
    upcoming = next_run(cfg)
    console.print(f"next scheduled run: {upcoming or 'none planned'}")
    ui = cfg.prefect_api_url.removesuffix("/api")
    console.print(f"MLflow UI:    {cfg.mlflow_uri}")
    console.print(f"Prefect UI:   {ui}  (deployments: {ui}/deployments)")
    buckets = ", ".join(cfg.s3.buckets.model_dump().values())
    console.print(
        f"object store: {cfg.s3_endpoint}  (buckets: {buckets}; keys: `mnistops stack env`)"
    )
    console.print(
        "Try: [bold]mnistops predict IMAGE.png[/], [bold]mnistops models[/],"
        " [bold]mnistops run --wait[/], [bold]mnistops data diff v1.0 v2.0[/]."
    )
    console.print("Stop everything with [bold]mnistops stack down[/] (nothing is lost).")


data_app = typer.Typer(
    help="Dataset versions: ingest, add, version, list, pull, diff.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Rich progress bars; yields `progress_for(label, total)` -> advance(n)."""
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bars:

        def progress_for(label: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(label, total=total or None)
            return lambda n: bars.advance(task, n)

        yield progress_for


def data_errors() -> tuple[type[Exception], ...]:
    from mnistops.data import images, mnist, registry, store

    return (
        registry.RegistryError,
        images.InvalidDataset,
        images.ImageRefused,
        store.StoreError,
        mnist.SourceError,
    )


@data_app.command("ingest")
def data_ingest(
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
    import tempfile

    from mnistops.data import images, ingest, mnist

    cfg = settings()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = source or (mnist.download(url, Path(tmp)) if url else mnist.packaged_dir())
            with progress_bars() as progress_for:
                result = ingest.ingest(
                    folder,
                    cfg.mnist_dir,
                    cfg.dataset,
                    fast,
                    images.index_path(cfg.home),
                    progress_for,
                )
    except data_errors() as exc:
        fail(str(exc))
    for split, count in result.written.items():
        console.print(f"{split:<9} {count:>6} files written")
    console.print(f"PNG folders in {result.root}")


@data_app.command("add")
def data_add(
    folder: Annotated[Path, typer.Argument(help="Folder of label folders: DIR/<digit>/*.png")],
) -> None:
    """Merge a folder of labelled 28x28 grayscale PNGs into the training set."""
    from mnistops.data import registry

    cfg = settings()
    try:
        with progress_bars() as progress_for:
            added = registry.add_images(cfg, folder, progress_for)
    except data_errors() as exc:
        fail(str(exc))
    total = sum(added.values())
    per_class = ", ".join(f"{d}: {n}" for d, n in added.items())
    console.print(f"added {total} images to {cfg.mnist_dir / 'train'} ({per_class or 'none new'})")


@data_app.command("version")
def data_version(
    tag: Annotated[str, typer.Argument(help="Version tag, e.g. v1.0")],
    message: Annotated[str, typer.Option("-m", "--message", help="What this version is.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing tag.")] = False,
) -> None:
    """Validate the dataset, record it with DVC, push it, and tag it.

    Images must be 8-bit grayscale 28x28 PNGs in label folders 0-9: other modes and sizes
    are refused, not converted. No image may be in both train and test, no class empty.
    """
    from mnistops.data import registry

    cfg = settings()
    try:
        with progress_bars() as progress_for:
            result = registry.publish(cfg, tag, message, force, progress_for, console.log)
    except data_errors() as exc:
        fail(str(exc))
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
    announce(cfg, record.tag, record.content_hash)


def announce(cfg: Settings, tag: str, content_hash: str) -> None:
    """Emit the Prefect event that triggers retraining; the version stands if this fails."""
    from mnistops.flows.deploy import PUBLISHED_EVENT, emit_published, listening_deployment

    try:
        emit_published(cfg, tag, content_hash)
        listener = listening_deployment(cfg)
    except KeyboardInterrupt:
        fail(
            f"interrupted: {tag} is published, but the event {PUBLISHED_EVENT} may not have"
            " reached Prefect; start a retraining with `mnistops run`",
            code=130,
        )
    except Exception as exc:  # noqa: BLE001  the publish itself succeeded
        err.print(
            f"[yellow]warning:[/] {tag} is published, but the event {PUBLISHED_EVENT} could not"
            f" be sent to Prefect at {cfg.prefect_api_url} ({exc.__class__.__name__}); start a"
            " retraining with `mnistops run`"
        )
        return
    if listener:
        console.print(f"event {PUBLISHED_EVENT} sent: {listener} starts a retraining")
    else:
        console.print(
            f"event {PUBLISHED_EVENT} sent; no deployment listens for it yet"
            " (`mnistops deploy` creates the retraining deployment)"
        )


@data_app.command("list")
def data_list() -> None:
    """Show every published version."""
    from mnistops.data import registry

    cfg = settings()
    try:
        listing = registry.version_listing(cfg)
    except data_errors() as exc:
        fail(str(exc))
    records = listing.records
    table = Table(title="data versions", header_style="bold")
    for column in ("tag", "date", "message", "train", "test", "content hash"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.tag,
            r.created[:19].replace("T", " "),
            escape(r.message),
            str(r.images.get("train", 0)),
            str(r.images.get("test", 0)),
            r.content_hash[:12],
        )
    console.print(table if records else "no data version published yet")
    for problem in listing.problems:
        err.print(f"[yellow]skipped:[/] {escape(problem)}", highlight=False)


@data_app.command("pull")
def data_pull(
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
    from mnistops.data import registry

    cfg = settings()
    try:
        with progress_bars() as progress_for:
            result = registry.pull(cfg, tag, to, progress_for, verify, console.log)
    except data_errors() as exc:
        fail(str(exc))
    state = "already there" if result.already_there else f"{result.downloaded} objects downloaded"
    console.print(f"{result.record.tag}: {result.images} images in {result.target} ({state})")


@data_app.command("diff")
def data_diff(
    a: Annotated[str, typer.Argument(help="Older version tag")],
    b: Annotated[str, typer.Argument(help="Newer version tag")],
) -> None:
    """Images added and removed per class from version A to version B."""
    from mnistops.data import registry

    cfg = settings()
    try:
        changes = registry.diff(cfg, a, b)
    except data_errors() as exc:
        fail(str(exc))
    table = Table(title=f"{a} -> {b}", header_style="bold")
    for column in ("split", "digit", "added", "removed"):
        table.add_column(column, justify="right")
    for c in changes:
        if c.added or c.removed:
            table.add_row(c.split, str(c.label), f"+{c.added}", f"-{c.removed}")
    console.print(table if any(c.added or c.removed for c in changes) else "no difference")


# --- training, models, prediction --------------------------------------------------------

HYP_OPTIONS = {
    "n_epochs": "--epochs",
    "batch_size": "--batch-size",
    "learning_rate": "--lr",
    "random_seed": "--seed",
    "device": "--device",
    "model": "--model",
    "val_size": "--val-size",
}


def hyperparameters(cfg: Settings, overrides: dict[str, object]):
    """hyp.yml's values with the command's options on top, validated (errors name the option)."""
    from pydantic import ValidationError

    from mnistops.train.loop import with_overrides

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return with_overrides(cfg.hyperparameter, given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0])
            where = (
                HYP_OPTIONS[field] if field in given else f"hyp.yml: key 'hyperparameter.{field}'"
            )
            lines.append(f"{where}: {error['msg']}")
        fail("invalid hyperparameters:\n  " + "\n  ".join(lines), code=2)
    raise AssertionError("unreachable")


def training_data(
    cfg: Settings, data_version: str | None, data_dir: Path | None, fast: bool, seed: int
):
    from mnistops.train import data

    if data_dir is not None and data_version is not None:
        fail("--data-version and --data-dir exclude each other", code=2)
    with console.status("loading the data...") as spinner:
        report = lambda msg: (console.log(msg), spinner.update(msg))  # noqa: E731
        if data_dir is not None:
            arrays = data.load_folder(cfg, data_dir, report)
            console.print(f"[yellow]untracked data[/]: {arrays.source.name}")
        else:
            arrays = data.load_version(cfg, data_version or "latest", report)
    if fast:
        arrays = arrays.subset(cfg.dataset.fast_fraction, seed)
    return arrays


@app.command("train")
def train_command(
    data_version: Annotated[
        str | None,
        typer.Option("--data-version", help="Published data version; default: the latest."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Train on a plain folder (train/<digit>/*.png, test/<digit>/*.png) instead;"
            " the run is tagged as untracked data.",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="digitnet or seednet")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (the peak one).")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    val_size: Annotated[float | None, typer.Option("--val-size", help="In (0, 1).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda")] = None,
    fast: Annotated[
        bool,
        typer.Option("--fast", help="A small share of the training images and 1 epoch."),
    ] = False,
) -> None:
    """Train a classifier on a data version; track it in MLflow; register it; gate champion.

    Defaults come from config/hyp.yml. Runs are tagged phase `experimental`.
    """
    from mnistops.data.registry import RegistryError
    from mnistops.data.store import StoreError
    from mnistops.tracking.runs import TrackingError, check_tracking_server
    from mnistops.train.loop import TrainingError, check_hyperparameters, pick_device

    cfg = settings()
    hyp = hyperparameters(
        cfg,
        {
            "model": model,
            "n_epochs": epochs if epochs is not None else (1 if fast else None),
            "batch_size": batch_size,
            "learning_rate": lr,
            "random_seed": seed,
            "val_size": val_size,
            "device": device,
        },
    )
    _sigterm_interrupts()
    try:
        check_hyperparameters(hyp)
        pick_device(hyp.device)
        check_tracking_server(cfg)
        arrays = training_data(cfg, data_version, data_dir, fast, hyp.random_seed)
    except (TrainingError, TrackingError, RegistryError, StoreError) as exc:
        fail(str(exc), code=2)
    except data_errors() as exc:
        fail(str(exc), code=2)
    outcome = run_training(cfg, hyp, arrays, "experimental")
    summarize(cfg, outcome)


def _sigterm_interrupts() -> None:
    """SIGTERM ends a training like Ctrl-C does (its MLflow run KILLED), not silently; and
    Ctrl-C does so even where the shell started us with SIGINT ignored (a background job)."""
    import signal

    def interrupt(_signum, _frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_training(cfg: Settings, hyp, arrays, phase: str):
    """Train with a progress bar per epoch and a line per finished epoch."""
    from mnistops.tracking.runs import train_and_track
    from mnistops.train.loop import TrainingError, split_train_val

    source = arrays.source
    console.print(
        f"training [bold]{hyp.model}[/] on {source.name if source.tracked else 'untracked data'}"
        f" ({len(arrays.train_y)} training images incl. validation, {len(arrays.test_y)} test),"
        f" {hyp.n_epochs} epoch{'' if hyp.n_epochs == 1 else 's'}, batch {hyp.batch_size},"
        f" lr {hyp.learning_rate}"
    )
    try:
        with progress_bars() as progress_for:
            bar = {"advance": None}

            def on_epoch(m) -> None:
                console.print(
                    f"epoch {m.epoch}/{hyp.n_epochs}: loss {m.train_loss:.4f}"
                    f" acc {m.train_accuracy:.4f} | val loss {m.val_loss:.4f}"
                    f" acc {m.val_accuracy:.4f} | {m.seconds:.1f}s, {m.images_per_s:,.0f} img/s"
                )
                if m.epoch < hyp.n_epochs:
                    bar["advance"] = progress_for(f"epoch {m.epoch + 1}", bar["total"])

            train_idx, _ = split_train_val(len(arrays.train_y), hyp.val_size, hyp.random_seed)
            train_images = len(train_idx)
            bar["total"] = train_images
            bar["advance"] = progress_for("epoch 1", train_images)
            return train_and_track(
                cfg,
                hyp,
                arrays,
                phase,
                on_epoch=on_epoch,
                on_batch=lambda n: bar["advance"](n),
                on_start=lambda url: console.print(f"MLflow run: {url}"),
            )
    except KeyboardInterrupt as exc:
        fail(f"interrupted: {exc or 'the run is marked KILLED'}", code=130)
    except TrainingError as exc:
        fail(f"{exc}; the run is marked FAILED, nothing was registered")
    except Exception as exc:  # noqa: BLE001  MLflow/S3 errors: say what failed, not a trace
        from mnistops.tracking.runs import TrackingError, check_tracking_server

        try:
            check_tracking_server(cfg)
        except TrackingError as down:
            fail(
                f"training stopped: {down}. Nothing was registered and champion did not"
                " move; the run stays RUNNING in MLflow. Start the server again and re-run."
            )
        fail(
            f"training failed: {exc.__class__.__name__}: {exc}; the run is marked FAILED,"
            " nothing was registered"
        )
    raise AssertionError("unreachable")


def summarize(cfg: Settings, outcome) -> None:
    decision = outcome.decision
    result = outcome.result
    console.rule("result")
    console.print(
        f"test accuracy [bold]{outcome.test_accuracy:.2%}[/] (loss {result.test.loss:.4f}),"
        f" {result.train_seconds:.0f}s of training at {result.images_per_s:,.0f} images/s"
    )
    name = cfg.model_registry.name
    if decision.moved:
        console.print(
            f"[green]{name} v{outcome.model_version} is now champion[/]: {decision.reason}"
        )
    else:
        console.print(
            f"{name} v{outcome.model_version} registered, tagged challenger;"
            f" champion stays v{decision.previous_version}: {decision.reason}"
        )
    console.print(f"MLflow run: {outcome.run_url}")


@app.command("models")
def models_command() -> None:
    """The registered versions of the classifier: test accuracy, data version, aliases."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mnistops.data.store import shown
    from mnistops.tracking.registry import ACCURACY_TAG, CHALLENGER_TAG, aliases, versions
    from mnistops.tracking.runs import TrackingError, check_tracking_server

    cfg = settings()
    try:
        check_tracking_server(cfg)
        client = MlflowClient(cfg.mlflow_uri)
        found = versions(client, cfg.model_registry.name)
        alias_of = aliases(client, cfg.model_registry.name)
    except (TrackingError, MlflowException) as exc:
        fail(str(exc))
    table = Table(title=f"{cfg.model_registry.name} at {cfg.mlflow_uri}")
    for column in ("version", "created", "model", "test acc", "data", "phase", "aliases"):
        table.add_column(column, justify="right" if column == "test acc" else "left", no_wrap=True)
    notes = []
    for v in found:
        # Tags are anyone's text who can reach MLflow: shown escaped, never as markup.
        tags = {k: escape(shown(str(t), 200)) for k, t in (v.tags or {}).items()}
        accuracy = (v.tags or {}).get(ACCURACY_TAG)
        try:
            accuracy_text = f"{float(accuracy):.2%}" if accuracy else ""
        except ValueError:
            accuracy_text = tags[ACCURACY_TAG]
        table.add_row(
            escape(v.version),
            time.strftime("%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
            tags.get("model", ""),
            accuracy_text,
            tags.get("data_version", ""),
            tags.get("phase", ""),
            ", ".join(escape(shown(a)) for a in alias_of.get(v.version, [])),
        )
        if CHALLENGER_TAG in tags:
            notes.append(f"v{escape(v.version)} challenger: {tags[CHALLENGER_TAG]}")
    console.print(table if found else "no model registered yet (`mnistops train`)")
    for note in notes:
        console.print(note, highlight=False)


@app.command("predict")
def predict_command(
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line: file, digit, confidence.")
    ] = False,
) -> None:
    """The champion's digit and confidence for each image.

    Any size or colour is accepted and converted the MNIST way: grayscale (transparency on
    white), inverted if the background is light, cropped to the digit, scaled to 20 px on
    its longer side, centred by mass in 28x28.
    """
    import json

    from mnistops.predict import PredictError, predict
    from mnistops.tracking.runs import TrackingError

    cfg = settings()
    try:
        predictions = predict(cfg, images)
    except (PredictError, TrackingError) as exc:
        fail(str(exc))
    for p in predictions:
        if as_json:
            print(json.dumps(p.as_dict()))
        else:
            console.print(
                f"{escape(p.file)}: [bold]{p.digit}[/] ({p.confidence:.1%},"
                f" model v{escape(p.model_version)})"
            )


# --- scheduled retraining (Prefect) ------------------------------------------------------


def flow_errors() -> tuple[type[Exception], ...]:
    from mnistops.flows.deploy import DeployError

    return (DeployError, ConfigError)


@app.command("deploy")
def deploy_command() -> None:
    """Create or update the retraining deployment from config/flow.yml (idempotent).

    Creates the process work pool if missing. The deployment runs the flow `MNIST` on its
    schedule, on every new data version (a trigger on the event `data version` sends), and
    on `mnistops run`; at most one run at a time (a second one waits in the queue).
    """
    from mnistops.flows.deploy import deploy, next_run

    cfg = settings()
    try:
        result = deploy(cfg)
    except flow_errors() as exc:
        fail(str(exc), code=2 if isinstance(exc, ConfigError) else 1)
    if result.pool_created:
        console.print(f"work pool {cfg.deployment.pool_name} (process) created")
    console.print(
        f"deployment {result.full_name}: [bold]{result.action}[/]; schedule {result.schedule};"
        f" pool {cfg.deployment.pool_name}, queue {cfg.deployment.queue_name}"
    )
    console.print("next runs of the schedule: " + ", ".join(result.next_runs))
    upcoming = next_run(cfg)
    if upcoming:
        console.print(f"next scheduled run: {upcoming}")
    console.print(
        f"start a worker: [bold]mnistops worker --pool {cfg.deployment.pool_name}[/]"
        f"; UI: {cfg.prefect_api_url.removesuffix('/api')}/deployments"
    )


@app.command("worker")
def worker_command(
    pool: Annotated[
        str | None, typer.Option("--pool", help="Work pool; default deployment.pool_name.")
    ] = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach", help="Run in the background as part of the stack (stopped by stack down)."
        ),
    ] = False,
) -> None:
    """Start a Prefect worker that runs the retraining flow's runs from a work pool.

    The flow is part of the installed package, so any machine with mnistops and the
    variables of `mnistops stack env` can serve the pool.
    """
    import os

    from mnistops import stack
    from mnistops.flows.deploy import check_server, worker_command, worker_env

    cfg = settings()
    pool = pool or cfg.deployment.pool_name
    try:
        check_server(cfg)
    except flow_errors() as exc:
        fail(str(exc))
    env = worker_env(cfg, State.config_dir)
    cmd = worker_command(pool)
    if not detach:
        console.print(f"worker for pool {pool} (Ctrl-C stops it)")
        os.execve(cmd[0], cmd, env)
    try:
        record = stack.start_worker(cfg, pool, cmd, env)
    except stack.StackError as exc:
        fail(str(exc))
    console.print(
        f"worker for pool {pool} started (pid {record.pid}, log {_shorter(record.log_path)});"
        " `mnistops stack down` stops it"
    )


@app.command("run")
def run_command(
    data_version: Annotated[
        str | None, typer.Option("--data-version", help="Default: the latest.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="A small share, 1 epoch.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run; exit non-zero unless it completes.")
    ] = False,
) -> None:
    """Quick run: a run of the retraining deployment, now."""
    cfg = settings()
    given = {
        "data_version": data_version,
        "model": model,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": lr,
        "seed": seed,
        "device": device,
        "fast": fast or None,
    }
    start_and_follow(cfg, {k: v for k, v in given.items() if v is not None}, wait)


def start_and_follow(cfg: Settings, parameters: dict[str, object], wait: bool) -> None:
    """Start a run of the deployment; with `wait`, report its states, then its summary."""
    from mnistops.flows.deploy import follow, quick_run, run_summary

    try:
        run_id, url = quick_run(cfg, parameters)
    except flow_errors() as exc:
        fail(str(exc))
    console.print(f"flow run {run_id}: {url}")
    if not wait:
        return
    began = time.monotonic()

    def on_state(name: str, message: str) -> None:
        note = f" ({message})" if message else ""
        console.print(f"{time.monotonic() - began:6.1f}s  {name}{note}", highlight=False)

    try:
        final = follow(cfg, run_id, on_state)
    except flow_errors() as exc:
        fail(str(exc))
    summary = run_summary(cfg, run_id)
    if summary:
        from rich.markdown import Markdown

        console.print(Markdown(summary))
    if final.state is None or final.state.type.value != "COMPLETED":
        fail(f"flow run {run_id} ended {final.state.name if final.state else 'unknown'}; see {url}")


def entry() -> None:
    """The `mnistops` command: errors that any command can meet (a damaged key file)
    end with their message, not a stack trace."""
    import os

    from mnistops.stack.credentials import PRIVATE_UMASK, CredentialsError
    from mnistops.stack.endpoints import NO_TELEMETRY

    os.umask(PRIVATE_UMASK)
    for key, value in NO_TELEMETRY.items():
        os.environ.setdefault(key, value)
    try:
        app(prog_name="mnistops")
    except CredentialsError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None
