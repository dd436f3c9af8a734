"""Addresses: this host's, the ones other machines can reach, loopback, and the
database URL's form."""

from __future__ import annotations

import re

WILDCARDS = ("0.0.0.0", "::", "")
"""bind addresses that mean: every interface of this host"""


def primary_address() -> str:
    """This host's address on the network its default route leads to; else the first
    address of an interface that is up; else 127.0.0.1. Finding the route sends nothing
    (a UDP socket's connect only picks the source address)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            return str(probe.getsockname()[0])
    except OSError:
        pass
    import psutil

    stats = psutil.net_if_stats()
    for name, addresses in psutil.net_if_addrs().items():
        if not (name in stats and stats[name].isup):
            continue
        for address in addresses:
            if address.family == socket.AF_INET and not is_loopback(address.address):
                return str(address.address)
    return "127.0.0.1"


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def check_reachable_host(value: str) -> None:
    """A host name or an IP address other machines can connect to; ValueError if not."""
    import ipaddress

    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        value = value.removesuffix(".")  # a fully qualified name may end with a dot
        last_label = value.rsplit(".", 1)[-1]
        if len(value) > 253 or not _HOST_NAME.fullmatch(value) or last_label.isdigit():
            raise ValueError(
                "must be a host name or an IP address, without scheme or port"
                " (e.g. stack.example.com or 10.0.0.5)"
            ) from None
        return
    if getattr(address, "scope_id", None):
        raise ValueError("an IPv6 address with a zone (%...) is of one link only: give another")
    mapped = getattr(address, "ipv4_mapped", None)
    if address.is_unspecified or (mapped is not None and mapped.is_unspecified):
        raise ValueError(
            f"{value} is where to listen (bind), not an address to reach: give this host's"
            " name or address"
        )


def url_host(host: str) -> str:
    """`host` as it goes into a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


POSTGRES_ONLY = "must start with postgresql:// (only PostgreSQL is supported)"


def _is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))
