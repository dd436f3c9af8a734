"""SeaweedFS locked down so that its S3 API, with a key, is the only way to the objects.

Without this, its master, volume and filer ports (HTTP and gRPC, and the gRPC Unix
sockets it makes in /tmp) read, write and delete any object for anyone on the machine,
S3 keys or not: the master hands out write and read tokens to whoever asks. Three
things close them, each checked by the tests against every port:

- mutual TLS on every gRPC port: only a certificate signed by the stack's own CA
  (generated here, its key thrown away once the certificate is signed) is accepted;
- the four JWT signing keys (volume writes and reads, filer writes and reads);
- `-disableHttp`: the master's and filer's HTTP data endpoints answer 404.

What stays open without credentials is status only: the master's status page and
`/cluster/status`, the volume server's `/status` (volume ids, disk use), never an object.
The secrets live in `<home>/s3-security/` (0700, files 0600), made at the first start;
weed reads them through its `-config_dir` flag.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from pathlib import Path

from mnistops.credentials import CredentialsError, write_private

NODE_NAME = "seaweedfs-node"
COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker")
JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")


def security_dir(home: Path) -> Path:
    return home / "s3-security"


def _certificates() -> tuple[bytes, bytes, bytes]:
    """(CA certificate, node certificate, node key) in PEM; the CA key is not kept."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mnistops-store-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_NAME)]))
        .issuer_name(ca_name)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = node_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), node.public_bytes(pem), key_pem


def _security_toml(folder: Path, jwt_keys: dict[str, str]) -> str:
    lines = []
    for section in JWT_SECTIONS:
        lines += [f"[{section}]", f'key = "{jwt_keys[section]}"', "expires_after_seconds = 10"]
    lines += ["[access]", "ui = false", "[filer.expose_directory_metadata]", "enabled = false"]
    lines += ["[grpc]", f'ca = "{folder / "ca.crt"}"']
    for component in COMPONENTS:
        lines += [
            f"[grpc.{component}]",
            f'cert = "{folder / "node.crt"}"',
            f'key = "{folder / "node.key"}"',
            f'allowed_commonNames = "{NODE_NAME}"',
        ]
    lines += ["[grpc.client]", f'cert = "{folder / "node.crt"}"', f'key = "{folder / "node.key"}"']
    return "\n".join(lines) + "\n"


def _jwt_keys(folder: Path) -> dict[str, str]:
    path = folder / "jwt-keys.json"
    if not path.is_file():
        keys = {section: secrets.token_hex(32) for section in JWT_SECTIONS}
        write_private(path, json.dumps(keys, indent=2))
        return keys
    try:
        keys = json.loads(path.read_text())
        if not isinstance(keys, dict) or set(keys) != set(JWT_SECTIONS):
            raise ValueError("a key is missing")
        if any(not isinstance(v, str) or len(v) < 32 for v in keys.values()):
            raise ValueError("a key is too short")
    except ValueError as exc:
        raise CredentialsError(
            f"the object store's key file {path} is damaged ({exc}). Delete the folder"
            f" {folder} to have new secrets generated at the next `mnistops stack up`."
        ) from None
    return keys


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def grpc_open_without_tls(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """True if the port speaks plain gRPC (HTTP/2 without TLS): it answers our client
    preface with a SETTINGS frame. A TLS-only port answers with an alert or closes."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.sendall(HTTP2_PREFACE)
            answer = conn.recv(9)
    except OSError:
        return False
    return len(answer) == 9 and answer[3] == 0x04


def http_data_paths_open(host: str, master_port: int, filer_port: int) -> list[str]:
    """The SeaweedFS HTTP endpoints that still hand out objects or write tokens (none
    once -disableHttp and the JWT keys are in force)."""
    import httpx

    probes = {
        f"http://{host}:{master_port}/dir/assign": "the master hands out file ids",
        f"http://{host}:{filer_port}/buckets/": "the filer lists the buckets",
    }
    found = []
    for url, what in probes.items():
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                found.append(f"{url}: {what}")
        except httpx.HTTPError:
            continue
    return found


def ensure_store_security(home: Path) -> Path:
    """The folder weed reads `security.toml` from, with every secret made if missing."""
    folder = security_dir(home)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    certificates = [folder / name for name in ("ca.crt", "node.crt", "node.key")]
    if not all(path.is_file() for path in certificates):
        for path, pem in zip(certificates, _certificates(), strict=True):
            write_private(path, pem.decode())
    write_private(folder / "security.toml", _security_toml(folder, _jwt_keys(folder)))
    return folder
