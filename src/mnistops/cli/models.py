"""`mnistops train`, `mnistops models`, `mnistops predict`: a tracked training, the
registered versions, the champion's answers."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from mnistops.cli._ui import HYP_OPTIONS, MODEL_KEYS, console, progress_bars, settings, spinner
from mnistops.settings import HyperParameters, Settings

if TYPE_CHECKING:
    from mnistops.tracking.runs import RunOutcome, TrainingHooks
    from mnistops.train.data import Arrays


def hyperparameters(cfg: Settings, given: dict[str, Any], fast: bool = False) -> HyperParameters:
    """hyp.yml's values with `--fast` and the command's options on top, validated (errors
    name the option, or the key of hyp.yml)."""
    from mnistops import pipeline

    return pipeline.hyperparameters(
        cfg,
        pipeline.fast_recipe(fast, "the option --fast"),
        pipeline.Layer(given, HYP_OPTIONS.__getitem__),
    )


def train(
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
    model: Annotated[
        str | None, typer.Option(HYP_OPTIONS["model"], help="digitnet2, digitnet or seednet")
    ] = None,
    n_epochs: Annotated[int | None, typer.Option(HYP_OPTIONS["n_epochs"])] = None,
    batch_size: Annotated[int | None, typer.Option(HYP_OPTIONS["batch_size"])] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option(HYP_OPTIONS["learning_rate"], help="Learning rate (the peak one)."),
    ] = None,
    random_seed: Annotated[int | None, typer.Option(HYP_OPTIONS["random_seed"])] = None,
    val_size: Annotated[
        float | None, typer.Option(HYP_OPTIONS["val_size"], help="In (0, 1).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(HYP_OPTIONS["device"], help="auto, cpu or cuda")
    ] = None,
    fast: Annotated[
        bool,
        typer.Option("--fast", help="A small share of the training images and 1 epoch."),
    ] = False,
) -> None:
    """Train a classifier on a data version; track it in MLflow; register it; gate champion.

    Defaults come from config/hyp.yml. Runs are tagged phase `experimental`.
    """
    cfg = settings()
    hyp = hyperparameters(
        cfg,
        {
            "model": model,
            "n_epochs": n_epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "random_seed": random_seed,
            "val_size": val_size,
            "device": device,
        },
        fast,
    )
    sigterm_interrupts()
    experiment(cfg, hyp, data_version, data_dir, fast)


def experiment(
    cfg: Settings,
    hyp: HyperParameters,
    data_version: str | None,
    data_dir: Path | None = None,
    fast: bool = False,
) -> None:
    """An experimental training with what the user sees of it: the data loading, the
    progress per epoch, the result."""
    from mnistops import pipeline
    from mnistops.tracking.contract import EXPERIMENTAL

    with spinner("loading the data...") as report:
        arrays = pipeline.prepare(cfg, hyp, data_version, data_dir, fast, report)
    if not arrays.source.tracked:
        console.print(f"[yellow]untracked data[/]: {arrays.source.name}")
    announce_training(hyp, arrays)
    with training_progress(hyp, arrays) as hooks:
        outcome = pipeline.train(cfg, hyp, arrays, EXPERIMENTAL, hooks=hooks)
    show_outcome(cfg, outcome)


def sigterm_interrupts() -> None:
    """SIGTERM ends a training like Ctrl-C does (its MLflow run KILLED), not silently; and
    Ctrl-C does so even where the shell started us with SIGINT ignored (a background job)."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def announce_training(hyp: HyperParameters, arrays: Arrays) -> None:
    source = arrays.source
    console.print(
        f"training [bold]{hyp.model}[/] on {source.name if source.tracked else 'untracked data'}"
        f" ({len(arrays.train_y)} training images incl. validation, {len(arrays.test_y)} test),"
        f" {hyp.n_epochs} epoch{'' if hyp.n_epochs == 1 else 's'}, batch {hyp.batch_size},"
        f" lr {hyp.learning_rate}"
    )


@contextmanager
def training_progress(hyp: HyperParameters, arrays: Arrays) -> Iterator[TrainingHooks]:
    """A progress bar per epoch, a line per finished epoch, the run's URL."""
    from mnistops.tracking.runs import TrainingHooks
    from mnistops.train.loop import split_train_val

    train_idx, _ = split_train_val(len(arrays.train_y), hyp.val_size, hyp.random_seed)
    images = len(train_idx)
    with progress_bars() as progress_for:
        bar: dict[str, Callable[[int], None]] = {"advance": progress_for("epoch 1", images)}

        def on_epoch(m: Any) -> None:
            console.print(
                f"epoch {m.epoch}/{hyp.n_epochs}: loss {m.train_loss:.4f}"
                f" acc {m.train_accuracy:.4f} | val loss {m.val_loss:.4f}"
                f" acc {m.val_accuracy:.4f} | {m.seconds:.1f}s, {m.images_per_s:,.0f} img/s"
            )
            if m.epoch < hyp.n_epochs:
                bar["advance"] = progress_for(f"epoch {m.epoch + 1}", images)

        yield TrainingHooks(
            on_start=lambda url: console.print(f"MLflow run: {url}"),
            on_batch=lambda n: bar["advance"](n),
            on_epoch=on_epoch,
        )


def show_outcome(cfg: Settings, outcome: RunOutcome) -> None:
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
    if decision.evidence is not None:
        from mnistops.tracking.significance import p_text

        evidence = decision.evidence
        console.print(
            f"gate against v{decision.previous_version}: p {p_text(evidence.p_value)}"
            f" (exact one-sided McNemar; {evidence.new_only} images fixed,"
            f" {evidence.champion_only} broken), errors {evidence.new_errors} vs"
            f" {evidence.champion_errors}, worst digit {evidence.worst_class}"
            f" {evidence.worst_class_change:+.2f} points",
            highlight=False,
        )
    console.print(f"MLflow run: {outcome.run_url}")


models_app = typer.Typer(
    help="The registered versions of the classifier; move `champion` by hand.",
    invoke_without_command=True,
)


@models_app.callback()
def models(
    ctx: typer.Context,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--compare",
            metavar="A B",
            help="Two versions side by side: per digit, calibration, robustness, and"
            " whether B beats A beyond noise.",
        ),
    ] = None,
) -> None:
    """The registered versions of the classifier: test accuracy, data version, the
    champion gate's decision (its evidence below the table), aliases.

    `mnistops models promote VERSION` and `mnistops models rollback` move `champion`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if compare is not None:
        show_comparison(*compare)
    else:
        show_models()


def show_comparison(a: str, b: str) -> None:
    from mnistops.data.packs import shown
    from mnistops.tracking.compare import compare_versions

    cfg = settings(MODEL_KEYS)
    found = compare_versions(cfg, a, b)
    table = Table(title=f"{found.name}: v{found.a} against v{found.b}")
    table.add_column("")
    for column in (f"v{found.a}", f"v{found.b}", "change (B - A)"):
        table.add_column(column, justify="right")
    for row in found.rows:
        table.add_row(*(escape(shown(text, 60)) for text in (row.label, row.a, row.b, row.change)))
    console.print(table)
    if found.evidence is None:
        console.print(f"no paired test: {found.why_not_paired}", highlight=False)
        return
    evidence = found.evidence
    rules = cfg.model_registry
    better = evidence.p_value < rules.significance
    console.print(
        f"v{found.b} against v{found.a} on the same test images: {evidence.summary()}",
        highlight=False,
    )
    console.print(
        f"v{found.b} is {'better' if better else 'not better'} than v{found.a} beyond noise"
        f" (significance {rules.significance:g})",
        highlight=False,
    )


def show_models() -> None:
    from mnistops.clients import model_signing_key
    from mnistops.data.packs import shown
    from mnistops.tracking.champion import registered_versions
    from mnistops.tracking.contract import (
        ACCURACY_TAG,
        CHALLENGER_TAG,
        DATA_VERSION_TAG,
        MODEL_TAG,
    )
    from mnistops.tracking.model_record import record_problem

    cfg = settings(MODEL_KEYS)
    found, alias_of = registered_versions(cfg)
    table = Table(title=f"{cfg.model_registry.name} at {cfg.mlflow_uri}", pad_edge=False)
    for column, width, folded in COLUMNS:
        table.add_column(
            column,
            justify="right" if column == "test acc" else "left",
            no_wrap=not folded,
            overflow="fold" if folded else "ellipsis",
            min_width=width,
            max_width=30 if folded else None,
        )
    notes = []
    key = model_signing_key(cfg)
    for v in found:
        # Tags are anyone's text who can reach MLflow: shown escaped, never as markup.
        tags = {k: escape(shown(str(t), 200)) for k, t in v.tags.items()}
        table.add_row(
            escape(shown(v.version, 12)),
            time.strftime("%m-%d %H:%M", time.localtime(v.created_ms / 1000)),
            escape(shown(v.tags.get(MODEL_TAG, ""), 16)),
            accuracy_cell(v.tags.get(ACCURACY_TAG), tags.get(ACCURACY_TAG, "")),
            escape(shown(v.tags.get(DATA_VERSION_TAG, ""), 16)),
            gate_cell(v.tags),
            ", ".join(escape(shown(a, 20)) for a in alias_of.get(v.version, [])),
        )
        refused = record_problem(v.tags, key, str(v.source), str(v.version))
        if refused is not None:
            notes.append(f"v{escape(v.version)} [red]refused[/], never loaded: {escape(refused)}")
        if CHALLENGER_TAG in tags:
            notes.append(f"v{escape(v.version)} challenger: {tags[CHALLENGER_TAG]}")
        elif (note := gate_note(escape(v.version), tags)) is not None:
            notes.append(note)
    console.print(table if found else "no model registered yet (`mnistops train`)")
    for note in notes:
        console.print(note, highlight=False)


COLUMNS = (
    ("version", 7, False),
    ("created", 11, False),
    ("model", 9, True),
    ("test acc", 8, False),
    ("data", 4, True),
    ("gate", 9, False),
    ("aliases", 8, True),
)
"""`models`' columns: name, minimum width (all of them fit 80 columns), and whether it is
anyone's text (tags, aliases: cut to 16 or 20 characters, folded where the terminal is
narrow); mnistops' own are never squeezed or folded"""


def accuracy_cell(value: str | None, shown_text: str) -> str:
    """A version's test accuracy tag as a percentage; its text (escaped by the caller)
    when it is not a fraction between 0 and 1: anyone who reaches MLflow can write it."""
    import math

    if not value:
        return ""
    try:
        accuracy = float(value)
    except ValueError:
        return shown_text
    return f"{accuracy:.2%}" if math.isfinite(accuracy) and 0 <= accuracy <= 1 else shown_text


def gate_cell(tags: dict[str, str]) -> str:
    """The gate's decision in a few characters: moved, kept or first, and the p-value."""
    from mnistops.tracking.contract import CHALLENGER_TAG, CHAMPION_REASON_TAG, GATE_TAGS
    from mnistops.tracking.significance import evidence_of

    if CHAMPION_REASON_TAG in tags:
        if tags[CHAMPION_REASON_TAG].startswith("first model"):
            return "first"
        if tags[CHAMPION_REASON_TAG].startswith("promoted by ") and GATE_TAGS[1] not in tags:
            return "by hand"
        verdict = "moved"
    elif CHALLENGER_TAG in tags:
        verdict = "kept"
    else:
        return ""
    evidence = evidence_of(tags)
    if evidence is None:
        return verdict
    return f"{verdict} p<1e-300" if evidence.p_value <= 0 else f"{verdict} p={evidence.p_value:.1g}"


def gate_note(version: str, tags: dict[str, str]) -> str | None:
    """The gate's evidence for a version, in a sentence (tags escaped by the caller)."""
    from mnistops.tracking.contract import GATE_TAGS
    from mnistops.tracking.significance import evidence_of

    evidence = evidence_of(tags)
    if evidence is None:
        return None
    against = tags.get(GATE_TAGS[0], "?")
    return f"v{version} against v{against}: {evidence.summary()}"


def predict(
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
    from mnistops.predict import predict as champion_predicts

    for p in champion_predicts(settings(MODEL_KEYS), images):
        if as_json:
            print(json.dumps(p.as_dict()))
        else:
            console.print(
                f"{escape(p.file)}: [bold]{p.digit}[/] ({p.confidence:.1%},"
                f" model v{escape(p.model_version)})"
            )


@models_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="The registered version to serve, e.g. 3")],
    reason: Annotated[
        str, typer.Option("-m", "--reason", help="Why (kept on the version's tags).")
    ] = "by hand",
    trust_unsigned: Annotated[
        bool,
        typer.Option(
            "--trust-unsigned",
            help="VERSION was registered without mnistops' signed file record (by hand, or"
            " by another stack): you vouch for its files as they are now, and they are"
            " signed. Only a model in mnistops' format can be trusted.",
        ),
    ] = False,
) -> None:
    """Move `champion` to VERSION (a running `mnistops serve` follows within seconds).
    The model is downloaded and loaded first; one that does not load is refused."""
    from mnistops.tracking.promotion import promote_champion

    cfg = settings(MODEL_KEYS)
    done = promote_champion(cfg, version, reason, trust_unsigned=trust_unsigned)
    if done.signed_only:
        console.print(
            f"[green]{cfg.model_registry.name} v{done.version} is champion already[/]:"
            f" {done.reason}; a running `mnistops serve` loads it within seconds"
        )
        return
    shown = f" (was v{done.previous})" if done.previous else ""
    console.print(
        f"[green]{cfg.model_registry.name} v{done.version} is now champion[/]{shown}: {done.reason}"
    )


@models_app.command("rollback")
def rollback(
    reason: Annotated[
        str, typer.Option("-m", "--reason", help="Why (kept on the version's tags).")
    ] = "by hand",
) -> None:
    """Move `champion` back to the version the current champion replaced."""
    from mnistops.tracking.promotion import roll_back_champion

    cfg = settings(MODEL_KEYS)
    done = roll_back_champion(cfg, reason)
    console.print(
        f"[green]{cfg.model_registry.name} v{done.version} is champion again[/]"
        f" (was v{done.previous}): {done.reason}"
    )
