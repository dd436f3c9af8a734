"""What every settings section shares: the error, the base model, ports and URLs
checked, and how a key is named as an environment variable."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
)

from mnistops.errors import BadInput

ENV_PREFIX = "MNISTOPS_"
ENV_NESTED = "__"
CONFIG_FILES = ("stack.yml", "dataset.yml", "hyp.yml", "flow.yml")


class ConfigError(BadInput):
    """A setting is wrong; the message names the file (or variable) and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


Port = int
Device = Literal["auto", "cpu", "cuda"]
"""where training runs: `auto` is CUDA when there is one"""


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be a TCP port between 1 and 65535")
    return value


def _web_url(value: str | None) -> str | None:
    """An http(s) URL with a host and, if any, a numeric port."""
    if value is not None and _checked_url(value).scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL, e.g. http://host:9000")
    return value


def _any_url(value: str | None) -> str | None:
    """A URL; an http(s) one must have a host and, if any, a numeric port."""
    if value is not None:
        _checked_url(value)
    return value


def _checked_url(value: str) -> Any:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc}), e.g. http://host:5000") from None
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise ValueError("names no host, e.g. http://host:5000")
    return parts


def env_var_for(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + ENV_NESTED.join(str(part).upper() for part in loc)
