"""The MLflow contract: every name in `tracking/contract.py` is documented in
docs/mlflow.md, and no module spells one of the promised tag names itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mnistops.tracking import contract

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def promised() -> dict[str, str]:
    names: dict[str, str] = {}
    for attribute, value in vars(contract).items():
        if attribute.isupper():
            values = value if isinstance(value, tuple) else (value,)
            for one in values:
                names[f"{attribute}={one}"] = one
    return names


def test_every_name_is_documented() -> None:
    page = (ROOT / "docs" / "mlflow.md").read_text()
    missing = [key for key, value in promised().items() if f"`{value}`" not in page]
    assert not missing, f"not in docs/mlflow.md: {missing}"


def test_no_module_reads_or_writes_a_tag_by_its_string() -> None:
    """Tags are read (`tags["x"]`, `tags.get("x")`) and written (`set_tag(..., "x", ...)`)
    through contract's names only."""
    literal = r"[\"']([a-z_.]+)[\"']"
    uses = re.compile(
        rf"tags\s*(?:\.get\(|\[)\s*{literal}|set_(?:model_version_)?tag\([^)]*?,\s*{literal}"
    )
    promised_tags = {
        v for k, v in promised().items() if k.split("=")[0].endswith(("_TAG", "_TAGS"))
    }
    as_key = re.compile(r"[\"']([a-z_.]+)[\"']\s*:")
    spelled = []
    for path in sorted((ROOT / "src" / "mnistops").rglob("*.py")):
        if path.name == "contract.py":
            continue
        text = path.read_text()
        for match in uses.finditer(text):
            spelled.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
        if path.parent.name == "tracking":  # dict keys there are MLflow tags and metrics
            for match in as_key.finditer(text):
                if match.group(1) in promised_tags:
                    spelled.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert not spelled, f"use tracking.contract's names instead: {spelled}"
