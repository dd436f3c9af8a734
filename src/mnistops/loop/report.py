"""The monitoring report a person reads: a plain verdict first, then what moved and in
which direction, what the figures mean, which models answered, and one readable plot
per comparison. Pure rendering: everything it shows is in its arguments."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from mnistops.loop import drift
from mnistops.settings.flow import MonitoringSettings

MEANINGS = {
    "mean intensity": "how bright the image is on average",
    "ink share": "the share of pixels that are ink, brighter than half",
    "centre x": "where the ink's centre is, in pixels from the left",
    "centre y": "where the ink's centre is, in pixels from the top",
    "spread x": "how wide the ink spreads around its centre, in pixels",
    "spread y": "how tall the ink spreads around its centre, in pixels",
    "slant": "how the strokes lean: higher leans more like \\, lower more like /",
    "ink at the border": "the share of the ink in the outer 3 pixels of the image",
    "predicted digits": "which digits the model answers",
}


TAIL_SHARE = 0.05
"""below this share of answers beyond training's 1st or 99th percentile, a shift is told
by its spread"""


@dataclass(frozen=True)
class Page:
    """What a report is about, beside the judgement."""

    start: datetime
    end: datetime
    model_name: str
    champion: str
    data_version: str
    versions: dict[str, int]
    """answers in the window per model version that gave them"""


def headline(judgement: drift.Judgement) -> str:
    """The verdict in one plain sentence."""
    n = judgement.predictions
    if not judgement.judged:
        return f"Not judged: {n} answers are too few (monitoring.min_predictions)."
    if judgement.drift:
        return f"Drift: {n} answers do not look like the data the model was trained on."
    return f"No drift: {n} answers look like the data the model was trained on."


def report_html(
    page: Page,
    judgement: drift.Judgement,
    found: drift.Window,
    ref: drift.Reference,
    config: MonitoringSettings,
) -> str:
    colour = "#b00020" if judgement.drift else "#1b5e20" if judgement.judged else "#555"
    title = f"MNIST monitoring {page.end:%Y-%m-%d %H:%M} UTC"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}}
.verdict{{font-size:1.4em;color:#fff;background:{colour};padding:.6em 1em;border-radius:6px}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}
td{{text-align:right}}td:first-child,th:first-child{{text-align:left}}
.flag{{color:#b00020;font-weight:bold}}small{{color:#555}}img{{width:100%}}</style></head>
<body><h1>MNIST monitoring</h1>
<p class="verdict">{html.escape(headline(judgement))}</p>
{_reasons(judgement, found, ref, config)}
<h2>The window</h2>
<p>Answers logged from {page.start:%Y-%m-%d %H:%M:%S} to {page.end:%Y-%m-%d %H:%M:%S} UTC,
compared with a sample of the images {html.escape(page.model_name)}
v{html.escape(page.champion)} (the champion now) was trained on
({html.escape(page.data_version)}).</p>
{_answered_by(page)}
{_quality(judgement, config)}
<h2>Each comparison</h2>
{_table(judgement, found, ref)}
<p><small>The distance of the distributions is not the gap of the medians beside it. For
the image statistics it is the Kolmogorov-Smirnov distance: the largest gap between the
two cumulative distributions, 0 when they are the same, 1 when they do not overlap (a
fifth of the answers moved far away gives about 0.2, whatever the medians do); for the
predicted digits it is the share of answers that would have to change digit to match
the expected shares. A row flags drift only when the difference
is at least {config.min_effect:g} (monitoring.min_effect) <em>and</em> the p-value is below
{config.alpha:g} / {len(drift.FEATURES) + 1} (monitoring.alpha, shared by the
{len(drift.FEATURES) + 1} comparisons): with thousands of answers, tiny harmless
differences would otherwise be flagged.</small></p>
<h2>Plots: training data against the answers</h2>
<img alt="each statistic and the digits, training data against the answers"
 src="data:image/png;base64,{_plots(judgement, found, ref)}">
</body></html>
"""


def _reasons(
    judgement: drift.Judgement,
    found: drift.Window,
    ref: drift.Reference,
    config: MonitoringSettings,
) -> str:
    if not judgement.drift:
        return ""
    items = []
    for test in judgement.tests:
        if test.flagged and test.name in drift.FEATURES:
            items.append(_direction(test.name, found, ref))
        elif test.flagged:
            items.append("the model answers some digits far more often than expected")
    items += [r for r in judgement.reasons if not _is_test_reason(r, judgement)]
    listed = "".join(f"<li>{html.escape(item)}</li>" for item in items)
    retrains = (
        "the retraining deployment runs on the newest data version"
        if config.retrain_on_drift
        else "nothing retrains on it (monitoring.retrain_on_drift is off)"
    )
    action = (
        f"Drift emits the event <code>mnistops.monitoring.drift</code> with these figures:"
        f" {retrains}. Label the answers that were wrong (<code>/feedback</code>, the draw"
        " page), so that the next data version holds what the model now sees."
    )
    return f"<h2>What changed</h2><ul>{listed}</ul><p>{action}</p>"


def _is_test_reason(reason: str, judgement: drift.Judgement) -> bool:
    return any(reason.startswith(f"{t.name}:") for t in judgement.tests)


def _direction(name: str, found: drift.Window, ref: drift.Reference) -> str:
    """Which way a statistic moved, by the answers beyond the training data's middle 98 %
    (a shift of a part of the answers moves the tails long before the median)."""
    i = drift.FEATURES.index(name)
    now, before = found.features[:, i], ref.features[:, i]
    low, high = np.percentile(before, [1, 99])
    above, below = float((now > high).mean()), float((now < low).mean())
    way, share = ("higher", above) if above >= below else ("lower", below)
    medians = f"median {np.median(now):.3g}, in training {np.median(before):.3g}"
    if share < TAIL_SHARE:
        spread = "narrower" if np.std(now) < np.std(before) else "wider"
        return f"{name} ({MEANINGS[name]}): the answers spread {spread} than training's; {medians}"
    return (
        f"{name} ({MEANINGS[name]}): {share:.0%} of the answers are {way} than 99 % of the"
        f" training images (1 % would be expected); {medians}"
    )


def _answered_by(page: Page) -> str:
    if not page.versions:
        return "<p>No answers in the window.</p>"
    rows = "".join(
        f"<tr><td>v{html.escape(version)}{' (champion)' if version == page.champion else ''}"
        f"</td><td>{n:,}</td></tr>"
        for version, n in sorted(page.versions.items(), key=lambda kv: int(kv[0]))
    )
    return f"<table><tr><th>answered by</th><th>answers</th></tr>{rows}</table>"


def _quality(judgement: drift.Judgement, config: MonitoringSettings) -> str:
    unsure = (
        f"{judgement.low_confidence_share:.1%} of the answers were unsure (below"
        f" {config.low_confidence:.0%} confidence; drift above"
        f" {config.max_low_confidence_share:.0%})."
    )
    if judgement.feedback_accuracy is None:
        feedback = "No answer of the window was labelled through /feedback."
    else:
        feedback = (
            f"Labelled through /feedback: {judgement.feedback}; the model had"
            f" {judgement.feedback_accuracy:.0%} of them right (drift below"
            f" {config.min_feedback_accuracy:.0%} once {config.min_feedback} are labelled)."
        )
    return f"<p>{unsure} {feedback}</p>"


def _table(judgement: drift.Judgement, found: drift.Window, ref: drift.Reference) -> str:
    if not judgement.tests:
        return "<p>No comparison: too few answers.</p>"
    rows = []
    for test in judgement.tests:
        if test.name in drift.FEATURES:
            i = drift.FEATURES.index(test.name)
            medians = (
                f"<td>{np.median(ref.features[:, i]):.3g}</td>"
                f"<td>{np.median(found.features[:, i]):.3g}</td>"
            )
        else:
            medians = "<td>-</td><td>-</td>"
        flag = '<span class="flag">drift</span>' if test.flagged else "no"
        rows.append(
            f"<tr><td>{html.escape(test.name)}<br><small>{html.escape(MEANINGS[test.name])}"
            f"</small></td>{medians}<td>{test.effect:.4f}</td><td>{_p(test.p_value)}</td>"
            f"<td>{flag}</td></tr>"
        )
    head = (
        "<tr><th>compared</th><th>training (median)</th><th>answers (median)</th>"
        "<th>distance of the distributions</th><th>p-value</th><th>drift?</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _p(value: float) -> str:
    return "&lt; 1e-10" if value < 1e-10 else f"{value:.2g}"


def _plots(judgement: drift.Judgement, found: drift.Window, ref: drift.Reference) -> str:
    """Each statistic, the digits and the confidences, as a base64 PNG of 3 columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 3, figsize=(12, 13))
    for i, name in enumerate(drift.FEATURES):
        ax = axes.flat[i]
        low, high = _range(ref.features[:, i], found.features[:, i])
        bins = np.linspace(low, high, 31)
        ax.hist(ref.features[:, i], bins=bins, density=True, alpha=0.5, label="training")
        if len(found.features):
            ax.hist(found.features[:, i], bins=bins, density=True, alpha=0.5, label="answers")
        ax.set_title(name, fontsize=12)
        ax.set_yticks([])
    axes.flat[0].legend()
    ax = axes.flat[8]
    ax.bar(np.arange(10) - 0.2, ref.digit_share, 0.4, label="expected")
    ax.bar(np.arange(10) + 0.2, judgement.digit_share, 0.4, label="answered")
    ax.set_xticks(range(10))
    ax.set_title("predicted digits (share)", fontsize=12)
    ax.legend()
    ax = axes.flat[9]
    if len(found.confidences):
        ax.hist(found.confidences, bins=20, range=(0, 1))
    ax.set_title(f"confidence ({judgement.low_confidence_share:.1%} unsure)", fontsize=12)
    for ax in axes.flat[10:]:
        ax.axis("off")
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(sink.getvalue()).decode()


def _range(*samples: np.ndarray) -> tuple[float, float]:
    """The range that holds the middle 99 % of both samples: a few outliers do not
    squeeze the rest into one bar."""
    present = [s for s in samples if len(s)]
    low = min(float(np.percentile(s, 0.5)) for s in present)
    high = max(float(np.percentile(s, 99.5)) for s in present)
    return (low, high) if high > low else (low - 0.5, high + 0.5)
