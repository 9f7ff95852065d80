"""Database settings and upkeep: the general pool prepares no statement by default (its statements are rare
and their filters skewed) and does when an operator asks for it; each server process vacuums the hot tables
unless told not to; the reputation refresh reads a contributor's labels through its batches rather than
scanning every label."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from fastapi.testclient import TestClient
from psycopg import Connection as PgConnection
from sqlalchemy import Engine

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
