"""Moving `champion` by hand: `models promote` and `models rollback`, under the same
lock as the gate, after the version's model loaded the one checked way. Each move is
recorded on the version (who, when, why, the champion it replaced)."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mnistops.clients import mlflow_client, model_signing_key
from mnistops.errors import BadInput
from mnistops.settings import Settings
from mnistops.tracking.contract import (
    CHAMPION,
    CHAMPION_REASON_TAG,
    PREVIOUS_TAG,
    PROMOTED_AT_TAG,
    PROMOTED_BY_TAG,
    PROMOTED_REASON_TAG,
)
from mnistops.tracking.model_record import ModelRefused, record_problem
from mnistops.tracking.registry import Lock, champion, versions


class PromotionRefused(BadInput):
    """`models promote` or `rollback` cannot move the alias; the message says why."""


@dataclass(frozen=True)
class Promotion:
    version: str
    previous: str | None
    reason: str
    signed_only: bool = False
    """the version was champion already, unsigned: its files were signed, nothing moved"""


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    reason: str,
    user: str,
    lock: Lock,
    key: bytes | None,
    rollback: bool = False,
    trust_unsigned: bool = False,
) -> Promotion:
    """Move `champion` to `version` by hand, holding the gate's lock. Refused when the
    version does not exist, is champion already, or its model cannot be loaded (it is
    downloaded and loaded the one checked way first). `trust_unsigned` signs the files of
    a version registered without mnistops' record, if they are in mnistops' format. The
    version's tags record who, when and why (`promoted_*`), and the champion it replaced
    (`previous_champion`). A `rollback` keeps the target's own `previous_champion`, so
    the next rollback goes further back; no promotion overwrites a gate's reason."""
    import datetime as dt

    with lock():
        try:
            target = client.get_model_version(name, version)
        except MlflowException:
            known = ", ".join(v.version for v in versions(client, name)) or "none"
            raise PromotionRefused(
                f"{name} has no version {version} (registered: {known})"
            ) from None
        current = champion(client, name)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        already = current is not None and current.version == target.version
        if already:
            unsigned = record_problem(target.tags or {}, key, str(target.source)) is not None
            if not (trust_unsigned and unsigned):
                hint = ", without mnistops' signed record: add --trust-unsigned"
                raise PromotionRefused(
                    f"{name} v{version} is champion already" + (hint if unsigned else "")
                )
            why = f"its files signed for {user} (the alias was moved outside mnistops): {reason}"
        else:
            why = f"promoted by {user}: {reason}"
        _check_loads(client, target, key, f"{user} at {now}" if trust_unsigned else None)
        tags = {PROMOTED_BY_TAG: user, PROMOTED_AT_TAG: now, PROMOTED_REASON_TAG: why}
        if CHAMPION_REASON_TAG not in (target.tags or {}):
            tags[CHAMPION_REASON_TAG] = why
        if not rollback and not already:
            tags[PREVIOUS_TAG] = current.version if current is not None else ""
        for tag, value in tags.items():
            client.set_model_version_tag(name, target.version, tag, value)
        if not already:
            client.set_registered_model_alias(name, CHAMPION, target.version)
    previous = None if already or current is None else current.version
    return Promotion(target.version, previous, why, signed_only=already)


def _check_loads(
    client: MlflowClient, target: ModelVersion, key: bytes | None, trusted_by: str | None
) -> None:
    """PromotionRefused unless the version loads the one checked way, as the service will
    load it; `trusted_by` first signs a version that has no valid record (a person
    vouches for its files)."""
    from mnistops.tracking import model_fetch, model_files, model_record

    label = f"{target.name} v{target.version}"
    try:
        source = str(target.source)
        if trusted_by is not None and record_problem(target.tags or {}, key, source) is not None:
            if key is None:
                raise ModelRefused(model_record.no_key_message("settings"))
            model_fetch.trust(client, target, key, trusted_by)
            target = client.get_model_version(target.name, target.version)
        model_fetch.load_registered(client, target, key, for_answers=True)
    except ModelRefused as exc:
        raise PromotionRefused(f"{label} cannot be served: {exc}") from None
    except model_files.ModelUnavailable as exc:
        raise PromotionRefused(f"{label} could not be downloaded to check it: {exc}") from None


def previous_champion(client: MlflowClient, name: str) -> tuple[str, str]:
    """(the champion, the version it replaced): what `rollback` goes back to."""
    current = champion(client, name)
    if current is None:
        raise PromotionRefused(f"{name} has no champion: nothing to roll back")
    previous = (current.tags or {}).get(PREVIOUS_TAG)
    if not previous:
        raise PromotionRefused(
            f"{name} v{current.version} replaced no recorded champion: promote a version"
            " by hand (`mnistops models promote VERSION`)"
        )
    return current.version, previous


def _user(settings: Settings) -> str:
    import getpass

    return settings.developer_name or getpass.getuser()


def promote_champion(
    settings: Settings,
    version: str,
    reason: str,
    rollback: bool = False,
    trust_unsigned: bool = False,
) -> Promotion:
    """`promote` on the settings' registry, holding the stack-wide gate lock."""
    from mnistops.stack.locks import champion_lock_name, held
    from mnistops.tracking.server import check_tracking_server

    check_tracking_server(settings)
    name = settings.model_registry.name
    return promote(
        mlflow_client(settings),
        name,
        version,
        reason,
        _user(settings),
        lambda: held(settings, champion_lock_name(name)),
        model_signing_key(settings),
        rollback,
        trust_unsigned,
    )


def roll_back_champion(settings: Settings, reason: str) -> Promotion:
    """Back to the champion the current one replaced."""
    from mnistops.tracking.server import check_tracking_server

    check_tracking_server(settings)
    current, previous = previous_champion(mlflow_client(settings), settings.model_registry.name)
    return promote_champion(
        settings, previous, f"rollback from v{current}: {reason}", rollback=True
    )
