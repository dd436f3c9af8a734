"""What the service holds of request bodies, and how it words a refusal, as pure logic."""

from __future__ import annotations

import pytest

from mnistops.serving.bodies import Busy, HeldBodies
from mnistops.serving.guard import refusal

pytestmark = pytest.mark.unit


def test_large_bodies_are_held_up_to_the_limit_and_given_back() -> None:
    held = HeldBodies(300_000)
    with held.holding() as hold:
        hold(1_000)  # a digit's PNG: not counted
        assert held.held == 0
        hold(100_000)
        hold(150_000)  # the size the body has reached
        assert held.held == 150_000
        with pytest.raises(Busy) as refused, held.holding() as other:
            other(160_000)
        assert refused.value.status_code == 503
        assert refused.value.headers == {"Retry-After": "1"}
        assert held.held == 150_000
        with held.holding() as other:
            other(150_000)
            assert held.held == 300_000
    assert held.held == 0


def test_refusals_are_worded_as_each_protocol_words_them() -> None:
    assert refusal("/v2/models/m/infer", "no", 503) == {"error": "no"}
    assert refusal("/invocations", "no", 503) == {
        "error_code": "TEMPORARILY_UNAVAILABLE",
        "message": "no",
    }
    assert refusal("/predict", "no", 503) == {"detail": "no"}
