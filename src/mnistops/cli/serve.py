"""`mnistops serve`: the champion over HTTP, following the registry."""

from __future__ import annotations

from typing import Annotated

import typer

from mnistops.cli._ui import Detach, console, settings, shorter, warn
from mnistops.settings import SERVING_KEYS


def serve(
    port: Annotated[int | None, typer.Option("--port", help="Default: serve.port (5060).")] = None,
    detach: Detach = False,
) -> None:
    """Serve the champion: POST /predict, a draw-a-digit page at /, /model, /metrics, /docs.

    Loads the `champion` of the registered model through the MLflow server and follows
    it: when the alias moves, the new version is loaded in the background and swapped in.
    """
    from mnistops.serving import server

    cfg = settings(SERVING_KEYS)
    if port is not None:
        serve_settings = cfg.serve.model_copy(update={"port": port, "url": None})
        cfg = cfg.model_copy(update={"serve": serve_settings})
    exposed = server.exposure(cfg)
    if exposed:
        warn(exposed)
    if not detach:
        console.print(f"serving the champion at {cfg.local_serve_url} (Ctrl-C stops it)")
        server.run(cfg)
        return
    record = server.start_detached(cfg)
    ready = server.wait_ready(cfg)
    state = f"ready, v{ready['model_version']}" if ready else "not ready yet (no champion?)"
    console.print(
        f"prediction service at {cfg.local_serve_url} ({state}; pid {record.pid},"
        f" log {shorter(record.log_path)}); `mnistops stack down` stops it"
    )
