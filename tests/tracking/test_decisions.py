"""The champion gate's decision, without a server: who takes `champion` and why."""

from __future__ import annotations

import pytest

from mnistops.tracking.registry import decide

pytestmark = pytest.mark.unit


def test_the_first_model_is_champion() -> None:
    assert decide(0.5, None, 0.0) == (True, "first model: no champion yet")


@pytest.mark.parametrize(
    ("accuracy", "current", "margin", "moved"),
    [
        (0.99, 0.98, 0.0, True),
        (0.98, 0.98, 0.0, False),
        (0.97, 0.98, 0.0, False),
        (0.985, 0.98, 0.01, False),
        (0.99, 0.98, 0.01, True),
        (0.981, 0.98, 0.001, True),
    ],
)
def test_only_a_better_model_by_the_margin_moves_champion(
    accuracy: float, current: float, margin: float, moved: bool
) -> None:
    decided, reason = decide(accuracy, current, margin)
    assert decided is moved
    assert f"{accuracy:.4f}" in reason and f"{current:.4f}" in reason
    if not moved and margin:
        assert f"+{margin:.4f}" in reason


def test_an_equal_model_never_moves_champion_even_without_a_margin() -> None:
    assert decide(0.9, 0.9, 0.0)[0] is False
