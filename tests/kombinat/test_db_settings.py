"""Database settings and upkeep: the general pool prepares no statement by default (its statements are rare
and their filters skewed) and does when an operator asks for it; each server process vacuums the hot tables
unless told not to; the reputation refresh reads a contributor's labels through its batches rather than
scanning every label."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from psycopg import Connection as PgConnection
from sqlalchemy import Engine

from kombinat_api import queue as kq
from kombinat_api import trust, upkeep
from kombinat_api.db import make_engine
from kombinat_api.main import create_app
from kombinat_api.settings import Settings
from tests.kombinat.conftest import make_settings
from tests.support.fake_github import FakeGitHub


@pytest.mark.parametrize(("env", "expected"), [(None, None), ("none", None), ("3", 3), ("0", 0)])
def test_prepare_threshold_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: int | None
) -> None:
    if env is None:
        monkeypatch.delenv("KOMBINAT_DB_PREPARE_THRESHOLD", raising=False)
    else:
        monkeypatch.setenv("KOMBINAT_DB_PREPARE_THRESHOLD", env)
    assert Settings().db_prepare_threshold == expected


def test_a_bad_prepare_threshold_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOMBINAT_DB_PREPARE_THRESHOLD", "sometimes")
    with pytest.raises(ValueError, match="db_prepare_threshold"):
        Settings()


@pytest.mark.parametrize("threshold", [None, 1])
def test_pooled_connections_prepare_as_configured(database_url: str, threshold: int | None) -> None:
    engine = make_engine(database_url, 1, 0, threshold)
    try:
        pooled = engine.raw_connection()
        try:
            conn = pooled.driver_connection
            assert isinstance(conn, PgConnection)
            assert conn.prepare_threshold == threshold
            for _ in range(3):
                conn.execute("SELECT count(*) FROM pair WHERE state = %s", ["queued"]).fetchone()
            prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
            assert prepared is not None
            assert (prepared[0] > 0) == (threshold is not None)
            conn.rollback()
        finally:
            pooled.close()
    finally:
        engine.dispose()


def test_reputation_refresh_reaches_labels_through_the_contributors_batches(database_url: str) -> None:
    engine = make_engine(database_url, 1, 0)
    try:
        with engine.connect() as conn:
            plan = "\n".join(
                row[0]
                for row in conn.exec_driver_sql(
                    "EXPLAIN " + trust.STATS_SQL.replace("%(cid)s", "1").replace("%(window)s", "50")
                ).all()
            )
    finally:
        engine.dispose()
    # label is read per batch (an index condition or, on a tiny table, a per-batch filter), never hashed whole
    assert "(batch_id = batch.batch_id)" in plan, plan


def _vacuum_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT relname, vacuum_count + autovacuum_count FROM pg_stat_user_tables WHERE relname = ANY(%(t)s)",
            {"t": list(upkeep.HOT_TABLES)},
        ).all()
    return {name: int(count) for name, count in rows}


def test_each_server_process_vacuums_the_hot_tables(database_url: str, github: FakeGitHub) -> None:
    engine = make_engine(database_url, 1, 0)
    try:
        before = _vacuum_counts(engine)
        assert set(before) == set(upkeep.HOT_TABLES)
        settings = make_settings(database_url, github, upkeep_interval_s=0.2)
        with TestClient(create_app(settings)):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                after = _vacuum_counts(engine)
                if all(after[t] > before[t] for t in upkeep.HOT_TABLES):
                    break
                time.sleep(0.2)
        assert all(after[t] > before[t] for t in upkeep.HOT_TABLES), (before, after)
        # switched off, nothing runs
        with TestClient(create_app(make_settings(database_url, github, upkeep_interval_s=0))) as client:
            time.sleep(1.0)
            assert client.get("/api/v1/models").status_code == 200
        quiet = _vacuum_counts(engine)
        time.sleep(1.0)
        assert _vacuum_counts(engine) == quiet
    finally:
        engine.dispose()


def test_upkeep_survives_a_database_it_cannot_reach(caplog: pytest.LogCaptureFixture) -> None:
    async def short_run() -> None:
        task = asyncio.create_task(
            upkeep.run_upkeep("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1", 0.05)
        )
        await asyncio.sleep(0.5)
        assert not task.done()  # failures are logged, the loop goes on
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with caplog.at_level("WARNING", logger="kombinat.upkeep"):
        asyncio.run(short_run())
    assert "queue upkeep failed" in caplog.text


def _libpq(database_url: str) -> str:
    from kombinat_api.db import libpq_url

    return libpq_url(database_url)


def test_the_working_set_is_the_queue_pages_read_at_random_and_grows_with_the_queue(
    database_url: str, engine: Engine
) -> None:
    with upkeep.connect(_libpq(database_url)) as conn:
        empty = upkeep.working_set(conn)
        sizes = conn.execute(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c WHERE c.relname IN "
            "('pair', 'pair_content_pkey', 'label_pkey') OR c.oid IN "
            "(SELECT indexrelid FROM pg_index WHERE indrelid = 'pair'::regclass)"
        ).fetchall()
        block = int(conn.execute("SELECT current_setting('block_size')").fetchone()[0])  # type: ignore[index]
        buffers = int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'shared_buffers'").fetchone()[0])  # type: ignore[index]
    assert {"pair", "pair_pkey", "pair_queue", "pair_content_pkey", "label_pkey"} <= {name for name, _ in sizes}
    assert empty.bytes == sum(size for _, size in sizes)
    assert empty.shared_buffers == buffers * block
    with engine.begin() as conn:
        kq.enqueue_pairs(
            conn,
            [
                {"pair_id": str(uuid.uuid4()), "query": f"q{i}", "document": "d" * 200, "split": "ws", "cycle": "c000"}
                for i in range(3000)
            ],
        )
    with upkeep.connect(_libpq(database_url)) as conn:
        grown = upkeep.working_set(conn)
    assert grown.bytes > empty.bytes + 3000 * 16  # at least a key per pair in pair's and pair_content's keys
    assert grown.fits and "fits in shared_buffers" in grown.advice()


def test_the_advice_says_what_to_do_when_the_working_set_outgrows_the_cache() -> None:
    small = upkeep.WorkingSet(bytes=7 << 30, shared_buffers=128 << 20)
    assert not small.fits
    assert small.advice() == (
        "queue working set 7.00 GiB is larger than shared_buffers 0.12 GiB: claims stay fast only while the OS page "
        "cache holds the rest, and slow down several-fold when it must come from disk (after a restart, or with too "
        "little memory); raise shared_buffers above it, with autoprewarm (docs/deploy.md, 'kombinat at depth'), or "
        "enqueue in smaller windows"
    )
    assert upkeep.WorkingSet(bytes=1 << 30, shared_buffers=1 << 30).fits


def test_upkeep_reports_the_working_set_once_not_every_pass(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def run_briefly() -> None:
        task = asyncio.create_task(upkeep.run_upkeep(database_url, 0.1))
        await asyncio.sleep(1.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.DEBUG, logger="kombinat.upkeep"):
        asyncio.run(run_briefly())
    passes = [r for r in caplog.records if r.getMessage().startswith("vacuumed")]
    said = [r for r in caplog.records if r.getMessage().startswith("queue working set")]
    assert len(passes) >= 2, caplog.text
    # the test server's cache holds this small database: said once, as information
    assert [r.levelno for r in said] == [logging.INFO], caplog.text
