"""What the demo made, for its closing summary: the data versions, the runs of the
experiment, the champion and why, the next scheduled run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mnistops.settings import Settings

if TYPE_CHECKING:
    from mnistops.data.packs import VersionRecord
    from mnistops.tracking.runs import RunRow


@dataclass(frozen=True)
class Champion:
    name: str
    version: str
    accuracy: float | None
    data_version: str | None
    phase: str | None
    reason: str


@dataclass(frozen=True)
class Summary:
    versions: list[VersionRecord]
    problems: list[str]
    runs: list[RunRow]
    champion: Champion | None
    next_run: str | None
    places: dict[str, int]
    """each version's place in the order of publication (`data list`'s #)"""
    warnings: list[str]


def summary(settings: Settings) -> Summary:
    """What the demo made: data versions, runs, the champion, the next scheduled run."""
    from mnistops.data import reader
    from mnistops.flows.deployment import next_run
    from mnistops.tracking.champion import accuracy_of, champion_of
    from mnistops.tracking.contract import CHAMPION_REASON_TAG, DATA_VERSION_TAG, PHASE_TAG
    from mnistops.tracking.runs import experiment_runs

    listing = reader.version_listing(settings)
    name = settings.model_registry.name
    best = champion_of(settings)
    crowned = None
    if best is not None:
        tags = best.tags
        crowned = Champion(
            name,
            best.version,
            accuracy_of(settings, best),
            tags.get(DATA_VERSION_TAG),
            tags.get(PHASE_TAG),
            tags.get(CHAMPION_REASON_TAG, "set by hand"),
        )
    return Summary(
        listing.records,
        listing.problems,
        experiment_runs(settings),
        crowned,
        next_run(settings),
        listing.places,
        listing.warnings,
    )
