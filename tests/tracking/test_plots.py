"""The pictures a run keeps, drawn from known arrays (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from mnistops.tracking import plots

pytestmark = pytest.mark.unit


def test_the_worst_mistakes_are_drawn_most_sure_first_each_captioned() -> None:
    images = np.arange(40 * 28 * 28, dtype=np.int64).reshape(40, 28, 28) % 251
    truth = np.zeros(40, np.int64)
    predicted = np.zeros(40, np.int64)
    predicted[[3, 7, 11]] = [1, 2, 3]  # three mistakes; 11 the surest, then 3
    confidence = np.full(40, 0.5)
    confidence[[3, 7, 11]] = [0.8, 0.6, 0.9]
    fig = plots.worst_errors_figure(images, truth, predicted, confidence)
    try:
        (ax,) = fig.axes
        mosaic = np.asarray(ax.images[0].get_array())
        captions = [t.get_text() for t in ax.texts]
        assert captions == ["true 0, said 3\n90%", "true 0, said 1\n80%", "true 0, said 2\n60%"]
        tiles = [mosaic[13 : 13 + 28, 5 + k * 38 : 5 + k * 38 + 28] for k in range(3)]
        for tile, index in zip(tiles, [11, 3, 7], strict=True):
            assert (tile == images[index]).all()
        assert fig.texts[0].get_text() == "worst 3 of 3 misclassified test images"
    finally:
        plots.close(fig)


def test_no_mistake_draws_an_empty_picture() -> None:
    images = np.zeros((5, 28, 28), np.uint8)
    digits = np.arange(5)
    fig = plots.worst_errors_figure(images, digits, digits, np.ones(5))
    try:
        assert not fig.axes[0].texts and not np.asarray(fig.axes[0].images[0].get_array()).any()
        assert fig.texts[0].get_text() == "worst 0 of 0 misclassified test images"
    finally:
        plots.close(fig)
