"""PostgreSQL as the database of MLflow and Prefect: one database each, created if missing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mnistops.errors import MnistopsError
from mnistops.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import URL


class DatabaseError(MnistopsError):
    pass


def _server_url(settings: Settings) -> URL:
    from sqlalchemy.engine import make_url

    assert settings.database_url is not None
    url = make_url(settings.database_url.get_secret_value())
    return url.set(drivername="postgresql")


def database_name(settings: Settings, service: str) -> str:
    return f"{settings.database_prefix}_{service}"


def service_url(settings: Settings, service: str, driver: str) -> str:
    """Full URL (with password) of the service's database, for the given SQLAlchemy driver."""
    url = _server_url(settings).set(
        drivername=f"postgresql+{driver}", database=database_name(settings, service)
    )
    return url.render_as_string(hide_password=False)


def ensure_databases(settings: Settings, services: list[str]) -> None:
    import psycopg2
    from psycopg2 import sql

    url = _server_url(settings)
    try:
        conn = psycopg2.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database or "postgres",
            connect_timeout=10,
        )
    except psycopg2.Error as exc:
        safe = url.render_as_string(hide_password=True)
        raise DatabaseError(f"cannot connect to PostgreSQL at {safe}: {exc}".strip()) from None
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for service in services:
                name = database_name(settings, service)
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg2.Error as exc:
        raise DatabaseError(f"cannot create the databases on PostgreSQL: {exc}") from None
    finally:
        conn.close()
