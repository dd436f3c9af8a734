"""The one model loader, on files made here: a model mnistops wrote loads; every way of
changing, adding or disguising a file is refused by name before anything is unpickled."""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mnistops.predict import probabilities
from mnistops.tracking import model_files as mf
from mnistops.tracking import model_record as mr
from mnistops.train.models import build
from mnistops.train.onnx_graph import OnnxNet
from mnistops.train.runtime import NumpyNet

pytestmark = [pytest.mark.unit, pytest.mark.security]

KEY = b"k" * 40
SOURCE = "models:/m-0123456789abcdef"
"""the logged model the signed record is bound to"""


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A model saved as `tracking.runs` logs it (MLflow's pt2 archive, our weights and
    metadata), and the module it came from."""
    import mlflow.pytorch

    torch.manual_seed(0)
    model = build("digitnet").eval()
    root = tmp_path_factory.mktemp("written")
    weights = mf.save_weights(model, root)
    folder = root / "model"
    mlflow.pytorch.save_model(
        model,
        str(folder),
        input_example=np.zeros((2, 1, 28, 28), np.float32),
        pip_requirements=["torch"],
        serialization_format="pt2",
        extra_files=[str(weights)],
        metadata=mf.metadata("digitnet"),
    )
    return folder, model


def copy_of(written: tuple[Path, torch.nn.Module], tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the written model and its signed tags."""
    folder = tmp_path / "model"
    shutil.copytree(written[0], folder)
    return folder, mr.record_tags(KEY, mr.file_record(folder), SOURCE)


def test_a_model_mnistops_wrote_loads_and_predicts_the_same(written, tmp_path: Path) -> None:
    folder, tags = copy_of(written, tmp_path)
    loaded = mf.load_checked(folder, tags, KEY, SOURCE)
    x = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), written[1](x), atol=1e-6)
    assert mr.record_problem(tags, KEY, SOURCE) is None


def _unsigned(folder: Path, tags: dict) -> dict:
    return {}


def _other_key(folder: Path, tags: dict) -> dict:
    return mr.record_tags(b"x" * 40, mr.file_record(folder), SOURCE)


def _edited_record(folder: Path, tags: dict) -> dict:
    return {**tags, mr.FILES_TAG: tags[mr.FILES_TAG].replace('"MLmodel"', '"MLmodel2"')}


def _copied(folder: Path, tags: dict) -> dict:
    """A good version's signed tags, copied onto a version of another logged model."""
    other = mr.record_tags(KEY, mr.file_record(folder), "models:/m-other")
    return other


def _extra_file(folder: Path, tags: dict) -> dict:
    (folder / "data" / "model.pth").write_bytes(b"pickled")
    return tags


def _symlink(folder: Path, tags: dict) -> dict:
    (folder / "requirements.txt").unlink()
    os.symlink("/etc/passwd", folder / "requirements.txt")
    return tags


def _changed_byte(folder: Path, tags: dict) -> dict:
    path = folder / "data" / "model.pt2"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return tags


def _missing(folder: Path, tags: dict) -> dict:
    (folder / mf.WEIGHTS_PATH).unlink()
    return tags


def _resigned(edit: Callable[[dict], None]) -> Callable[[Path, dict], dict]:
    """The MLmodel edited, then signed as if by mnistops (a key holder's mistake, or a
    version trusted by hand): the format check still refuses it."""

    def change(folder: Path, tags: dict) -> dict:
        path = folder / "MLmodel"
        mlmodel = yaml.safe_load(path.read_text())
        edit(mlmodel)
        path.write_text(yaml.safe_dump(mlmodel))
        return mr.record_tags(KEY, mr.file_record(folder), SOURCE)

    return change


def _code_path(m: dict) -> None:
    m["flavors"]["python_function"]["code"] = "code"


def _loader_module(m: dict) -> None:
    m["flavors"]["python_function"]["loader_module"] = "evil"


def _other_weights(m: dict) -> None:
    m["flavors"]["pytorch"]["extra_files"] = [{"path": "extra_files/other.npz"}]


def _not_our_format(m: dict) -> None:
    del m["metadata"]


def _other_architecture(m: dict) -> None:
    m["metadata"]["architecture"] = "os.system"


def _other_flavor(m: dict) -> None:
    m["flavors"]["sklearn"] = {"pickled_model": "model.pkl"}


def _signed_extra(folder: Path, tags: dict) -> dict:
    (folder / "evil.py").write_text("import os\n")
    return mr.record_tags(KEY, mr.file_record(folder), SOURCE)


def _raw_member(folder: Path, tags: dict) -> dict:
    with zipfile.ZipFile(folder / mf.WEIGHTS_PATH, "a") as archive:
        archive.writestr("evil", b"\x80\x04raw pickle bytes")
    return mr.record_tags(KEY, mr.file_record(folder), SOURCE)


def _pickled_weights(folder: Path, tags: dict) -> dict:
    path = folder / mf.WEIGHTS_PATH
    np.save(folder / "x.npy", np.array([object()], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "a") as archive:
        archive.write(folder / "x.npy", "evil.npy")
    (folder / "x.npy").unlink()
    return mr.record_tags(KEY, mr.file_record(folder), SOURCE)


def _undeclared_graph(folder: Path, tags: dict) -> dict:
    """An ONNX file where mnistops would put its graph, signed, but not in the MLmodel."""
    (folder / mf.GRAPH_PATH).write_bytes(b"\x08\x08")
    return mr.record_tags(KEY, mr.file_record(folder), SOURCE)


def _graph_elsewhere(m: dict) -> None:
    m["metadata"]["onnx"] = "data/evil.onnx"


def _wrong_shape(folder: Path, tags: dict) -> dict:
    path = folder / mf.WEIGHTS_PATH
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["8.weight"] = np.zeros((3, 3), np.float32)
    np.savez(path, **arrays)
    return mr.record_tags(KEY, mr.file_record(folder), SOURCE)


CASES = {
    "unsigned": (_unsigned, "not registered by mnistops (it has no signed file record)"),
    "another stack's key": (_other_key, "not signed with this stack's model key"),
    "record edited": (_edited_record, "not signed with this stack's model key"),
    "tags copied from another model": (_copied, "not signed with this stack's model key"),
    "a file outside the format, signed": (_signed_extra, "evil.py is not a file of mnistops'"),
    "raw bytes in the weights": (_raw_member, "'evil' is not a NumPy array"),
    "a file added": (_extra_file, "data/model.pth is not one of the files registered"),
    "a link": (_symlink, "requirements.txt is a link"),
    "a changed byte": (_changed_byte, "data/model.pt2 differs from the file registered"),
    "a file missing": (_missing, f"{mf.WEIGHTS_PATH}, registered with it, is missing"),
    "a code path": (_resigned(_code_path), "names a code path"),
    "a loader module": (_resigned(_loader_module), "names another loader module"),
    "other weights": (_resigned(_other_weights), "points at weights other than"),
    "not our format": (_resigned(_not_our_format), "does not declare mnistops' format"),
    "an unknown architecture": (_resigned(_other_architecture), "'os.system', not one of"),
    "another flavor": (_resigned(_other_flavor), "a flavor other than pytorch"),
    "pickled weights": (_pickled_weights, "is not a NumPy archive of arrays"),
    "a graph not declared": (_undeclared_graph, f"does not declare {mf.GRAPH_PATH}"),
    "a graph elsewhere": (_resigned(_graph_elsewhere), f"does not declare {mf.GRAPH_PATH}"),
    "weights of the wrong shape": (_wrong_shape, "8.weight is float32[3, 3]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_other_file_is_refused_by_name(written, tmp_path: Path, case: str) -> None:
    folder, tags = copy_of(written, tmp_path)
    change, words = CASES[case]
    tags = change(folder, tags)
    for load in (mf.load_checked, mf.load_for_answers):
        with pytest.raises(mf.ModelRefused, match=None) as refused:
            load(folder, tags, KEY, SOURCE)
        assert words in str(refused.value), str(refused.value)


def _claims_the_numpy_check(folder: Path, tags: dict) -> dict:
    path = folder / "MLmodel"
    mlmodel = yaml.safe_load(path.read_text())
    mlmodel["metadata"][mf.NUMPY_CHECK] = "10000/10000"
    path.write_text(yaml.safe_dump(mlmodel))
    return tags


def test_a_check_written_into_a_signed_model_is_refused(written, tmp_path: Path) -> None:
    folder, tags = copy_of(written, tmp_path)
    tags = _claims_the_numpy_check(folder, tags)
    with pytest.raises(mf.ModelRefused, match="MLmodel differs from the file registered"):
        mf.load_for_answers(folder, tags, KEY, SOURCE)


@pytest.mark.parametrize(
    ("check", "runtime"),
    [
        ("10000/10000", NumpyNet),
        ("10000/10000, 1 tied within float rounding", NumpyNet),
        ("9999/10000, 1 tied within float rounding", torch.nn.Module),
        (None, torch.nn.Module),
        ("9999/10000", torch.nn.Module),
        ("0/0", torch.nn.Module),
        ("x/x", torch.nn.Module),
    ],
)
def test_numpy_answers_only_for_a_version_that_passed_its_check(
    written, tmp_path: Path, check: str | None, runtime: type
) -> None:
    """The runtime `predict` and `serve` use: NumPy where the signed metadata records the
    same digits as PyTorch on every test image, else PyTorch; the same answers either way."""
    folder = tmp_path / "model"
    shutil.copytree(written[0], folder)
    path = folder / "MLmodel"
    mlmodel = yaml.safe_load(path.read_text())
    mlmodel["metadata"] = mf.metadata("digitnet", check)
    path.write_text(yaml.safe_dump(mlmodel))
    tags = mr.record_tags(KEY, mr.file_record(folder), SOURCE)
    loaded = mf.load_for_answers(folder, tags, KEY, SOURCE)
    assert isinstance(loaded, runtime)
    x = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        expected = written[1](x).numpy()
    np.testing.assert_allclose(probabilities(loaded, x.numpy()).argmax(1), expected.argmax(1))


def test_the_check_at_registration_compares_numpy_with_pytorch(written) -> None:
    images = (np.random.default_rng(0).random((300, 28, 28)) * 255).astype(np.uint8)
    with torch.inference_mode():
        digits = written[1](torch.from_numpy(images[:, None] / np.float32(255))).argmax(1)
    weights = written[0] / mf.WEIGHTS_PATH
    assert mf.numpy_check(weights, "digitnet", images, digits.numpy()) == "300/300"
    assert mf.numpy_check(weights, "digitnet", images, (digits.numpy() + 1) % 10) == "0/300"


def test_without_a_key_nothing_is_trusted(written, tmp_path: Path) -> None:
    folder, tags = copy_of(written, tmp_path)
    assert "model_registry.signing_key" in (mr.record_problem(tags, None, SOURCE) or "")


class Payload:
    """Unpickling this creates a marker file (it runs a function of our choosing)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_torch_export_load_runs_code_from_an_archive(tmp_path: Path) -> None:
    """Why mnistops never opens the pt2 archive: `torch.export.load` unpickles its sample
    inputs with `weights_only=False` once the safe unpickler refuses them (torch's
    `_export/serde/serialize.py: deserialize_torch_artifact`), and pickled weights and
    constants too (`export/pt2_archive/_package.py`). A crafted archive runs code on load.
    If this test ever fails, torch changed that, and the README's Security section must
    be read again."""
    import io

    archive = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),)), archive)
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt2"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(crafted, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                data = payload.getvalue()
            target.writestr(info, data)
    with contextlib.suppress(Exception):  # the payload's return value is no sample input
        torch.export.load(crafted)
    assert marker.exists()


@pytest.fixture(scope="module")
def with_graph(written, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The written model with its ONNX graph beside the weights, as registration logs it
    (the checks' results are set by each test)."""
    import mlflow.pytorch

    root = tmp_path_factory.mktemp("with-graph")
    weights = root / mf.WEIGHTS_NAME
    shutil.copy(written[0] / mf.WEIGHTS_PATH, weights)
    graph = mf.save_graph(weights, "digitnet")
    folder = root / "model"
    mlflow.pytorch.save_model(
        written[1],
        str(folder),
        input_example=np.zeros((2, 1, 28, 28), np.float32),
        pip_requirements=["torch"],
        serialization_format="pt2",
        extra_files=[str(weights), str(graph)],
        metadata=mf.metadata("digitnet", "10000/10000", "10000/10000"),
    )
    return folder


@pytest.mark.parametrize(
    ("checks", "runtime"),
    [
        ({}, OnnxNet),
        ({mf.ONNX_CHECK: "10000/10000, 2 tied within float rounding"}, OnnxNet),
        ({mf.ONNX_CHECK: "9999/10000"}, NumpyNet),
        ({"onnx_graph": "0"}, NumpyNet),
        ({mf.ONNX_CHECK: "9999/10000", mf.NUMPY_CHECK: "9999/10000"}, torch.nn.Module),
    ],
)
def test_onnx_runtime_answers_only_for_a_graph_that_passed_its_check(
    written, with_graph: Path, tmp_path: Path, checks: dict, runtime: type
) -> None:
    """The graph written the way this mnistops writes graphs, that gave PyTorch's digits
    at registration, is run by ONNX Runtime; else NumPy or PyTorch answer, as before."""
    folder = tmp_path / "model"
    shutil.copytree(with_graph, folder)
    path = folder / "MLmodel"
    mlmodel = yaml.safe_load(path.read_text())
    mlmodel["metadata"].update(checks)
    path.write_text(yaml.safe_dump(mlmodel))
    tags = mr.record_tags(KEY, mr.file_record(folder), SOURCE)
    loaded = mf.load_for_answers(folder, tags, KEY, SOURCE)
    assert isinstance(loaded, runtime)
    x = torch.rand(9, 1, 28, 28)
    with torch.inference_mode():
        expected = written[1](x).numpy()
    np.testing.assert_allclose(probabilities(loaded, x.numpy()).argmax(1), expected.argmax(1))


def test_a_graph_changed_after_signing_is_refused(with_graph: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(with_graph, folder)
    tags = mr.record_tags(KEY, mr.file_record(folder), SOURCE)
    (folder / mf.GRAPH_PATH).write_bytes(b"another graph")
    with pytest.raises(mf.ModelRefused, match=f"{mf.GRAPH_PATH} differs from the file"):
        mf.load_for_answers(folder, tags, KEY, SOURCE)


def test_the_check_at_registration_runs_the_graph(written, with_graph: Path) -> None:
    images = (np.random.default_rng(1).random((300, 28, 28)) * 255).astype(np.uint8)
    with torch.inference_mode():
        digits = written[1](torch.from_numpy(images[:, None] / np.float32(255))).argmax(1)
    graph = with_graph / mf.GRAPH_PATH
    assert mf.onnx_check(graph, "digitnet", images, digits.numpy()) == "300/300"
    assert mf.onnx_check(graph, "digitnet", images, (digits.numpy() + 1) % 10) == "0/300"


def _signed_copy(with_graph: Path, tmp_path: Path, graph: bytes | None) -> tuple[Path, dict]:
    """The model with its graph replaced by `graph` (or removed), re-signed as a key holder
    would (or `models promote --trust-unsigned` before it checked the graph)."""
    folder = tmp_path / "model"
    shutil.copytree(with_graph, folder)
    if graph is None:
        (folder / mf.GRAPH_PATH).unlink()
    else:
        (folder / mf.GRAPH_PATH).write_bytes(graph)
    return folder, mr.record_tags(KEY, mr.file_record(folder), SOURCE)


@pytest.mark.parametrize(
    ("graph", "words"),
    [
        (b"\x08\x08garbage", "is not a graph ONNX Runtime can load"),
        (None, f"{mf.GRAPH_PATH}, declared in MLmodel, is missing"),
    ],
)
def test_a_signed_graph_that_does_not_load_is_refused_by_name(
    with_graph: Path, tmp_path: Path, graph: bytes | None, words: str
) -> None:
    folder, tags = _signed_copy(with_graph, tmp_path, graph)
    with pytest.raises(mf.ModelRefused, match=words):
        mf.load_for_answers(folder, tags, KEY, SOURCE)


def test_a_graph_over_the_size_cap_is_refused_unread(
    with_graph: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, tags = _signed_copy(with_graph, tmp_path, b"\0" * 2048)
    monkeypatch.setattr(mf, "MAX_GRAPH_BYTES", 1024)
    with pytest.raises(mf.ModelRefused, match=f"{mf.GRAPH_PATH} is over"):
        mf.load_for_answers(folder, tags, KEY, SOURCE)


def test_only_the_graph_mnistops_writes_from_the_weights_can_be_trusted(
    written, with_graph: Path, tmp_path: Path
) -> None:
    """`models promote --trust-unsigned` vouches for weights; a graph beside them is code for
    ONNX Runtime, so it must be the one mnistops writes from those weights, byte for byte
    (an outside review made a trusted graph answer 7 always, and read a file through
    ONNX's external data)."""
    arrays = mf.read_weights(with_graph / mf.WEIGHTS_PATH)
    mf.check_graph(with_graph, "digitnet", arrays)
    other = {k: v + np.float32(0.01) if v.dtype == np.float32 else v for k, v in arrays.items()}
    from mnistops.train.onnx_graph import graph_bytes

    folder, _ = _signed_copy(with_graph, tmp_path, graph_bytes("digitnet", other))
    with pytest.raises(mf.ModelRefused, match="not the graph mnistops writes"):
        mf.check_graph(folder, "digitnet", arrays)
