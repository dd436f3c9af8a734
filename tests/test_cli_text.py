"""What the CLI prints of text it does not own (servers' answers, tags), without a server."""

from __future__ import annotations

import pytest

from mnistops.cli._ui import without_controls
from mnistops.cli.models import accuracy_cell

pytestmark = pytest.mark.unit


@pytest.mark.security
def test_control_characters_in_an_error_are_written_as_escapes() -> None:
    said = without_controls("answered 500: \x1b[31m[red]boom\x1b[0m\x07\r\nline two\ttab\x9b")
    assert "\x1b" not in said and "\x07" not in said and "\r" not in said and "\x9b" not in said
    assert "\\x1b[31m[red]boom\\x1b[0m\\x07\\r\nline two\ttab\\x9b" in said
    assert without_controls("plain, élan") == "plain, élan"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0.9912", "99.12%"),
        ("1", "100.00%"),
        ("0", "0.00%"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1e400", "1e400"),
        ("-5", "-5"),
        ("1.5", "1.5"),
        ("abc", "abc"),
        (None, ""),
        ("", ""),
    ],
)
def test_a_test_accuracy_tag_is_a_percentage_only_when_it_is_a_fraction(
    value: str | None, shown: str
) -> None:
    assert accuracy_cell(value, value or "") == shown


def test_an_error_of_the_operating_system_names_the_file_and_the_fix() -> None:
    import errno

    from mnistops.cli._ui import os_error_text

    denied = PermissionError(errno.EACCES, "Permission denied", "data/MNIST/train/0")
    assert os_error_text(denied) == (
        "data/MNIST/train/0: Permission denied; check that this user may write there"
        " (permissions, `chattr`)"
    )
    full = OSError(errno.ENOSPC, "No space left on device", "/srv/x.png")
    assert os_error_text(full).startswith("/srv/x.png: No space left on device; the disk is full")
    assert os_error_text(ConnectionRefusedError()) == "ConnectionRefusedError"
