"""Fixtures for kombinat tests: one fresh migrated database per test session (dropped at the end), a fake
GitHub on loopback, an in-process app (TestClient) and helpers. Tables are emptied before every test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kombinat_api.auth import create_admin_token, issue_token
from kombinat_api.db import make_engine
from kombinat_api.main import create_app
from kombinat_api.settings import Settings
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import TEST_MODEL, bearer, model_info
from tests.support.postgres import fresh_database

TABLES = "label, batch_honeypot, batch, honeypot, pair_content, pair, api_token, rate_bucket, contributor, model"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def github() -> Iterator[FakeGitHub]:
    with FakeGitHub() as gh:
        yield gh


def make_settings(database_url: str, github: FakeGitHub, **overrides: Any) -> Settings:
    return Settings(
        database_url=database_url,
        github_client_id=github.client_id,
        github_oauth_url=github.url,
        github_api_url=github.url,
        db_pool_size=4,
        # upkeep's own test switches it on; elsewhere a VACUUM would only add noise to the statistics tests read
        **{"upkeep_interval_s": 0.0, **overrides},
    )


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, 4, 4)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def client(database_url: str, github: FakeGitHub) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(database_url, github))) as c:
        yield c


@pytest.fixture(autouse=True)
def _clean(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")


@dataclass
class Contributor:
    id: int
    login: str
    token: str
    headers: dict[str, str] = field(default_factory=dict)


class Kombinat:
    """Test helpers around one app instance and its database."""

    def __init__(self, client: TestClient, engine: Engine) -> None:
        self.client = client
        self.engine = engine
        with engine.begin() as conn:
            self.admin_token = create_admin_token(conn, "tests")
        self.admin = bearer(self.admin_token)
        self._n = 0

    def sql(self, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
        with self.engine.begin() as conn:
            result = conn.exec_driver_sql(statement, params or {})
            return list(result.all()) if result.returns_rows else []

    def admit(self, entry: dict[str, Any] | None = None) -> dict[str, Any]:
        entry = entry or TEST_MODEL
        resp = self.client.put("/api/v1/admin/models", json={"models": [entry]}, headers=self.admin)
        assert resp.status_code == 200, resp.text
        return entry

    def contributor(self, login: str | None = None, trusted: bool = False) -> Contributor:
        self._n += 1
        login = login or f"user{self._n}"
        with self.engine.begin() as conn:
            cid = conn.exec_driver_sql(
                "INSERT INTO contributor (github_id, login, trusted) VALUES (%(g)s, %(l)s, %(t)s) RETURNING id",
                {"g": 10_000 + self._n, "l": login, "t": trusted},
            ).scalar_one()
            token = issue_token(conn, cid, False, login)
        return Contributor(cid, login, token, bearer(token))

    def enqueue(self, n: int, split: str = "s1", cycle: str = "c000", start_priority: float = 0.0) -> list[str]:
        pairs = [
            {
                "pair_id": str(uuid.uuid4()),
                "query": f"query {split} {i}",
                "document": f"document {split} {i}",
                "split": split,
                "cycle": cycle,
                "priority": start_priority + n - i,
            }
            for i in range(n)
        ]
        resp = self.client.post("/api/v1/admin/pairs", json={"pairs": pairs}, headers=self.admin)
        assert resp.status_code == 200, resp.text
        return [p["pair_id"] for p in pairs]

    def honeypots(self, n: int) -> dict[str, bool]:
        gold = [
            {
                "pair_id": str(uuid.uuid4()),
                "query": f"gold query {i}",
                "document": f"gold document {i}",
                "relevant": i % 2 == 0,
                "grade": 2 if i % 2 == 0 else 0,
                "source": "test-qrels",
            }
            for i in range(n)
        ]
        resp = self.client.post("/api/v1/admin/honeypots", json={"honeypots": gold}, headers=self.admin)
        assert resp.status_code == 200, resp.text
        return {g["pair_id"]: g["relevant"] for g in gold}

    def claim(self, who: Contributor, size: int, model: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = self.client.post(
            "/api/v1/batches/claim", json={"size": size, "model": model_info(model)}, headers=who.headers
        )
        assert resp.status_code == 200, resp.text
        return resp.json()

    def submit(
        self,
        who: Contributor,
        batch_id: str,
        verdicts: dict[str, bool],
        model: dict[str, Any] | None = None,
    ) -> Any:
        labels = [
            {"pair_id": pid, "relevant": rel, "p_relevant": 0.9 if rel else 0.1, "grade": None, "truncated": False,
             "seconds": 0.5}
            for pid, rel in verdicts.items()
        ]  # fmt: skip
        return self.client.post(
            f"/api/v1/batches/{batch_id}/labels",
            json={"model": model_info(model), "labels": labels},
            headers=who.headers,
        )

    def pair(self, pair_id: str) -> Any:
        return self.sql("SELECT * FROM pair WHERE pair_id = %(p)s", {"p": pair_id})[0]

    def expire(self, batch_id: str) -> None:
        """Move a batch's lease into the past, as if its time had run out."""
        self.sql(
            "UPDATE batch SET expires_at = now() - interval '1 second' WHERE batch_id = %(b)s",
            {"b": batch_id},
        )
        self.sql(
            "UPDATE pair SET lease_expires_at = now() - interval '1 second' WHERE lease_batch_id = %(b)s",
            {"b": batch_id},
        )


@pytest.fixture
def kmb(client: TestClient, engine: Engine) -> Kombinat:
    return Kombinat(client, engine)
