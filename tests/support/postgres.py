"""Throwaway databases on the local PostgreSQL (127.0.0.1:5432, trust auth, user postgres).

Each database gets a unique name and is dropped at the end; nothing touches any other database, so
several test sessions can run side by side on one server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

PG_HOST = os.environ.get("PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PGPORT", "5432"))
PG_USER = os.environ.get("PGUSER", "postgres")


def admin_dsn(dbname: str = "postgres") -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def sqlalchemy_url(dbname: str) -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def create_database(prefix: str = "kombinat_test") -> str:
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        # WITH (FORCE) ends leftover connections of this database only (a crashed server subprocess).
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def migrate_database(url: str) -> None:
    from kombinat_api.db import migrate as run_migrations

    run_migrations(url)


@contextmanager
def fresh_database(prefix: str = "kombinat_test", migrate: bool = True) -> Iterator[str]:
    """Yield the SQLAlchemy URL of a new, migrated database; drop it on exit."""
    name = create_database(prefix)
    url = sqlalchemy_url(name)
    try:
        if migrate:
            migrate_database(url)
        yield url
    finally:
        drop_database(name)
