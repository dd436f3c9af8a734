"""The private APIs of our dependencies that `compat.py` uses are still there, and each
fallback works: an upgrade that renames one fails here, with the name, not mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnistops import compat

pytestmark = pytest.mark.unit


def test_mlflow_still_has_its_scoped_tracking_uri() -> None:
    import mlflow

    assert compat.private_tracking_uri_setter() is not None, (
        "mlflow.tracking._tracking_service.utils._use_tracking_uri is gone:"
        " compat.mlflow_tracking_uri now uses its public fallback; check it"
    )
    before = mlflow.get_tracking_uri()
    with compat.mlflow_tracking_uri("http://127.0.0.1:1"):
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:1"
    assert mlflow.get_tracking_uri() == before


def test_the_public_fallback_puts_the_uri_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setattr(compat, "private_tracking_uri_setter", lambda: None)
    before = mlflow.get_tracking_uri()
    with compat.mlflow_tracking_uri("http://127.0.0.1:2"):
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:2"
    assert mlflow.get_tracking_uri() == before


def test_torch_still_says_whether_bf16_is_native() -> None:
    import torch

    assert hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"), (
        "torch.ops.mkldnn._is_mkldnn_bf16_supported is gone: compat.bf16_is_native now"
        " says False everywhere (training in fp32); find its successor"
    )
    assert isinstance(compat.bf16_is_native(), bool)


def test_prefect_still_vendors_croniter_as_we_catch_it() -> None:
    import importlib

    module = importlib.import_module("prefect._vendor.croniter.croniter")
    error = module.CroniterBadDateError("no date")
    assert compat.is_cron_without_dates(error)
    assert not compat.is_cron_without_dates(ValueError("other"))


def test_uvicorn_still_has_the_protocol_hooks_we_extend() -> None:
    assert compat.uvicorn_http_protocol().__name__ == "HttpToolsProtocol"


def test_prefect_still_has_the_startup_calls_that_make_a_database() -> None:
    """`compat.PREFECT_DATABASE_WITH_BLOCK_TYPES` runs them (stack.prefect_db falls back
    to `prefect server database upgrade` without them). Read from Prefect's source, not
    imported (importing Prefect's server costs this tier 2 s); the program itself runs
    in `tests/stack/test_prefect_db.py`."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    root = Path(spec.origin).parent / "server"
    for module, name in (
        ("database/__init__.py", "provide_database_interface"),
        ("models/block_registration.py", "run_block_auto_registration"),
    ):
        tree = ast.parse((root / module).read_text())
        defined = {getattr(node, "name", None) for node in ast.walk(tree)} | {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        assert name in defined, f"prefect/server/{module} has no {name} any more"
    program = compat.PREFECT_DATABASE_WITH_BLOCK_TYPES
    assert "run_block_auto_registration(session=session)" in program


def test_mlflow_server_still_starts_uvicorn_through_exec_cmd() -> None:
    """`compat.mlflow_server_in_one_process` replaces `mlflow.server._exec_cmd`, which
    `_run_server` calls last to start uvicorn (read from MLflow's source: importing its
    server costs this tier seconds); the stack's tests run the server itself."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("mlflow")
    assert spec is not None and spec.origin is not None
    tree = ast.parse((Path(spec.origin).parent / "server" / "__init__.py").read_text())
    run_server = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "_run_server"
    )
    called = {
        node.func.id
        for node in ast.walk(run_server)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert "_exec_cmd" in called, "mlflow.server._run_server no longer calls _exec_cmd"


def test_python_still_has_the_exit_steps_the_cli_runs_before_leaving() -> None:
    assert compat.before_teardown() is not None, (
        "threading._shutdown or atexit._run_exitfuncs is gone: every mnistops command now"
        " ends the usual way (slower by the teardown of its modules); see cli.leave"
    )
