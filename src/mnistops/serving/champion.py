"""The model in use, and the thread that follows the registry's `champion` alias.

Requests read `Holder.current` once and keep that model for the whole request; the
follower loads a new version completely (download, load, one test forward pass) before
it replaces the reference, so a swap never fails or delays a request. A version that
does not load is logged and skipped; the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mnistops.predict import runtime_of
from mnistops.settings import Settings
from mnistops.tracking.champion import AliasedVersion
from mnistops.tracking.contract import CHAMPION, DATA_VERSION_TAG, SIGNATURE_TAG

log = logging.getLogger("mnistops.serve")


@dataclass(frozen=True)
class Served:
    """A loaded version and what `/model` says of it."""

    name: str
    version: str
    module: Any
    data_version: str | None
    test_accuracy: float | None
    run_id: str | None
    run_url: str | None
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "alias": CHAMPION,
            "data_version": self.data_version,
            "test_accuracy": self.test_accuracy,
            "run_id": self.run_id,
            "run_url": self.run_url,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "runtime": runtime_of(self.module),
        }


class Holder:
    """The model in use (None until the first champion has loaded)."""

    def __init__(self) -> None:
        self.current: Served | None = None
        self.swaps = 0
        self.refused: dict[str, tuple[str | None, str]] = {}
        """versions that failed to load: (their signature tag then, why); not tried
        again while the signature stays what it was (`models promote --trust-unsigned`
        signs them)"""

    def refusals(self) -> dict[str, str]:
        """version -> why it was refused (/model)."""
        return {version: why for version, (_signature, why) in self.refused.items()}


def load_served(settings: Settings, version: AliasedVersion) -> Served:
    """Load a registered version (as `tracking.champion` reads it) for serving."""
    from mnistops.predict import load_version
    from mnistops.tracking.champion import accuracy_of

    module = load_version(settings, version, settings.serve.threads or 1)
    if runtime_of(module) == "pytorch":
        import torch  # a version registered before the checks: PyTorch answers

        torch.set_num_threads(settings.serve.threads or 1)
    run_url = None
    if version.run_id:
        run_url = f"{settings.mlflow_uri.rstrip('/')}/#/runs/{version.run_id}"
    return Served(
        settings.model_registry.name,
        str(version.version),
        module,
        version.tags.get(DATA_VERSION_TAG),
        accuracy_of(settings, version),
        version.run_id,
        run_url,
    )


class Follower(threading.Thread):
    """Every `poll_s`, asks the registry which version is `champion`; loads a new one in
    this thread and swaps it in."""

    def __init__(self, settings: Settings, holder: Holder, poll_s: float) -> None:
        super().__init__(name="champion-follower", daemon=True)
        self.settings = settings
        self.holder = holder
        self.poll_s = poll_s
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001  a registry that is down: try again later
                log.warning("cannot read the champion from %s: %s", self.settings.mlflow_uri, exc)
            self.stopping.wait(self.poll_s)

    def check(self) -> None:
        """One look at the registry: load and swap in a new champion, if there is one."""
        from mnistops.errors import PredictError
        from mnistops.predict import ModelUnreachable
        from mnistops.tracking.champion import champion_of

        version = champion_of(self.settings)
        current = self.holder.current
        if version is None or (current is not None and current.version == str(version.version)):
            return
        number, signature = str(version.version), version.tags.get(SIGNATURE_TAG)
        refused = self.holder.refused.get(number)
        if refused is not None and refused[0] == signature:
            return
        began = time.monotonic()
        try:
            served = load_served(self.settings, version)
        except ModelUnreachable as exc:
            log.warning(
                "champion v%s cannot be fetched now, tried again soon: %s", version.version, exc
            )
            return
        except PredictError as exc:
            self.holder.refused[number] = (signature, str(exc))
            log.error(
                "champion v%s refused, %s keeps serving: %s",
                version.version,
                f"v{current.version}" if current else "nothing",
                exc,
            )
            return
        self.holder.refused.pop(number, None)
        self.holder.current = served
        self.holder.swaps += 1
        log.warning(
            "now serving %s v%s (was %s), loaded in %.1f s",
            served.name,
            served.version,
            f"v{current.version}" if current else "none",
            time.monotonic() - began,
        )
