"""Without the S3 keys nothing reaches an object: every other port of SeaweedFS (master,
volume and filer, HTTP and gRPC, TCP and the Unix sockets it makes) refuses to read,
list, write or delete, in every bucket. Probed as a local attacker would."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from mnistops.clients import s3_client
from mnistops.settings import Settings
from mnistops.stack.store_security import HTTP2_PREFACE, grpc_open_without_tls, security_dir

pytestmark = [pytest.mark.integration, pytest.mark.security]

BODY = b"the real object"


def grpc_answers(host: str | None, port: int | str, cert: tuple[Path, Path] | None) -> bool:
    """True if a TLS client (with `cert`, or none) gets an HTTP/2 SETTINGS frame back from
    the gRPC port (a TCP port, or a Unix socket path with host None)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if cert:
        context.load_cert_chain(*cert)
    family = socket.AF_UNIX if host is None else socket.AF_INET
    try:
        with socket.socket(family) as raw:
            raw.settimeout(5)
            raw.connect(port if host is None else (host, port))
            with context.wrap_socket(raw) as conn:
                conn.sendall(HTTP2_PREFACE)
                answer = conn.recv(9)
    except (OSError, ssl.SSLError):
        return False
    return len(answer) == 9 and answer[3] == 0x04


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate with the stack's common name, not signed by its CA."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seaweedfs-node")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "evil.crt", folder / "evil.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def grpc_endpoints(settings: Settings) -> list[tuple[str | None, int | str]]:
    s3, off = settings.s3, settings.s3.grpc_offset
    tcp = [(settings.client_host, s3.port + off)] + [
        ("127.0.0.1", p + off) for p in (s3.master_port, s3.volume_port, s3.filer_port)
    ]
    names = {"master": s3.master_port, "volume": s3.volume_port, "filer": s3.filer_port}
    names["s3"] = s3.port
    sockets = [f"/tmp/seaweedfs-{n}-grpc-{p + off}.sock" for n, p in names.items()]
    return tcp + [(None, path) for path in sockets if Path(path).exists()]


def test_every_grpc_port_wants_the_stacks_client_certificate(
    stack_settings: Settings, tmp_path: Path
) -> None:
    endpoints = grpc_endpoints(stack_settings)
    assert len(endpoints) >= 4
    folder = security_dir(stack_settings.home)
    ours = (folder / "node.crt", folder / "node.key")
    strangers = {"no certificate": None, "a self-signed one": self_signed(tmp_path)}
    for host, port in endpoints:
        if host is not None:
            assert not grpc_open_without_tls(host, port), f"plain gRPC on {port}"
        for who, cert in strangers.items():
            assert not grpc_answers(host, port, cert), f"{host}:{port} let in {who}"
    # the probe does reach a gRPC server: with the stack's own certificate it answers
    tcp = [(h, p) for h, p in endpoints if h is not None]
    assert all(grpc_answers(h, p, ours) for h, p in tcp)


def test_no_http_port_reads_lists_writes_or_deletes(stack_settings: Settings) -> None:
    s3 = stack_settings.s3
    client = s3_client(stack_settings)
    buckets = list(s3.buckets.model_dump().values())
    for bucket in buckets:
        client.put_object(Bucket=bucket, Key="probe/object", Body=BODY)
    master = f"http://127.0.0.1:{s3.master_port}"
    volume = f"http://127.0.0.1:{s3.volume_port}"
    filer = f"http://127.0.0.1:{s3.filer_port}"
    probes: list[tuple[str, str, str]] = [
        ("GET", master, "/dir/assign"),
        ("POST", master, "/dir/assign"),
        ("POST", master, "/submit"),
        ("GET", master, "/dir/lookup?volumeId=1&read=yes"),
        ("GET", master, "/dir/lookup?fileId=1,0100000000&read=yes"),
        ("GET", master, "/vol/status"),
        ("GET", master, "/1,0100000000"),
        ("GET", volume, "/1,0100000000"),
        ("POST", volume, "/1,0100000000"),
        ("DELETE", volume, "/1,0100000000"),
        ("GET", volume, "/ui/index.html"),
    ]
    for bucket in buckets:
        probes += [
            ("GET", master, f"/col/delete?collection={bucket}"),
            ("GET", filer, f"/buckets/{bucket}/probe/object"),
            ("GET", filer, f"/buckets/{bucket}/"),
            ("PUT", filer, f"/buckets/{bucket}/probe/evil"),
            ("POST", filer, f"/buckets/{bucket}/probe/evil"),
            ("DELETE", filer, f"/buckets/{bucket}/probe/object"),
            ("DELETE", filer, f"/buckets/{bucket}?recursive=true"),
        ]
    socket_path = Path(f"/tmp/seaweedfs-filer-{s3.filer_port}.sock")
    clients = [("tcp", httpx.Client(timeout=10))]
    if socket_path.exists():
        transport = httpx.HTTPTransport(uds=str(socket_path))
        clients.append(("unix socket", httpx.Client(transport=transport, timeout=10)))
    answered = []
    for how, http in clients:
        with http:
            for method, base, path in probes:
                if how != "tcp" and base != filer:
                    continue
                reply = http.request(method, base + path, content=b"evil")
                if reply.status_code < 300 or BODY in reply.content:
                    answered.append(f"{how} {method} {base}{path}: {reply.status_code}")
    assert answered == [], answered
    for bucket in buckets:
        keys = [
            o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="probe/")["Contents"]
        ]
        assert keys == ["probe/object"], (bucket, keys)
        assert client.get_object(Bucket=bucket, Key="probe/object")["Body"].read() == BODY
        client.delete_object(Bucket=bucket, Key="probe/object")


def test_up_closes_a_bucket_someone_with_the_keys_opened(stack_settings: Settings) -> None:
    """With the keys one can open a bucket to anyone (a policy, a public ACL): the next
    `up` closes every bucket again and says so; then nothing answers without keys."""
    import json
    import uuid

    from botocore.exceptions import ClientError

    from mnistops import stack
    from mnistops.stack.store_checks import anonymous_client as _anonymous_client

    client = s3_client(stack_settings)
    by_policy, by_acl = f"open-{uuid.uuid4().hex[:6]}", f"acl-{uuid.uuid4().hex[:6]}"
    for bucket in (by_policy, by_acl):
        client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key="secret", Body=BODY)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{by_policy}", f"arn:aws:s3:::{by_policy}/*"],
            }
        ],
    }
    client.put_bucket_policy(Bucket=by_policy, Policy=json.dumps(policy))
    client.put_bucket_acl(Bucket=by_acl, ACL="public-read")
    anonymous = _anonymous_client(stack_settings)
    opened = []
    for bucket in (by_policy, by_acl):
        try:
            anonymous.get_object(Bucket=bucket, Key="secret")
            opened.append(bucket)
        except ClientError:
            pass
    assert opened, "the attack does open a bucket (else this test proves nothing)"
    messages: list[str] = []
    stack.up(stack_settings, report=messages.append)
    assert any(f"bucket policy of '{by_policy}'" in m for m in messages) or by_policy not in opened
    for bucket in (by_policy, by_acl):
        for call in (
            lambda b=bucket: anonymous.get_object(Bucket=b, Key="secret"),
            lambda b=bucket: anonymous.list_objects_v2(Bucket=b),
        ):
            with pytest.raises(ClientError):
                call()
        assert client.get_object(Bucket=bucket, Key="secret")["Body"].read() == BODY
