"""Real uvicorn servers on loopback against one PostgreSQL database: concurrent claimers and replicas."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import (
    KombinatServer,
    admit_model,
    bearer,
    model_info,
    running_kombinat,
    sign_in,
)
from tests.support.postgres import fresh_database


def enqueue(server: KombinatServer, n: int) -> list[str]:
    pairs = [
        {"pair_id": str(uuid.uuid4()), "query": f"q{i}", "document": f"d{i}", "split": "s", "cycle": "c000",
         "priority": float(i % 17)}
        for i in range(n)
    ]  # fmt: skip
    r = httpx.post(f"{server.url}/api/v1/admin/pairs", json={"pairs": pairs}, headers=bearer(server.admin_token))
    assert r.status_code == 200 and r.json()["inserted"] == n
    return [p["pair_id"] for p in pairs]


def contributor_tokens(database_url: str, n: int) -> list[tuple[int, str]]:
    from kombinat_api.auth import issue_token
    from kombinat_api.db import make_engine

    engine = make_engine(database_url, 1, 0)
    out = []
    with engine.begin() as conn:
        for i in range(n):
            cid = conn.exec_driver_sql(
                "INSERT INTO contributor (login, trusted) VALUES (%(l)s, true) RETURNING id",
                {"l": f"c{i}"},
            ).scalar_one()
            out.append((cid, issue_token(conn, cid, False, f"c{i}")))
    engine.dispose()
    return out


@pytest.fixture(scope="module")
def server() -> Iterator[KombinatServer]:
    with running_kombinat(workers=2, env={"KOMBINAT_RATE_LIMIT_PER_MINUTE": "100000"}) as s:
        admit_model(s)
        yield s


def test_32_concurrent_claimers_get_disjoint_leases_and_nothing_is_over_assigned(server: KombinatServer) -> None:
    ids = set(enqueue(server, 500))
    tokens = contributor_tokens(server.database_url, 32)
    barrier = threading.Barrier(32)

    def claim(token: str) -> dict[str, Any]:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            r = c.post("/api/v1/batches/claim", json={"size": 20, "model": model_info()}, headers=bearer(token))
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(32) as pool:
        first = list(pool.map(claim, [t for _, t in tokens]))
    got = [p["pair_id"] for b in first for p in b["pairs"]]
    assert len(got) == len(set(got)) == 500  # 32 x 20 > 500: everything leased, nothing twice
    assert set(got) == ids
    with psycopg.connect(server.database_url.replace("+psycopg", "")) as conn:
        leased = dict(conn.execute("SELECT pair_id::text, lease_batch_id::text FROM pair").fetchall())
    for b in first:
        for p in b["pairs"]:
            assert leased[p["pair_id"]] == b["batch_id"]

    # Everyone labels its lease; every pair then needs exactly one more label, from someone else.
    def submit(args: tuple[str, dict[str, Any]]) -> int:
        token, batch = args
        labels = [{"pair_id": p["pair_id"], "relevant": True, "p_relevant": 0.8} for p in batch["pairs"]]
        if not labels:
            return 0
        r = httpx.post(f"{server.url}/api/v1/batches/{batch['batch_id']}/labels",
                       json={"model": model_info(), "labels": labels}, headers=bearer(token), timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        return int(r.json()["accepted"])

    with ThreadPoolExecutor(32) as pool:
        assert sum(pool.map(submit, zip([t for _, t in tokens], first, strict=True))) == 500
    first_labeler = {p["pair_id"]: cid for (cid, _), b in zip(tokens, first, strict=True) for p in b["pairs"]}
    barrier.reset()
    with ThreadPoolExecutor(32) as pool:
        second = list(pool.map(claim, [t for _, t in tokens]))
    got2 = [(cid, p["pair_id"]) for (cid, _), b in zip(tokens, second, strict=True) for p in b["pairs"]]
    assert len({pid for _, pid in got2}) == len(got2)  # disjoint again
    assert all(first_labeler[pid] != cid for cid, pid in got2)  # never to its first labeler
    with ThreadPoolExecutor(32) as pool:
        assert sum(pool.map(submit, zip([t for _, t in tokens], second, strict=True))) == len(got2)
    with psycopg.connect(server.database_url.replace("+psycopg", "")) as conn:
        per_pair = Counter(n for (n,) in conn.execute("SELECT count(*) FROM label GROUP BY pair_id"))
        verified = conn.execute("SELECT count(*) FROM pair WHERE status = 'verified'").fetchone()[0]
    assert max(per_pair) == 2  # no pair got more labels than it needed
    assert verified == len(got2)


@pytest.mark.subprocess
def test_two_server_processes_on_one_database_stay_consistent() -> None:
    """Two kombinat processes share nothing but PostgreSQL: sign-in, tokens, leases, rate limits and
    verification stay consistent when every other request goes to the other process."""
    with ExitStack() as stack:
        github = stack.enter_context(FakeGitHub())
        url = stack.enter_context(fresh_database())
        a = stack.enter_context(running_kombinat(database_url=url, github=github))
        b = stack.enter_context(running_kombinat(database_url=url, github=github))
        admit_model(a)
        ids = set(enqueue(b, 400))
        gold_rows = [
            {"pair_id": str(uuid.uuid4()), "query": f"gq{i}", "document": f"gd{i}", "relevant": i % 3 == 0,
             "grade": None, "source": "t"}
            for i in range(60)
        ]  # fmt: skip
        httpx.post(f"{a.url}/api/v1/admin/honeypots", json={"honeypots": gold_rows}, headers=bearer(a.admin_token))
        gold = {g["pair_id"]: g["relevant"] for g in gold_rows}
        # Tokens issued by one process work on the other.
        tokens = [sign_in(a if i % 2 else b, github, f"vol{i}", 7000 + i) for i in range(12)]
        for i, t in enumerate(tokens):
            me = httpx.get(f"{(b if i % 2 else a).url}/api/v1/me", headers=bearer(t))
            assert me.status_code == 200 and me.json()["login"] == f"vol{i}"

        errors: list[str] = []
        leases: dict[str, list[tuple[float, float]]] = defaultdict(list)
        lock = threading.Lock()

        def work(i: int) -> int:
            token = tokens[i]
            servers = [a.url, b.url]
            accepted = 0
            k = i
            with httpx.Client(timeout=60) as c:
                for _round in range(200):
                    k += 1
                    r = c.post(f"{servers[k % 2]}/api/v1/batches/claim",
                               json={"size": 30, "model": model_info()}, headers=bearer(token))  # fmt: skip
                    t_claim = time.monotonic()
                    if r.status_code != 200:
                        errors.append(f"claim {r.status_code} {r.text}")
                        return accepted
                    batch = r.json()
                    if not batch["pairs"]:
                        q = c.get(f"{servers[k % 2]}/api/v1/admin/queue", headers=bearer(a.admin_token)).json()
                        if q["queued"] == 0 and q["leased"] == 0:
                            return accepted
                        time.sleep(0.05)
                        continue
                    pairs = batch["pairs"]
                    for j in range(0, len(pairs), 10):
                        chunk = pairs[j : j + 10]
                        labels = [
                            {"pair_id": p["pair_id"], "p_relevant": 0.7,
                             "relevant": gold.get(p["pair_id"], hash(p["pair_id"]) % 2 == 0)}
                            for p in chunk
                        ]  # fmt: skip
                        k += 1
                        t_sent = time.monotonic()
                        with lock:
                            for p in chunk:
                                if p["pair_id"] not in gold:
                                    leases[p["pair_id"]].append((t_claim, t_sent))
                        r = c.post(f"{servers[k % 2]}/api/v1/batches/{batch['batch_id']}/labels",
                                   json={"model": model_info(), "labels": labels}, headers=bearer(token))  # fmt: skip
                        if r.status_code != 200:
                            errors.append(f"submit {r.status_code} {r.text}")
                            return accepted
                        accepted += r.json()["accepted"]
            return accepted

        with ThreadPoolExecutor(12) as pool:
            total = sum(pool.map(work, range(12)))
        assert not errors, errors[:5]
        dsn = url.replace("+psycopg", "")
        with psycopg.connect(dsn) as conn:
            stored = conn.execute("SELECT count(*) FROM label").fetchone()[0]
            dupes = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM label GROUP BY pair_id, contributor_id HAVING count(*) > 1) s"
            ).fetchone()[0]
            statuses = dict(conn.execute("SELECT status, count(*) FROM pair WHERE NOT is_honeypot GROUP BY status"))
            quarantined = conn.execute("SELECT count(*) FROM batch WHERE quarantined").fetchone()[0]
        assert stored == total and dupes == 0
        assert statuses == {"verified": len(ids)}
        assert quarantined == 0
        # No pair was ever leased to two batches at once: each lease began after the previous label left.
        for spans in leases.values():
            spans.sort()
            for (_, sent), (claimed, _) in itertools.pairwise(spans):
                assert claimed > sent
        # Public numbers agree whichever process answers.
        sa = httpx.get(f"{a.url}/api/v1/stats").json()
        sb = httpx.get(f"{b.url}/api/v1/stats").json()
        assert sa["totals"] == sb["totals"] and sa["totals"]["verified"] == len(ids)


def test_one_contributor_claiming_in_parallel_never_sees_a_honeypot_twice(server: KombinatServer) -> None:
    enqueue(server, 200)
    gold = [
        {"pair_id": str(uuid.uuid4()), "query": f"hq{i}", "document": f"hd{i}", "relevant": True, "grade": 1,
         "source": "t"}
        for i in range(12)
    ]  # fmt: skip
    httpx.post(f"{server.url}/api/v1/admin/honeypots", json={"honeypots": gold}, headers=bearer(server.admin_token))
    [(_, token)] = contributor_tokens(server.database_url, 1)
    barrier = threading.Barrier(8)

    def claim(_: int) -> list[str]:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            r = c.post("/api/v1/batches/claim", json={"size": 20, "model": model_info()}, headers=bearer(token))
            assert r.status_code == 200, r.text
            return [p["pair_id"] for p in r.json()["pairs"]]

    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(claim, range(8)))
    ids = {g["pair_id"] for g in gold}
    shown = [pid for b in batches for pid in b if pid in ids]
    assert len(shown) == len(set(shown))
    everything = [pid for b in batches for pid in b]
    assert len(everything) == len(set(everything))
