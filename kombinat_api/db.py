"""Engine creation and programmatic migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from psycopg import AsyncConnection, Cursor
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(database_url: str, pool_size: int = 8, max_overflow: int = 4) -> Engine:
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        # No pre-ping: it would add a round trip to every checkout (two per request); connections that
        # died are recycled instead and a request that meets one fails once, cleanly.
        pool_pre_ping=False,
        pool_recycle=1800,
        # The whole server speaks short explicit transactions; psycopg prepares statements that a pooled
        # connection runs repeatedly (the claim and submit CTEs), which saves their planning time.
        connect_args={"prepare_threshold": 3},
    )


def libpq_url(database_url: str) -> str:
    """SQLAlchemy's ``postgresql+psycopg://`` URL as a plain libpq connection URI."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def open_async_pool(database_url: str, size: int = 8, max_overflow: int = 4) -> AsyncConnectionPool[Any]:
    """The pool of the hot endpoints (claim, submit): async connections in autocommit mode.

    Each of those requests is one statement that authenticates the caller and does the work, so autocommit
    makes it one round trip with no BEGIN/COMMIT, and the event loop never hands the request to a thread.
    Statements are prepared per connection after a few uses, as in ``make_engine``.
    """
    pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        libpq_url(database_url),
        min_size=max(1, size),
        max_size=max(1, size) + max(0, max_overflow),
        kwargs={"autocommit": True, "prepare_threshold": 3},
        open=False,
        name="kombinat-hot",
    )
    await pool.open(wait=True, timeout=30.0)
    return pool


@contextmanager
def transaction(engine: Engine) -> Iterator[Cursor[Any]]:
    """A psycopg cursor on a pooled connection, committed on success and rolled back on error.

    The request path (auth, claim, submit, release) uses this instead of SQLAlchemy's Connection/Result
    layer, which cost more CPU than the statements it wrapped.
    """
    pooled = engine.raw_connection()
    try:
        conn = pooled.driver_connection
        assert conn is not None
        cur = conn.cursor()
        try:
            yield cur
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            cur.close()
    finally:
        pooled.close()


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation treats '%' specially.
    cfg.set_main_option(
        "sqlalchemy.url", make_url(database_url).render_as_string(hide_password=False).replace("%", "%%")
    )
    return cfg


def migrate(database_url: str, revision: str = "head") -> None:
    """Bring the database schema to ``revision``; the only way kombinat's schema is ever created."""
    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
