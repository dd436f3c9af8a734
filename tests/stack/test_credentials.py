import json
import stat
from pathlib import Path

import pytest

from mnistops.credentials import ensure_keys, keys_path, seaweed_identities

pytestmark = pytest.mark.unit


def test_keys_are_generated_once_and_private(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path)
    assert len(keys.access_key_id) >= 32 and len(keys.secret_access_key) >= 32
    mode = stat.S_IMODE(keys_path(tmp_path).stat().st_mode)
    assert mode == 0o600
    assert ensure_keys(tmp_path) == keys, "a second call reuses the stored keys"
    assert ensure_keys(tmp_path / "other") != keys, "another state dir gets other keys"


def test_identities_have_no_anonymous_access(tmp_path: Path) -> None:
    identities = json.loads(seaweed_identities(ensure_keys(tmp_path)))["identities"]
    assert [i["name"] for i in identities] == ["mnistops"]
