"""The training loop and data arrays, without services."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnistops.data import mnist
from mnistops.settings import HyperParameters
from mnistops.train import models
from mnistops.train.data import Arrays, DataSource
from mnistops.train.loop import (
    NonFiniteLoss,
    TrainingError,
    check_hyperparameters,
    pick_device,
    split_train_val,
    train,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def small() -> Arrays:
    """600 training and 200 test images of the real MNIST."""
    data = mnist.load(mnist.packaged_dir())
    return Arrays(
        data.train_images[:600],
        data.train_labels[:600].astype(np.int64),
        data.test_images[:200],
        data.test_labels[:200].astype(np.int64),
        DataSource("unit", "0" * 64, "file:///unit", tracked=False),
    )


def test_seednet_is_the_tutorial_cnn() -> None:
    net = models.seednet()
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (5, 5)),
        (32, 4, (5, 5)),
    ]
    linear = next(m for m in net if isinstance(m, torch.nn.Linear))
    assert (linear.in_features, linear.out_features) == (784, 10)
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net) == 2
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net) == 1


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_maps_images_to_ten_logits(name: str) -> None:
    out = models.build(name).eval()(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_dropout_drops_its_share_scales_the_rest_and_follows_the_seed() -> None:
    drop = models.Dropout(0.25)
    ones = torch.ones(400, 1000)
    torch.manual_seed(7)
    first = drop(ones)
    torch.manual_seed(7)
    assert torch.equal(drop(ones), first)
    assert abs(float((first == 0).float().mean()) - 0.25) < 0.005
    assert first.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert abs(float(first.mean()) - 1.0) < 0.01
    assert torch.equal(drop.eval()(ones), ones)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_other_shares_and_odd_sizes(p: float) -> None:
    ones = torch.ones(1001, 333)  # not a multiple of the four lanes of a draw
    dropped = models.Dropout(p)(ones)
    assert abs(float((dropped == 0).float().mean()) - p) < 0.005
    assert abs(float(dropped.mean()) - 1.0) < 0.02
    assert torch.equal(models.Dropout(1.0)(ones), torch.zeros_like(ones))


def test_an_unknown_model_names_the_known_ones() -> None:
    known = "known: digitnet2, digitnet, seednet"
    with pytest.raises(TrainingError, match=f"unknown model 'resnet' .{known}"):
        check_hyperparameters(HyperParameters(model="resnet"))


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TrainingError, match="no usable CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto") == "cpu"


def test_the_validation_split_follows_the_seed() -> None:
    a_train, a_val = split_train_val(1000, 0.2, seed=1)
    b_train, b_val = split_train_val(1000, 0.2, seed=1)
    c_train, _ = split_train_val(1000, 0.2, seed=2)
    assert len(a_val) == 200 and len(a_train) == 800
    assert not set(a_train) & set(a_val)
    assert (a_train == b_train).all() and (a_val == b_val).all()
    assert not (a_train == c_train).all()


def test_fast_subset_keeps_every_test_image(small: Arrays) -> None:
    fast = small.subset(0.1, seed=3)
    assert len(fast.train_y) == 60 and len(fast.test_y) == 200
    assert (fast.train_x == small.subset(0.1, seed=3).train_x).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_metrics(small: Arrays, precision: str) -> None:
    """The default recipe (label smoothing, one-cycle, augmentation) on a small subset, in
    either arithmetic: the same seed gives the same metrics and the same predictions."""
    hyp = HyperParameters(n_epochs=2, batch_size=32, random_seed=7, threads=2, precision=precision)
    first, second = train(small, hyp), train(small, hyp)
    assert first.epochs[-1].train_loss == second.epochs[-1].train_loss
    assert [e.val_accuracy for e in first.epochs] == [e.val_accuracy for e in second.epochs]
    assert first.test.accuracy == second.test.accuracy
    assert (first.test.predicted == second.test.predicted).all()
    assert (first.test.confidence == second.test.confidence).all()
    assert first.test.accuracy > 0.5
    if precision == "fp32":  # the seed matters (once is enough)
        other = train(small, hyp.model_copy(update={"random_seed": 8}))
        assert other.epochs[-1].train_loss != first.epochs[-1].train_loss


def test_calibration_makes_confidence_honest_and_keeps_the_digits(small: Arrays) -> None:
    from mnistops.train.evaluation import calibration

    hyp = HyperParameters(n_epochs=2, batch_size=32, random_seed=7, threads=2)
    raw = train(small, hyp.model_copy(update={"calibrate": False}))
    calibrated = train(small, hyp)
    assert raw.temperature == 1.0 and calibrated.temperature != 1.0
    assert (raw.test.predicted == calibrated.test.predicted).all()
    right = raw.test.predicted == small.test_y
    raw_ece, _ = calibration(raw.test.confidence, right)
    calibrated_ece, _ = calibration(calibrated.test.confidence, right)
    assert calibrated_ece < raw_ece


def test_a_diverging_run_stops_with_the_epoch(small: Arrays) -> None:
    hyp = HyperParameters(
        model="seednet", learning_rate=1e30, schedule="constant", augment=False, batch_size=16
    )
    with pytest.raises(NonFiniteLoss, match="non-finite loss at epoch 1"):
        train(small, hyp)


def test_the_temperature_is_the_one_that_fits_and_stays_bounded() -> None:
    """Labels drawn from softmax(z) and logits 2z: the fitted temperature is about 2. A
    model that learned nothing, or everything, gets a bounded one, never 0 or infinity."""
    from mnistops.train.loop import TEMPERATURES, best_temperature

    rng = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 10, generator=rng) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=rng).squeeze(1)
    assert best_temperature(2 * z, labels) == pytest.approx(2, rel=0.05)
    sure = torch.nn.functional.one_hot(labels, 10).float() * 50
    assert best_temperature(sure, labels) == pytest.approx(TEMPERATURES[0])
    wrong = torch.nn.functional.one_hot((labels + 1) % 10, 10).float() * 50
    assert best_temperature(wrong, labels) == pytest.approx(TEMPERATURES[1])


def test_a_model_with_non_finite_answers_is_never_scored(small: Arrays) -> None:
    """Infinite weights (what a temperature of zero once made) stop the run by name."""
    from mnistops.train.loop import Fitted, score_on_test

    model = models.build("digitnet2").eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.fill_(float("inf"))
    fitted = Fitted(model, "cpu", [], 0.0, 540, 60, 1)
    with pytest.raises(TrainingError, match="not finite numbers"):
        score_on_test(fitted, small)
