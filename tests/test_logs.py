"""Which library messages a user sees (pure logic: logger levels)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from mnistops.logs import Verbosity, quiet_libraries

pytestmark = pytest.mark.unit


@pytest.fixture
def restored_levels() -> Iterator[None]:
    names = ("EventsWorker", "mlflow", "mnistops", "")
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    Verbosity.verbose = False
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_prefect_sending_its_last_events_is_no_warning(restored_levels: None) -> None:
    events = logging.getLogger("EventsWorker")
    events.setLevel(logging.NOTSET)
    quiet_libraries()
    assert not events.isEnabledFor(logging.WARNING), "'Still processing items' would show"
    assert events.isEnabledFor(logging.ERROR), "a failure to send events must still show"


def test_verbose_shows_every_library_message(restored_levels: None) -> None:
    events = logging.getLogger("EventsWorker")
    events.setLevel(logging.NOTSET)
    Verbosity.verbose = True
    quiet_libraries()
    assert events.isEnabledFor(logging.WARNING)


def test_our_warnings_show_whatever_level_a_library_gave_the_root(restored_levels: None) -> None:
    """A library `train` loads set the root logger to ERROR: the champion gate's
    "waiting for the lock" line went unseen."""
    logging.getLogger().setLevel(logging.ERROR)
    quiet_libraries()
    assert logging.getLogger("mnistops.stack.locks").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("mnistops.stack.locks").isEnabledFor(logging.INFO)
