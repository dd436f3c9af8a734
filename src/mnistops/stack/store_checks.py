"""The object store's part of `stack up`: it refuses requests without credentials, its
buckets exist and are closed, and its objects read back before `up` says it is ready."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from mnistops.clients import s3_client
from mnistops.credentials import S3Keys
from mnistops.settings import Settings
from mnistops.stack import process
from mnistops.stack.state import Report, StackError, run_dir


def check_store_locked(settings: Settings) -> None:
    """The store we started must refuse every request without credentials: an S3
    request without keys, plain (non-TLS) gRPC on any of its ports, and the HTTP data
    endpoints of its master and filer. A configuration that leaves one open (an
    identities file with an anonymous identity, a security file SeaweedFS read
    differently) stops the start."""
    from mnistops.stack.store_security import grpc_open_without_tls, http_data_paths_open

    s3 = settings.s3
    off = s3.grpc_offset
    grpc = [("127.0.0.1", p + off) for p in (s3.master_port, s3.volume_port, s3.filer_port)]
    grpc.append((settings.client_host, s3.port + off))
    opened = [
        f"gRPC port {port} answers without a client certificate"
        for host, port in grpc
        if grpc_open_without_tls(host, port)
    ]
    opened += http_data_paths_open("127.0.0.1", s3.master_port, s3.filer_port)
    if opened:
        raise StackError(
            "the object store answered requests without credentials:\n  "
            + "\n  ".join(opened)
            + f"\nIt was stopped. Its security settings are in {settings.home / 's3-security'};"
            " delete that folder to have them made again at the next `mnistops stack up`."
        )
    check_anonymous_refused(settings)


def check_anonymous_refused(settings: Settings) -> None:
    """The store must refuse an S3 request without keys: an identities file that opens
    it (or one SeaweedFS read differently) stops the start."""
    try:
        anonymous_client(settings).list_buckets()
    except ClientError:
        return
    raise StackError(
        f"the object store at {settings.s3_endpoint} answered a request without keys:"
        f" its identities file ({settings.home / 's3-identities.json'}) leaves it open."
        " It was stopped; nothing was exposed for longer than this check."
    )


PUBLIC_GRANTEES = ("AllUsers", "AuthenticatedUsers")


def close_buckets(settings: Settings, keys: S3Keys | None, report: Report) -> None:
    """Whoever holds the keys can open a bucket to anyone (a bucket policy, a public ACL).
    Every `up` closes every bucket of our store again, says so, and then checks that a
    request without keys reads and lists nothing; if one still does, the store stops."""
    client = s3_client(settings, keys)
    names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    for name in names:
        try:
            client.get_bucket_policy(Bucket=name)
            client.delete_bucket_policy(Bucket=name)
            report(f"removed the bucket policy of '{name}' (it may have opened it to anyone)")
        except ClientError:
            pass
        try:
            grants = client.get_bucket_acl(Bucket=name).get("Grants", [])
        except ClientError:
            grants = []
        if any(str(g.get("Grantee", {}).get("URI", "")).endswith(PUBLIC_GRANTEES) for g in grants):
            client.put_bucket_acl(Bucket=name, ACL="private")
            report(f"made bucket '{name}' private again (its ACL let anyone in)")
    anonymous = anonymous_client(settings)
    opened = []
    for name in names:
        try:
            anonymous.list_objects_v2(Bucket=name, MaxKeys=1)
            opened.append(name)
        except ClientError:
            continue
    if opened:
        record = process.read_record(run_dir(settings), "s3")
        if record is not None:
            process.stop(record, run_dir(settings))
        raise StackError(
            f"bucket(s) {', '.join(opened)} of the object store answer requests without keys"
            " even after their policy and ACL were reset; the store was stopped"
        )


def anonymous_client(settings: Settings) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name=settings.s3.region,
        config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}),
    )


def ensure_buckets(settings: Settings, keys: S3Keys | None) -> None:
    client = s3_client(settings, keys)
    for bucket in settings.s3.buckets.model_dump().values():
        try:
            client.head_bucket(Bucket=bucket)
            continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise StackError(f"S3 bucket '{bucket}' at {settings.s3_endpoint}: {exc}") from None
        except BotoCoreError as exc:
            raise StackError(
                f"the object store at {settings.s3_endpoint} cannot be reached"
                f" ({exc.__class__.__name__}): start it, or correct"
                f" {settings.where('s3.endpoint_url')}"
            ) from None
        try:
            client.create_bucket(Bucket=bucket)
            client.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StackError(
                f"cannot create S3 bucket '{bucket}' at {settings.s3_endpoint}: {exc}"
            ) from None


def wait_objects_readable(
    settings: Settings, keys: S3Keys | None, report: Report, timeout_s: float = 60.0
) -> None:
    """After a restart SeaweedFS answers health checks before it has loaded the volumes
    that hold existing objects (reads fail with InternalError for a few seconds). Wait
    until its volume server has loaded every volume on disk and one stored object of
    every bucket reads back, so `up` means usable."""
    deadline = time.monotonic() + timeout_s
    wait_volumes_loaded(settings, deadline, report)
    client = s3_client(settings, keys)
    pending: list[str] | None = None
    while pending is None or pending:
        try:
            if pending is None:
                pending = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                continue
            bucket = pending[0]
            listing = client.list_objects_v2(Bucket=bucket, MaxKeys=1)
            for item in listing.get("Contents", []):
                client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            pending.pop(0)
        except (ClientError, BotoCoreError) as exc:
            if time.monotonic() > deadline:
                raise StackError(
                    f"the object store at {settings.s3_endpoint} is up but cannot read its"
                    f" objects after {timeout_s:.0f} s: {exc}"
                ) from None
            report("waiting for the object store to load its buckets")
            time.sleep(0.5)


def wait_volumes_loaded(settings: Settings, deadline: float, report: Report) -> None:
    """Until the volume server lists as many volumes as there are on disk."""
    import httpx

    on_disk = len(list((settings.home / "s3").glob("*.dat")))
    url = f"http://127.0.0.1:{settings.s3.volume_port}/status"
    while time.monotonic() < deadline:
        try:
            loaded = len(httpx.get(url, timeout=3).json().get("Volumes") or [])
        except (httpx.HTTPError, ValueError):
            loaded = -1
        if loaded >= on_disk:
            return
        report(f"waiting for the object store to load its volumes ({max(loaded, 0)}/{on_disk})")
        time.sleep(0.5)


def remove_store_sockets(settings: Settings) -> None:
    """SeaweedFS leaves its Unix sockets in /tmp (seaweedfs-<component>[-grpc]-<port>.sock)."""
    s3 = settings.s3
    ports = [s3.port, s3.master_port, s3.volume_port, s3.filer_port]
    ports += [p + s3.grpc_offset for p in ports]
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)
