"""The one way a registered model becomes a model in memory, and the record that allows it.

Anyone who can write to MLflow can register a version and point `champion` at it, and
MLflow's own loaders run code from what they load: a pickled module (`torch.load`), a
`python_function` loader module or code path, and even a `torch.export` archive, whose
pickled weights and constants `torch.export.load` unpickles with `weights_only=False`.
So mnistops never hands registry files to any of them. It loads one format, the one it
writes, and only after checking, in this order, without deserializing anything:

1. the version carries a file record (`model_files`: path -> SHA-256) signed with the
   stack's model key (`model_signature`, HMAC-SHA256): "registered by mnistops"
   (`tracking.model_record`);
2. the downloaded files are exactly the recorded ones, byte for byte: no file added or
   missing, no link, no changed byte;
3. the MLmodel file (read as plain YAML) declares our format: the PyTorch flavor on
   `data/` with our weights file and no code, an exported archive and no pickle;
4. the weights: a NumPy `.npz` read with `allow_pickle=False` into an architecture that
   mnistops builds from its own code (`train.architecture`), named in the MLmodel
   metadata, every tensor's name, shape and dtype checked.

`predict` and `serve` then answer with ONNX Runtime, on the ONNX graph mnistops wrote from
the weights at registration (`train.onnx_graph`, a file covered by the same record), when
the MLmodel metadata, signed with the rest, records that the graph gave PyTorch's digits on
the whole test set (`onnx_runtime`); else with NumPy (`train.runtime`) when NumPy did
(`numpy_runtime`); otherwise with PyTorch.

The `torch.export` archive MLflow keeps beside it is for MLflow's tools (`mlflow models
serve`, `mlflow.pytorch.load_model`); mnistops never opens it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mnistops.errors import MnistopsError
from mnistops.tracking.model_record import ModelRefused as ModelRefused
from mnistops.tracking.model_record import check_files, file_record, signed_record
from mnistops.train.architecture import ARCHITECTURES, tensors

FORMAT = "mnistops-npz-v1"
WEIGHTS_NAME = "mnistops-weights.npz"
WEIGHTS_PATH = f"extra_files/{WEIGHTS_NAME}"
GRAPH_NAME = "mnistops-model.onnx"
GRAPH_PATH = f"extra_files/{GRAPH_NAME}"
"""written by MLflow's client into every download of `models:/NAME/VERSION`"""
MAX_WEIGHTS_BYTES = 64 * 1024 * 1024
"""our models' weights take under 1 MB: a larger archive is refused unopened"""
MAX_GRAPH_BYTES = 16 * 1024 * 1024
"""our graphs take under 1 MB: a larger file is refused unread"""


class ModelUnavailable(MnistopsError):
    """A version's files could not be downloaded now (a server down, a timeout)."""


NUMPY_CHECK = "numpy_runtime"
"""the MLmodel metadata key of the check that lets `predict` and `serve` run the weights
with NumPy (`train.runtime`): "<same digits>/<test images>" against PyTorch's digits"""


ONNX_CHECK = "onnx_runtime"
"""the same check of the ONNX graph (the MLmodel metadata key `onnx` names its file, and
`onnx_graph` the `train.onnx_graph.GRAPH_VERSION` that wrote it)"""


def metadata(
    architecture: str, numpy_check: str | None = None, onnx_check: str | None = None
) -> dict[str, str]:
    """What the MLmodel file says of our format (its `metadata` key)."""
    found = {"mnistops_format": FORMAT, "architecture": architecture, "weights": WEIGHTS_PATH}
    if numpy_check is not None:
        found[NUMPY_CHECK] = numpy_check
    if onnx_check is not None:
        from mnistops.train.onnx_graph import GRAPH_VERSION

        found.update({"onnx": GRAPH_PATH, "onnx_graph": GRAPH_VERSION, ONNX_CHECK: onnx_check})
    return found


def numpy_check(weights: Path, architecture: str, images: np.ndarray, digits: np.ndarray) -> str:
    """The NumPy runtime's digits for `images` (the test set) against PyTorch's `digits`,
    as the metadata records it."""
    from mnistops.train.runtime import agreement, compile_net

    net = compile_net(architecture, read_weights(weights))
    same, ties = agreement(net, images, digits)
    return f"{same}/{len(images)}" + (f", {ties} tied within float rounding" if ties else "")


def save_graph(weights: Path, architecture: str) -> Path:
    """The ONNX graph of the weights in `weights`, written beside them (registration)."""
    from mnistops.train.onnx_graph import graph_bytes

    path = weights.with_name(GRAPH_NAME)
    path.write_bytes(graph_bytes(architecture, read_weights(weights)))
    return path


def onnx_check(graph: Path, architecture: str, images: np.ndarray, digits: np.ndarray) -> str:
    """ONNX Runtime's digits on the graph for `images` (the test set) against PyTorch's
    `digits`, as the metadata records it."""
    from mnistops.train.onnx_graph import load_graph
    from mnistops.train.runtime import agreement

    same, ties = agreement(load_graph(architecture, graph.read_bytes()), images, digits)
    return f"{same}/{len(images)}" + (f", {ties} tied within float rounding" if ties else "")


def passed(outcome: str) -> bool:
    """A check's outcome ("<same digits>/<test images>[, ties]") says every digit agreed."""
    same, _, total = outcome.split(",")[0].partition("/")
    return same.isdigit() and same == total and int(total) > 0


def _passed(meta: dict[str, Any], check: str) -> bool:
    return passed(str(meta.get(check, "")))


def numpy_checked(meta: dict[str, Any]) -> bool:
    """The version passed the NumPy check at registration: every test digit the same, or
    tied with PyTorch's within float rounding."""
    return _passed(meta, NUMPY_CHECK)


def onnx_checked(meta: dict[str, Any]) -> bool:
    """The version's ONNX graph, written the way this mnistops writes graphs, passed the
    same check."""
    from mnistops.train.onnx_graph import GRAPH_VERSION

    return (
        meta.get("onnx") == GRAPH_PATH
        and str(meta.get("onnx_graph")) == GRAPH_VERSION
        and _passed(meta, ONNX_CHECK)
    )


def save_weights(model: Any, folder: Path) -> Path:
    """The model's weights as `folder/mnistops-weights.npz` (no pickle, plain arrays)."""
    arrays = {
        key: value.detach().cpu().contiguous().numpy() for key, value in model.state_dict().items()
    }
    path = folder / WEIGHTS_NAME
    np.savez(path, **arrays)
    return path


def _mlmodel(folder: Path) -> dict[str, Any]:
    import yaml

    path = folder / "MLmodel"
    if not path.is_file():
        raise ModelRefused("its MLmodel file is missing")
    try:
        found = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelRefused(f"MLmodel is not YAML ({exc.__class__.__name__})") from None
    if not isinstance(found, dict):
        raise ModelRefused("MLmodel is not a YAML map")
    return found


LAYOUT = frozenset(
    {
        "MLmodel",
        "conda.yaml",
        "python_env.yaml",
        "requirements.txt",
        "input_example.json",
        "serving_input_example.json",
        "data/model.pt2",
        WEIGHTS_PATH,
        GRAPH_PATH,
    }
)
"""every file a model in mnistops' format may have (MLflow's PyTorch model and ours)"""
REQUIRED = frozenset({"MLmodel", "data/model.pt2", WEIGHTS_PATH})


def check_layout(folder: Path) -> None:
    """The files are those of mnistops' format, no other (a link is refused too)."""
    found = set(file_record(folder))
    other = sorted(found - LAYOUT)
    if other:
        raise ModelRefused(f"{other[0]} is not a file of mnistops' model format")
    missing = sorted(REQUIRED - found)
    if missing:
        raise ModelRefused(f"{missing[0]}, a file of mnistops' model format, is missing")


def check_format(folder: Path) -> str:
    """The architecture named by an MLmodel that declares our format; ModelRefused for
    anything else (a pickled module, a loader module or code path, another file)."""
    return str(_checked_metadata(folder)["architecture"])


def _checked_metadata(folder: Path) -> dict[str, Any]:
    check_layout(folder)
    found = _mlmodel(folder)
    meta = found.get("metadata") or {}
    if not isinstance(meta, dict) or meta.get("mnistops_format") != FORMAT:
        raise ModelRefused(f"MLmodel does not declare mnistops' format ({FORMAT})")
    flavors = found.get("flavors")
    if not isinstance(flavors, dict) or set(flavors) - {"pytorch", "python_function"}:
        raise ModelRefused("MLmodel declares a flavor other than pytorch and python_function")
    torch_flavor = flavors.get("pytorch")
    if not isinstance(torch_flavor, dict) or torch_flavor.get("model_data") != "data":
        raise ModelRefused("MLmodel's pytorch flavor does not point at data/")
    if torch_flavor.get("code") or (flavors.get("python_function") or {}).get("code"):
        raise ModelRefused("MLmodel names a code path: mnistops runs no code from the registry")
    pyfunc = flavors.get("python_function")
    if pyfunc is not None and (
        not isinstance(pyfunc, dict) or pyfunc.get("loader_module") != "mlflow.pytorch"
    ):
        raise ModelRefused("MLmodel's python_function flavor names another loader module")
    graph = meta.get("onnx")
    if graph not in (None, GRAPH_PATH) or (graph is None and (folder / GRAPH_PATH).exists()):
        raise ModelRefused(f"MLmodel does not declare {GRAPH_PATH} as mnistops writes it")
    if graph is not None and not (folder / GRAPH_PATH).is_file():
        raise ModelRefused(f"{GRAPH_PATH}, declared in MLmodel, is missing")
    extra = [{"path": WEIGHTS_PATH}] + ([{"path": GRAPH_PATH}] if graph else [])
    if torch_flavor.get("extra_files") != extra or meta.get("weights") != WEIGHTS_PATH:
        raise ModelRefused(f"MLmodel points at weights other than {WEIGHTS_PATH}")
    if (folder / "data" / "model.pth").exists() or not (folder / "data" / "model.pt2").is_file():
        raise ModelRefused("data/ holds a pickled model, not an exported one")
    architecture = meta.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ModelRefused(
            f"MLmodel names the architecture {architecture!r}, not one of mnistops'"
            f" ({', '.join(ARCHITECTURES)})"
        )
    return meta


def read_weights(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            if sum(i.file_size for i in archive.infolist()) > MAX_WEIGHTS_BYTES:
                raise ModelRefused(f"{WEIGHTS_PATH} unpacks to more than 64 MB")
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
    except ModelRefused:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelRefused(f"{WEIGHTS_PATH} is not a NumPy archive of arrays ({exc})") from None
    odd = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if odd:
        raise ModelRefused(f"{WEIGHTS_PATH}: {odd[0]!r} is not a NumPy array")
    return arrays


def read_graph(folder: Path) -> bytes:
    """The bytes of the model's ONNX graph, refused unread past MAX_GRAPH_BYTES."""
    path = folder / GRAPH_PATH
    if path.stat().st_size > MAX_GRAPH_BYTES:
        raise ModelRefused(f"{GRAPH_PATH} is over {MAX_GRAPH_BYTES // 2**20} MB")
    return path.read_bytes()


def check_graph(folder: Path, architecture: str, arrays: dict[str, np.ndarray]) -> None:
    """A declared graph must be, byte for byte, the one mnistops writes from these weights
    (`models promote --trust-unsigned`: a graph is code for ONNX Runtime, and an edited
    one could answer otherwise than the weights the gate scores, or read files)."""
    if _mlmodel(folder).get("metadata", {}).get("onnx") is None:
        return
    from mnistops.train.onnx_graph import graph_bytes

    if read_graph(folder) != graph_bytes(architecture, arrays):
        raise ModelRefused(
            f"{GRAPH_PATH} is not the graph mnistops writes from this version's weights:"
            " only a graph mnistops wrote can be trusted"
        )


def check_weights(architecture: str, arrays: dict[str, np.ndarray]) -> None:
    """Every name, shape and dtype must be the architecture's own."""
    expected = tensors(architecture)
    if set(arrays) != set(expected):
        odd = sorted(set(arrays) ^ set(expected))[0]
        raise ModelRefused(f"{WEIGHTS_PATH} does not fit {architecture}: tensor {odd!r}")
    for key, (dtype, shape) in expected.items():
        array = arrays[key]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise ModelRefused(
                f"{WEIGHTS_PATH}: {key} is {array.dtype}{list(array.shape)}, {architecture}"
                f" needs {dtype}{list(shape)}"
            )


def build_checked(architecture: str, arrays: dict[str, np.ndarray]) -> Any:
    """Our architecture with these weights, as a PyTorch module in eval mode."""
    import torch

    from mnistops.train.models import build

    check_weights(architecture, arrays)
    model = build(architecture)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return model.eval()


def _checked_files(
    folder: Path, tags: dict[str, str], key: bytes | None, source: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(MLmodel metadata, weights) of the model in `folder` (a version's downloaded
    files), after the record, file and format checks above."""
    check_files(folder, signed_record(tags, key, source))
    return _checked_metadata(folder), read_weights(folder / WEIGHTS_PATH)


def load_checked(folder: Path, tags: dict[str, str], key: bytes | None, source: str) -> Any:
    """The model in `folder`, after every check above, as a PyTorch module (what the gate
    scores)."""
    meta, arrays = _checked_files(folder, tags, key, source)
    return build_checked(meta["architecture"], arrays)


def load_for_answers(
    folder: Path, tags: dict[str, str], key: bytes | None, source: str, threads: int = 1
) -> Any:
    """The same model, after the same checks, in the fastest faithful way: its ONNX graph
    run by ONNX Runtime when the graph gave PyTorch's digits on the whole test set at
    registration; else run by NumPy (`train.runtime`) when NumPy did; else as a PyTorch
    module (a version registered before the checks existed). No PyTorch import in the
    first two. What `predict` and `serve` answer with, on `threads` threads."""
    from mnistops.train.onnx_graph import load_graph, runtime_available
    from mnistops.train.runtime import compile_net

    meta, arrays = _checked_files(folder, tags, key, source)
    architecture = meta["architecture"]
    check_weights(architecture, arrays)
    if onnx_checked(meta) and runtime_available():
        graph = read_graph(folder)
        try:
            return load_graph(architecture, graph, threads)
        except Exception as exc:  # noqa: BLE001  onnxruntime's own errors, of every kind
            raise ModelRefused(
                f"{GRAPH_PATH} is not a graph ONNX Runtime can load ({type(exc).__name__})"
            ) from None
    if numpy_checked(meta):
        return compile_net(architecture, arrays)
    return build_checked(architecture, arrays)
