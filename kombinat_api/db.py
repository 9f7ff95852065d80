"""Engine creation and programmatic migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from psycopg import AsyncCursor, Cursor
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def compact_sql(sql: str) -> str:
    """The statement without its ``--`` comments and indentation, for statements sent on every request.

    psycopg converts a ``%(name)s`` statement to PostgreSQL's ``$n`` form on every execute, and caches that
    conversion only for statements of at most 4 KiB; the commented claim and submit (5-6 KiB) were converted
    afresh each time, ~5 % of a worker's CPU. A string literal never spans lines in these statements, so a
    line-wise scan that tracks quotes finds every comment."""
    lines = []
    for line in sql.splitlines():
        in_literal = False
        end = len(line)
        for i, ch in enumerate(line):
            if ch == "'":
                in_literal = not in_literal
            elif not in_literal and line.startswith("--", i):
                end = i
                break
        code = line[:end].strip()
        if code:
            lines.append(code)
    return "\n".join(lines) + "\n"


def make_engine(
    database_url: str,
    pool_size: int = 8,
    max_overflow: int = 4,
    prepare_threshold: int | None = None,
) -> Engine:
    """A pooled engine for everything but the request hot path (which has ``make_hot_pool``)."""
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        # No pre-ping: it would add a round trip to every checkout; connections that died are recycled instead
        # and a request that meets one fails once, cleanly.
        pool_pre_ping=False,
        pool_recycle=1800,
        # No server-side prepared statements by default: statements of the admin and public endpoints are rare
        # and varied, and custom plans suit their skewed filters.
        connect_args={"prepare_threshold": prepare_threshold},
    )


@contextmanager
def standalone_transaction(database_url: str) -> Iterator[Connection]:
    """A connection of an engine of its own (one connection, no overflow), in a transaction committed on success
    and rolled back on error; the engine is disposed on the way out.

    For commands and scripts that run a few statements against a database URL and end (the ``kombinat`` CLI,
    the demo): no pool outlives them, so nothing keeps a connection to the server open afterwards."""
    engine = make_engine(database_url, 1, 0)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def hot_connection_kwargs(generic_plans: bool) -> dict[str, Any]:
    """psycopg connection options of the hot path.

    Planning the claim and submit statements cost as much database CPU as running them (3-15 ms a call on 2
    cores under load). Their plans do not depend on the parameter values (key lookups, ordered index scans
    with a limit), so one generic plan per connection serves every call: each statement is prepared on first
    use. The hot path forces that plan per transaction (auth.HOT_RESOLVE_SQL) rather than leaving the choice to
    the plan cache, which after five custom plans may switch to a generic plan of another, slower shape (seen
    with prepare_threshold=3)."""
    return {"prepare_threshold": 0 if generic_plans else None}


def make_hot_pool(
    database_url: str, pool_size: int, max_overflow: int, generic_plans: bool = True
) -> AsyncConnectionPool:
    """The request hot path's pool (claim, submit, release): asyncio connections used on the event loop.

    Not a thread pool's: a request waiting for a connection is a parked coroutine, not a thread holding one of
    the 40 slots of the thread pool that every other (sync) endpoint shares, and no request hops to a thread
    and back. Under bench/queue.py the workers' CPU per label came out the same either way (the thread
    wake-ups it saves, ~9 % of their GIL samples, went to psycopg's async waiting). Not yet open: the caller
    awaits ``open()`` on its own event loop (the lifespan), and the pool connects in the background, so the
    server starts even while the database is still coming up."""
    return AsyncConnectionPool(
        libpq_url(database_url),
        min_size=pool_size,
        max_size=pool_size + max_overflow,
        kwargs=hot_connection_kwargs(generic_plans),
        open=False,
        name="kombinat-hot-path",
    )


@asynccontextmanager
async def async_transaction(pool: AsyncConnectionPool) -> AsyncIterator[AsyncCursor[Any]]:
    """``transaction`` for the hot path's asyncio pool: committed on success, rolled back on error."""
    async with pool.connection() as conn, conn.cursor() as cur:
        yield cur


def libpq_url(database_url: str) -> str:
    """A SQLAlchemy URL as libpq reads it (no '+driver')."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


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
