"""Benchmark of kombinat's work queue, end to end over HTTP and for the bare claim statement.

    flock /tmp/embedkomb-bench.lock .venv/bin/python -m bench.queue [--pairs 200000 --annotators 64 ...]

1. Makes its own fresh database on the local PostgreSQL, migrates it, starts kombinat under uvicorn with
   several workers on a free loopback port.
2. Enqueues the pairs through the admin API (bulk, 50k per call) and loads honeypots.
3. Drives simulated annotators (one asyncio task each, async HTTP/1.1 keep-alive) that claim batches and
   submit labels in chunks of 50 until the queue is drained (every pair verified). Verdicts are a
   deterministic function of the pair plus a little noise, so most pairs verify after two labels and some need
   a third; honeypots are answered correctly (a competent model). An annotator whose claim comes back empty
   waits as the real one does (5 s, doubling); the run ends as soon as nothing is left to label.
4. Prints sustained labels/s, claims/s, p50/p99 latency of claim and submit, and checks that every accepted
   label is stored exactly once, that nothing was lost, and that no pair was ever leased to two batches at
   once (a pair's next lease is only handed out after the previous lease's label was sent).
5. In the same run, measures the bare claim (and submit) statements through psycopg, with no HTTP, as the
   ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import itertools
import json
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

try:
    import sniffio  # noqa: F401
except ImportError:
    # httpcore tries `import sniffio` on every request; without the package each miss rescans sys.path
    # (it was ~15 % of the load generator's CPU). Caching the miss keeps the generator's CPU for load.
    sys.modules["sniffio"] = None  # type: ignore[assignment]

import httpx
import psycopg

from annotator.worker import WorkerConfig
from kombinat_api import queue as kq
from kombinat_api.auth import issue_token
from kombinat_api.db import make_engine
from kombinat_api.settings import Settings
from tests.support.kombinat_server import (
    TEST_MODEL,
    bearer,
    make_admin_token,
    model_info,
    start_server,
    stop_server,
)
from tests.support.postgres import (
    admin_dsn,
    create_database,
    drop_database,
    migrate_database,
    sqlalchemy_url,
)

CHUNK = 50
# the targets of the issue this bench answers: what a 2-core machine must sustain with server, database and
# load generator on it; reported, not enforced (a shared host moves them), unlike the correctness checks
TARGET_LABELS_PER_S = 5_000
TARGET_CLAIM_P99_MS = 100.0
# the real annotator's defaults: its batch size, and its waits after a claim that found no work
IDLE = WorkerConfig()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of processes (Linux /proc), to show where the machine's CPU went."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, stolen) CPU seconds of the whole machine so far (/proc/stat), for the share PostgreSQL used.
    Stolen: time a virtual CPU was ready to run while the host ran something else (counted in busy, too)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick, steal / tick


def checkpoint_count(dsn: str) -> int:
    """Checkpoints the server has made so far (timed and requested)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter").fetchone()
    return int(row[0]) if row else 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


class LeanResponse:
    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class LeanHttp:
    """A keep-alive HTTP/1.1 client on one asyncio stream, for the simulated annotators only.

    The generator shares two cores with the server and the database, so its CPU per request is CPU the
    measured system does not get: httpx's AsyncClient cost about 0.3 cores at 3,500 labels/s here, this
    a fraction of that. It speaks just what kombinat answers (Content-Length bodies) and reconnects once
    if the server closed an idle connection.
    """

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> LeanHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def post(self, path: str, json: Any, headers: dict[str, str]) -> LeanResponse:
        body = _json_dumps(json).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        ).encode()
        for attempt in range(2):
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None and self.writer is not None
            try:
                self.writer.write(head + body)
                return await asyncio.wait_for(self._read_response(self.reader), self.timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.aclose()
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader) -> LeanResponse:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"kombinat answered without Content-Length: {head[:200]!r}")
        return LeanResponse(status, await reader.readexactly(length))


_json_dumps = json.JSONEncoder(separators=(",", ":")).encode


def truth(pair_id: str) -> bool:
    return hashlib.blake2b(pair_id.encode(), digest_size=1).digest()[0] < 128


@dataclass
class Stats:
    claim_lat: list[float] = field(default_factory=list)
    submit_lat: list[float] = field(default_factory=list)
    # (finished at, latency, pairs) per claim, for the steady-state view
    claim_log: list[tuple[float, float, int]] = field(default_factory=list)
    submit_log: list[tuple[float, float]] = field(default_factory=list)
    claims: int = 0
    empty_claims: int = 0
    accepted: int = 0
    duplicates: int = 0
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (pair_id, contributor) of every accepted label, as the client saw it
    sent: set[tuple[str, int]] = field(default_factory=set)
    # pair_id -> [(claim_received, label_sent)] per lease
    leases: dict[str, list[list[float]]] = field(default_factory=lambda: defaultdict(list))
    label_times: list[float] = field(default_factory=list)


async def annotator(
    url: str,
    cid: int,
    token: str,
    gold: dict[str, bool],
    batch_size: int,
    noise: float,
    stats: Stats,
    drained: asyncio.Event,
    seed: int,
    rate: float,
) -> None:
    # One client (one keep-alive connection) per annotator, as separate volunteer machines would have; a
    # single shared pool also costs httpcore time quadratic in its number of connections.
    async with LeanHttp(url) as http:
        await _annotate(http, cid, token, gold, batch_size, noise, stats, drained, seed, rate)


async def _annotate(
    http: LeanHttp,
    cid: int,
    token: str,
    gold: dict[str, bool],
    batch_size: int,
    noise: float,
    stats: Stats,
    drained: asyncio.Event,
    seed: int,
    rate: float,
) -> None:
    rng = random.Random(seed)
    headers = bearer(token)
    idle = IDLE.idle_min
    model = model_info()
    if rate > 0:
        # Volunteers do not all start in the same millisecond: spread the first claims over two seconds.
        await asyncio.sleep(rng.random() * 2.0)
    while not drained.is_set():
        t0 = time.perf_counter()
        resp = await http.post("/api/v1/batches/claim", json={"size": batch_size, "model": model}, headers=headers)
        t1 = time.perf_counter()
        stats.claim_lat.append(t1 - t0)
        # parsed once: a 200-pair answer is ~100 kB of JSON, and the generator shares the CPU with the server
        batch = resp.json() if resp.status_code == 200 else {}
        stats.claim_log.append((t1, t1 - t0, len(batch.get("pairs", []))))
        if resp.status_code != 200:
            stats.errors[f"claim {resp.status_code}"] += 1
            await asyncio.sleep(0.05)
            continue
        stats.claims += 1
        pairs = batch["pairs"]
        if not pairs:
            # Back off as the real annotator does (annotator/worker.py: 5 s, doubling up to 120 s); the drain
            # watcher ends the wait as soon as the queue is drained.
            stats.empty_claims += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), idle)
            idle = min(IDLE.idle_max, idle * 2)
            continue
        idle = IDLE.idle_min
        # Honeypots are shown to many contributors at once by design; leases are about ordinary pairs.
        for p in pairs:
            if p["pair_id"] not in gold:
                stats.leases[p["pair_id"]].append([t1, float("inf")])
        for i in range(0, len(pairs), CHUNK):
            chunk = pairs[i : i + CHUNK]
            if rate > 0:
                # The simulated model's labeling time for this chunk, before it is sent.
                await asyncio.sleep(len(chunk) / rate)
            labels = []
            for p in chunk:
                pid = p["pair_id"]
                verdict = gold[pid] if pid in gold else truth(pid) ^ (rng.random() < noise)
                labels.append(
                    {"pair_id": pid, "relevant": verdict, "p_relevant": 0.9 if verdict else 0.1, "grade": None,
                     "truncated": False, "seconds": 0.3}
                )  # fmt: skip
            ts = time.perf_counter()
            for p in chunk:
                if p["pair_id"] not in gold:
                    stats.leases[p["pair_id"]][-1][1] = ts
            r = await http.post(
                f"/api/v1/batches/{batch['batch_id']}/labels",
                json={"model": model, "labels": labels},
                headers=headers,
            )
            te = time.perf_counter()
            stats.submit_lat.append(te - ts)
            stats.submit_log.append((te, te - ts))
            if r.status_code != 200:
                stats.errors[f"submit {r.status_code}: {r.text[:100]}"] += 1
                continue
            body = r.json()
            stats.accepted += body["accepted"]
            stats.duplicates += body["duplicates"]
            stats.label_times.extend([te] * body["accepted"])
            for p in chunk:
                stats.sent.add((p["pair_id"], cid))


def bare_ceiling(
    database_url: str, n_pairs: int, batch_size: int, threads: int, seconds: float, generic_plans: bool
) -> dict[str, Any]:
    """The claim and submit statements straight through psycopg: no HTTP, no FastAPI, no JSON."""
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    engine = make_engine(database_url, threads + 1, 0)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE pair SET state = 'done' WHERE state IN ('queued', 'leased')")
        kq.enqueue_pairs(
            conn,
            [
                {"pair_id": uuid.uuid4(), "query": f"ceiling query {i}", "document": "d" * 300, "split": "ceiling",
                 "cycle": "c000", "priority": random.random()}
                for i in range(n_pairs)
            ],
        )  # fmt: skip
        cids = [
            conn.exec_driver_sql(
                "INSERT INTO contributor (login, trusted) VALUES (%(l)s, true) RETURNING id",
                {"l": f"ceiling{i}"},
            ).scalar_one()
            for i in range(threads)
        ]
    engine.dispose()
    model = model_info()
    claim_lat: list[float] = []
    submit_lat: list[float] = []
    counts = {"claims": 0, "pairs": 0, "labels": 0}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(cid: int) -> None:
        # the server's own hot-path statement preparation, so the ceiling runs the same plans
        options = (
            {
                "prepare_threshold": 0,
                "options": "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c jit=off",
            }
            if generic_plans
            else {}
        )
        with psycopg.connect(dsn, **options) as conn:
            while time.perf_counter() < deadline:
                bid = uuid.uuid4()
                t0 = time.perf_counter()
                with conn.transaction():
                    rows = conn.execute(
                        kq.CLAIM_SQL,
                        {**model, "cid": cid, "n": batch_size, "hp_expected": batch_size * 0.07,
                         "hp_cap": Settings().honeypot_max_exposure, "bid": bid, "lease": 900.0},
                    ).fetchall()  # fmt: skip
                t1 = time.perf_counter()
                pairs = [r[2] for r in rows if r[2] is not None]
                with lock:
                    claim_lat.append(t1 - t0)
                    counts["claims"] += 1
                    counts["pairs"] += len(pairs)
                if not pairs:
                    return
                for i in range(0, len(pairs), CHUNK):
                    chunk = pairs[i : i + CHUNK]
                    t2 = time.perf_counter()
                    with conn.transaction():
                        conn.execute(
                            kq.SUBMIT_SQL,
                            {"labels": json.dumps([{"pair_id": str(p), "relevant": True, "p_relevant": 0.9,
                                                    "grade": None, "truncated": False, "seconds": 0.1}
                                                   for p in chunk]),
                             "bid": bid, "cid": cid, **model, "lease": 900.0,
                             "min_agree": 0.66, "max_per_tier": 3, "max_tier": 1},
                        ).fetchall()  # fmt: skip
                    with lock:
                        submit_lat.append(time.perf_counter() - t2)
                        counts["labels"] += len(chunk)

    start = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(cid,)) for cid in cids]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - start
    return {
        "threads": threads,
        "elapsed_s": round(elapsed, 2),
        "claims_per_s": round(counts["claims"] / elapsed, 1),
        "pairs_leased_per_s": round(counts["pairs"] / elapsed, 1),
        "labels_per_s": round(counts["labels"] / elapsed, 1),
        "claim_p50_ms": round(pct(claim_lat, 0.5) * 1000, 2),
        "claim_p99_ms": round(pct(claim_lat, 0.99) * 1000, 2),
        "submit_p50_ms": round(pct(submit_lat, 0.5) * 1000, 2),
        "submit_p99_ms": round(pct(submit_lat, 0.99) * 1000, 2),
    }


# --------------------------------------------------------------------------------------------------------
# Depth mode (--depth N): claim and submit with N pairs queued, against 200k in the same run

DEPTH_BASELINE = 200_000


def depth_pool(data_dir: str) -> list[str]:
    """Real sentences (SciFact, NFCorpus, MS MARCO subset) for short real-shaped pair texts; COPY-safe."""
    from bench.mining_scale import sentence_pool

    return [" ".join(s.replace("\\", "/").split()) for s in sentence_pool(__import__("pathlib").Path(data_dir))]


def depth_rows(pool: list[str], n: int, seed: int) -> Any:
    """n pairs: a query of one sentence's first 8 words, a document of one sentence (~150 chars), random priority."""
    rng = random.Random(seed)
    size = len(pool)
    for _ in range(n):
        query = " ".join(pool[rng.randrange(size)].split()[:8])
        yield (uuid.UUID(int=rng.getrandbits(128), version=4), query, pool[rng.randrange(size)], "depth", "c000",
               rng.random())  # fmt: skip


def copy_load(database_url: str, pool: list[str], n: int, seed: int, chunk: int = 1_000_000) -> dict[str, Any]:
    """Enqueue n pairs through kombinat_api.queue.copy_enqueue_pairs, one transaction per chunk."""
    engine = make_engine(database_url, 1, 0)
    started = time.perf_counter()
    per_chunk: list[float] = []
    new = 0
    for i, start in enumerate(range(0, n, chunk)):
        t0 = time.perf_counter()
        with engine.begin() as conn:
            new += kq.copy_enqueue_pairs(conn, depth_rows(pool, min(chunk, n - start), seed * 100_003 + i))
        per_chunk.append(min(chunk, n - start) / (time.perf_counter() - t0))
        print(f"  COPY enqueue: {start + min(chunk, n - start):,} / {n:,} pairs, {per_chunk[-1]:,.0f} pairs/s "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    engine.dispose()
    seconds = time.perf_counter() - started
    return {"pairs": n, "new": new, "seconds": round(seconds, 1), "pairs_per_s": round(n / seconds),
            "pairs_per_s_per_chunk_min_max": [round(min(per_chunk)), round(max(per_chunk))]}  # fmt: skip


DEPTH_FILL_SQL = """
INSERT INTO enqueue_stage (pair_id, query, document, split, cycle, priority)
SELECT gen_random_uuid(),
       (SELECT q FROM depth_pool WHERE i = 1 + (g * 7919 + %(salt)s) %% %(n)s),
       (SELECT d FROM depth_pool WHERE i = 1 + (g * 104729 + %(salt)s * 3) %% %(n)s),
       'depth', 'c000', random()
FROM generate_series(1::bigint, %(rows)s::bigint) g
"""


def server_fill(
    database_url: str, dsn: str, pool: list[str], n: int, budget_s: float, chunk: int = 1_000_000
) -> dict[str, Any]:
    """Fill the queue by n more pairs generated inside PostgreSQL (from a table of the same real sentences) and
    merged by the very statement the COPY path runs (kombinat_api.queue.COPY_MERGE_SQL). A documented bypass of
    the client transport only: a Python row generator on a CPU shared with other jobs could not feed 20M rows in
    the time box; the client COPY rate is measured separately on 1M rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS depth_pool (i int PRIMARY KEY, q text NOT NULL, d text NOT NULL)")
        conn.execute("TRUNCATE depth_pool")
        with conn.cursor().copy("COPY depth_pool (i, q, d) FROM STDIN") as copy:
            for i, sentence in enumerate(pool, start=1):
                copy.write_row((i, " ".join(sentence.split()[:8]), sentence))
    engine = make_engine(database_url, 1, 0)
    started = time.perf_counter()
    new = 0
    for k, start in enumerate(range(0, n, chunk)):
        if time.perf_counter() - started > budget_s:
            print(f"  server-side fill stopped at {start:,} pairs: its {budget_s:.0f} s budget is spent", flush=True)
            n = start
            break
        rows = min(chunk, n - start)
        t0 = time.perf_counter()
        with engine.begin() as conn:
            conn.exec_driver_sql(kq.COPY_STAGE_SQL)
            conn.exec_driver_sql(DEPTH_FILL_SQL, {"rows": rows, "n": len(pool), "salt": k * 1_000_003})
            new += int(conn.exec_driver_sql(kq.COPY_MERGE_SQL).scalar_one())
        print(f"  server-side fill: {start + rows:,} / {n:,} pairs, {rows / (time.perf_counter() - t0):,.0f} pairs/s "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    engine.dispose()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE depth_pool")
    seconds = time.perf_counter() - started
    return {"pairs": n, "new": new, "seconds": round(seconds, 1), "pairs_per_s": round(n / seconds)}


def json_load(database_url: str, pool: list[str], n: int, seed: int, chunk: int = 50_000) -> dict[str, Any]:
    """The baseline: the same rows through enqueue_pairs (the JSON recordset statement the admin API runs)."""
    engine = make_engine(database_url, 1, 0)
    rows = list(depth_rows(pool, n, seed))
    started = time.perf_counter()
    new = 0
    for start in range(0, n, chunk):
        part = [{"pair_id": r[0], "query": r[1], "document": r[2], "split": r[3], "cycle": r[4], "priority": r[5]}
                for r in rows[start : start + chunk]]  # fmt: skip
        with engine.begin() as conn:
            new += kq.enqueue_pairs(conn, part)
    seconds = time.perf_counter() - started
    engine.dispose()
    return {"pairs": n, "new": new, "seconds": round(seconds, 1), "pairs_per_s": round(n / seconds)}


EXPLAIN_TIMED = "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) "


def measure_hot_path(
    dsn: str, cids: list[int], batch_size: int, seconds: float, upkeep_every_s: float, warmup_s: float = 0.0
) -> dict[str, Any]:
    """Claim + submit (chunks of 50) of the server's statements, one thread per contributor, while a thread runs
    the server's upkeep pass (kombinat_api/upkeep.py) every ``upkeep_every_s`` seconds.

    Latency is the database's own (planning + execution time from EXPLAIN ANALYZE, which runs the statement for
    real): on a machine whose cores a nice-0 job keeps busy, these nice-19 Python clients wait for a core far
    longer than the statements run, and a client-side p99 measured the scheduler. Client round trips are
    reported beside it. EXPLAIN plans with the parameters' values (custom plans); the server's hot path forces
    generic plans, which tests/kombinat/test_lean_hot_path.py pins. The first ``warmup_s`` seconds run the same
    load unrecorded (their labels are still checked for loss and duplication)."""
    from kombinat_api import upkeep

    model = model_info()
    claim_lat: list[float] = []
    submit_lat: list[float] = []
    claim_wall: list[float] = []
    sent: set[tuple[str, int]] = set()
    measured_labels = [0]
    lock = threading.Lock()
    stop = threading.Event()
    measure_from = time.perf_counter() + warmup_s
    deadline = measure_from + seconds
    upkeep_passes: list[float] = []

    def upkeep_loop() -> None:
        with upkeep.connect(dsn) as conn:
            while not stop.wait(upkeep_every_s):
                upkeep_passes.append(upkeep.vacuum_once(conn))

    def timed(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> tuple[float, float]:
        t0 = time.perf_counter()
        row = conn.execute(EXPLAIN_TIMED + sql, params).fetchone()
        wall = time.perf_counter() - t0
        plan = row[0][0] if row else {}
        return (plan.get("Planning Time", 0.0) + plan.get("Execution Time", 0.0)) / 1000, wall

    def worker(cid: int) -> None:
        with psycopg.connect(dsn, options="-c jit=off") as conn:
            while time.perf_counter() < deadline:
                bid = uuid.uuid4()
                t_claim = time.perf_counter()
                with conn.transaction():
                    db_s, wall = timed(
                        conn, kq.CLAIM_SQL,
                        {**model, "cid": cid, "n": batch_size, "hp_expected": batch_size * 0.07,
                         "hp_cap": Settings().honeypot_max_exposure, "bid": bid, "lease": 900.0},
                    )  # fmt: skip
                    # EXPLAIN returns no rows, so the batch's pairs are looked up: through the live-lease index
                    # (the claim set the same expiry on all of them, in this transaction, so now() is the same).
                    # lease_batch_id has no index since migration 0002: a lookup by it alone was a parallel scan
                    # of the whole table, 1 s at 20M pairs, that starved the claims measured beside it.
                    leased = conn.execute(
                        "SELECT pair_id FROM pair WHERE state = 'leased' "
                        "AND lease_expires_at = now() + make_interval(secs => %(lease)s) AND lease_batch_id = %(b)s "
                        "UNION ALL SELECT pair_id FROM batch_honeypot WHERE batch_id = %(b)s",
                        {"b": bid, "lease": 900.0},
                    ).fetchall()
                    pairs = [r[0] for r in leased]
                recorded = t_claim >= measure_from
                with lock:
                    if recorded:
                        claim_lat.append(db_s)
                        claim_wall.append(wall)
                for i in range(0, len(pairs), CHUNK):
                    chunk = pairs[i : i + CHUNK]
                    with conn.transaction():
                        db_s, _ = timed(
                            conn, kq.SUBMIT_SQL,
                            {"labels": json.dumps([{"pair_id": str(p), "relevant": truth(str(p)), "p_relevant": 0.9,
                                                    "grade": None, "truncated": False, "seconds": 0.1}
                                                   for p in chunk]),
                             "bid": bid, "cid": cid, **model, "lease": 900.0,
                             "min_agree": 0.66, "max_per_tier": 3, "max_tier": 1},
                        )  # fmt: skip
                    with lock:
                        if recorded:
                            submit_lat.append(db_s)
                            measured_labels[0] += len(chunk)
                        sent.update((str(p), cid) for p in chunk)

    queued_before, _ = queued_pairs(dsn)
    upkeeper = threading.Thread(target=upkeep_loop)
    upkeeper.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(cid,)) for cid in cids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    stop.set()
    upkeeper.join()
    with psycopg.connect(dsn) as conn:
        mine = "FROM label WHERE contributor_id = ANY(%s)"
        stored = {(str(p), c) for p, c in conn.execute(f"SELECT pair_id, contributor_id {mine}", (cids,)).fetchall()}
        rows_stored = conn.execute(f"SELECT count(*) {mine}", (cids,)).fetchone()
    return {
        "threads": len(cids), "elapsed_s": round(elapsed, 1), "claims": len(claim_lat),
        "queued_before": queued_before, "queued_after": queued_pairs(dsn)[0],
        "warmup_s": warmup_s, "labels_sent": len(sent),
        "labels_per_s": round(measured_labels[0] / max(elapsed - warmup_s, 1e-9), 1),
        "claim_p50_ms": round(pct(claim_lat, 0.5) * 1000, 2), "claim_p99_ms": round(pct(claim_lat, 0.99) * 1000, 2),
        "submit_p50_ms": round(pct(submit_lat, 0.5) * 1000, 2), "submit_p99_ms": round(pct(submit_lat, 0.99) * 1000, 2),
        "claim_client_round_trip_p50_ms": round(pct(claim_wall, 0.5) * 1000, 2),
        "claim_client_round_trip_p99_ms": round(pct(claim_wall, 0.99) * 1000, 2),
        "lost_labels": len(sent - stored), "unexpected_labels": len(stored - sent),
        "duplicated_labels": int(rows_stored[0]) - len(stored) if rows_stored else -1,
        "upkeep_passes_s": [round(x, 2) for x in upkeep_passes],
    }  # fmt: skip


def relation_sizes(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i') AND pg_relation_size(c.oid) > 1000000 "
            "ORDER BY 2 DESC"
        ).fetchall()
        total = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return {**{name: int(size) for name, size in rows}, "database_total": int(total[0]) if total else 0}


def export_all_labels(client: Any, admin: dict[str, str], page: int) -> dict[str, Any]:
    """Page through GET /api/v1/admin/labels to the end (the app in this process), watching this process's
    resident memory: bounded means it stays flat however many labels pass through."""

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    gc.collect()
    rss_start = rss_max = rss_mb()
    rss_after_first_page = 0.0
    cursor: str | None = None
    exported = pages = 0
    started = time.perf_counter()
    while True:
        params: dict[str, Any] = {"limit": page}
        if cursor:
            params["after"] = cursor
        r = client.get("/api/v1/admin/labels", params=params, headers=admin)
        r.raise_for_status()
        body = r.json()
        pages += 1
        exported += len(body["labels"])
        del r
        rss_max = max(rss_max, rss_mb())
        if pages == 1:
            rss_after_first_page = rss_mb()
        if not body["labels"]:
            break
        cursor = body["next_cursor"]
    seconds = time.perf_counter() - started
    return {"labels": exported, "pages": pages, "page_size": page, "seconds": round(seconds, 1),
            "labels_per_s": round(exported / seconds), "rss_mb_before": round(rss_start),
            "rss_mb_after_first_page": round(rss_after_first_page), "rss_mb_max": round(rss_max)}  # fmt: skip


def server_settings(dsn: str) -> dict[str, str]:
    """The PostgreSQL settings the depth figures depend on (the claim reads index leaves at random: whether they
    sit in shared_buffers or must be copied in from the OS page cache is what changes with depth)."""
    names = ("server_version", "shared_buffers", "effective_cache_size", "work_mem", "wal_buffers", "max_wal_size")
    with psycopg.connect(dsn) as conn:
        return {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]


def prewarm_working_set(dsn: str) -> dict[str, Any]:
    """Cache the queue's working set (kombinat_api.upkeep.WORKING_SET_RELATIONS) with pg_prewarm, as a server that
    has been serving has it cached: in shared_buffers where it fits there (autoprewarm, docs/deploy.md, restores
    them after a restart), otherwise in the OS page cache ('read' mode), as far as the machine's memory allows. A
    database just filled or restarted has neither, and its first minutes would measure the filling of a cache
    (a run at 128 MB right after a restart from 6 GB read from disk: claim p99 106 ms instead of 44)."""
    from kombinat_api import upkeep

    with psycopg.connect(dsn, autocommit=True) as conn:
        pages = upkeep.working_set(conn)
        mode = "buffer" if pages.fits else "read"
        out: dict[str, Any] = {"working_set_bytes": pages.bytes, "shared_buffers_bytes": pages.shared_buffers,
                               "fits": pages.fits, "mode": mode, "prewarmed_blocks": {}}  # fmt: skip
        started = time.perf_counter()
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        for rel in upkeep.WORKING_SET_RELATIONS:
            row = conn.execute("SELECT pg_prewarm(%s::regclass, %s)", (rel, mode)).fetchone()
            out["prewarmed_blocks"][rel] = int(row[0]) if row else 0
        out["prewarm_s"] = round(time.perf_counter() - started, 1)
    where = "shared_buffers" if pages.fits else "the OS page cache"
    print(f"  {pages.advice()}; prewarmed into {where} in {out['prewarm_s']} s", flush=True)
    return out


def prepare_depth_database(
    database_url: str, args: argparse.Namespace, stack: contextlib.ExitStack, contributors: int
) -> tuple[Any, dict[str, str], list[int]]:
    """Migrate (idempotent), register the bench's model and honeypots (fixed IDs: a reused database is not given a
    second set), start the app in this process and make ``contributors`` new contributors (new ones on every
    run, so a reused database's earlier labels never exclude pairs from them)."""
    migrate_database(database_url)
    # The app runs in this process (FastAPI's TestClient: the real routes, no uvicorn), so the export's memory is
    # this process's; a uvicorn child at nice 19 on a saturated machine did not even start within 30 s.
    from fastapi.testclient import TestClient

    from kombinat_api.main import create_app

    settings = Settings(database_url=database_url, upkeep_interval_s=0.0, rate_limit_per_minute=100_000,
                        admin_rate_limit_per_minute=100_000)  # fmt: skip
    client = stack.enter_context(TestClient(create_app(settings)))
    admin = bearer(make_admin_token(database_url, "bench"))
    client.put("/api/v1/admin/models", json={"models": [TEST_MODEL]}, headers=admin).raise_for_status()
    gold = [{"pair_id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"depth-gold-{i}")), "query": f"gold query {i}",
             "document": f"gold document {i}", "relevant": i % 2 == 0, "grade": None, "source": "bench"}
            for i in range(args.honeypots)]  # fmt: skip
    client.post("/api/v1/admin/honeypots", json={"honeypots": gold}, headers=admin).raise_for_status()
    engine = make_engine(database_url, 1, 0)
    run = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        first = int(conn.exec_driver_sql("SELECT coalesce(max(github_id), 0) FROM contributor").scalar_one())
        cids = [
            conn.exec_driver_sql(
                "INSERT INTO contributor (github_id, login, trusted) VALUES (%(g)s, %(l)s, true) RETURNING id",
                {"g": max(first, 800_000) + 1 + i, "l": f"depth-{run}-{i}"},
            ).scalar_one()
            for i in range(contributors)
        ]
    engine.dispose()
    return client, admin, cids


def queued_pairs(dsn: str) -> tuple[int, int]:
    """(queued, all ordinary pairs) in the database."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'queued'), count(*) FROM pair WHERE NOT is_honeypot"
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def depth_main(args: argparse.Namespace) -> int:
    """--depth N: COPY enqueue rate (vs the JSON statement), hot-path latency at 200k and at N queued pairs, table
    and index sizes, upkeep passes at each depth, and a full label export through the admin API at depth.

    Each depth has its own database: the baseline's is made, measured and dropped first; the deep one is made
    and filled, or, with --depth-db NAME, reused as a previous run left it (--keep-db) and filled up to N. The
    pairs go in through kombinat_api.queue.copy_enqueue_pairs straight on the database (the function the bulk
    path runs; no HTTP), the claims and submits through psycopg with the server's statements and plan settings
    (bench --ceiling's method). The export's labels are written by one SQL statement (a bypass: labels for the
    first --export-labels queued pairs from one contributor), then read back over HTTP. The JSON file is
    rewritten after every phase, so a run stopped half way keeps what it measured."""
    results: dict[str, Any] = {"command": " ".join(sys.argv), "depth": args.depth}

    def save() -> None:
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(results, f, indent=1)

    pool = depth_pool(args.data_dir)  # the real sentences both depths' pairs are drawn from
    base_db = create_database("kombinat_depth_base")
    try:
        with contextlib.ExitStack() as stack:
            _depth_baseline(args, base_db, results, stack, pool)
    finally:
        drop_database(base_db)
    save()
    reused = bool(args.depth_db)
    deep_db = args.depth_db or create_database("kombinat_depth")
    results["depth_database"] = {"name": deep_db, "reused": reused}
    keep = args.keep_db or reused
    try:
        with contextlib.ExitStack() as stack:
            return _depth_deep(args, deep_db, results, stack, save, pool)
    finally:
        if keep:
            print(f"the deep database is kept: --depth-db {deep_db}", flush=True)
        else:
            drop_database(deep_db)


def _depth_baseline(
    args: argparse.Namespace, dbname: str, results: dict[str, Any], stack: contextlib.ExitStack, pool: list[str]
) -> None:
    database_url, dsn = sqlalchemy_url(dbname), admin_dsn(dbname)
    results["server_settings"] = server_settings(dsn)
    print("PostgreSQL: " + json.dumps(results["server_settings"]), flush=True)
    _, _, cids = prepare_depth_database(database_url, args, stack, args.ceiling_threads)
    # half through the JSON statement, half by COPY (the rates side by side)
    results["enqueue_json"] = json_load(database_url, pool, args.depth_baseline // 2, seed=1)
    results["enqueue_copy_baseline"] = copy_load(database_url, pool, args.depth_baseline // 2, seed=2, chunk=50_000)
    half = args.depth_baseline // 2
    print(f"enqueue {half:,} pairs: JSON statement {results['enqueue_json']['pairs_per_s']:,}/s, "
          f"COPY {results['enqueue_copy_baseline']['pairs_per_s']:,}/s", flush=True)  # fmt: skip
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    results["sizes_at_baseline"] = relation_sizes(dsn)
    results["prewarm_at_baseline"] = prewarm_working_set(dsn)
    results["hot_path_at_baseline"] = measure_hot_path(
        dsn, cids, args.batch_size, args.ceiling_seconds, args.depth_upkeep_every, args.depth_warmup_s
    )
    print(f"at {args.depth_baseline:,} queued: " + json.dumps(results["hot_path_at_baseline"]), flush=True)


def _depth_deep(
    args: argparse.Namespace,
    dbname: str,
    results: dict[str, Any],
    stack: contextlib.ExitStack,
    save: Any,
    pool: list[str],
) -> int:
    database_url, dsn = sqlalchemy_url(dbname), admin_dsn(dbname)
    client, admin, cids = prepare_depth_database(database_url, args, stack, args.ceiling_threads + 1)
    _, present = queued_pairs(dsn)
    # to depth: --depth-copy-pairs by client COPY (the rate; only into a new database), the rest generated
    # server-side (see server_fill)
    if present == 0:
        copied = min(args.depth_copy_pairs, args.depth)
        results["enqueue_copy_at_scale"] = copy_load(database_url, pool, copied, seed=3)
        present += copied
    if args.depth - present > 0:
        results["server_fill"] = server_fill(database_url, dsn, pool, args.depth - present, args.depth_fill_budget_s)
    save()
    # the upkeep passes after the load (the server's own statement and pacing), then the sizes
    from kombinat_api import upkeep

    with upkeep.connect(dsn) as conn:
        results["upkeep_first_pass_after_load_s"] = round(upkeep.vacuum_once(conn), 1)
        results["upkeep_second_pass_s"] = round(upkeep.vacuum_once(conn), 1)
    results["sizes_at_depth"] = relation_sizes(dsn)
    results["queued_at_depth"], _ = queued_pairs(dsn)
    print(f"upkeep passes after the load: {results['upkeep_first_pass_after_load_s']} s, "
          f"{results['upkeep_second_pass_s']} s", flush=True)  # fmt: skip
    print(f"sizes: {json.dumps(results['sizes_at_depth'])}", flush=True)
    results["prewarm_at_depth"] = prewarm_working_set(dsn)
    results["hot_path_at_depth"] = measure_hot_path(
        dsn, cids[: args.ceiling_threads], args.batch_size, args.ceiling_seconds, args.depth_upkeep_every,
        args.depth_warmup_s,
    )  # fmt: skip
    print(f"at {results['queued_at_depth']:,} queued: " + json.dumps(results["hot_path_at_depth"]), flush=True)
    save()

    # export at depth: labels written in one statement (bypass), then paged out through the admin API
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO label (pair_id, contributor_id, batch_id, relevant, p_relevant, backend, model_id, "
            "quantization, annotator_version) "
            "SELECT pair_id, %s, gen_random_uuid(), random() < 0.5, random(), 'bench', 'bench', 'q', 'x' "
            "FROM pair WHERE state = 'queued' LIMIT %s",
            (cids[-1], args.export_labels),
        )
        stored_labels = int(conn.execute("SELECT count(*) FROM label").fetchone()[0])  # type: ignore[index]
    results["export_labels_written_s"] = round(time.perf_counter() - t0, 1)
    results["export"] = export_all_labels(client, admin, args.export_page)
    print("export: " + json.dumps(results["export"]), flush=True)

    base, deep = results["hot_path_at_baseline"], results["hot_path_at_depth"]
    ratio = deep["claim_p99_ms"] / base["claim_p99_ms"]
    results["claim_p99_ratio_depth_over_baseline"] = round(ratio, 2)
    results["checks"] = {
        "claim p99 at depth within 2x of 200k": ratio <= 2.0,
        "no label lost": base["lost_labels"] == deep["lost_labels"] == 0,
        "no label duplicated or unexpected": base["duplicated_labels"] == deep["duplicated_labels"] == 0
        and base["unexpected_labels"] == deep["unexpected_labels"] == 0,
        "export returned every stored label": results["export"]["labels"] == stored_labels,
    }
    print(f"\nclaim p99: {base['claim_p99_ms']} ms at {args.depth_baseline:,} queued (baseline) vs "
          f"{deep['claim_p99_ms']} ms at {results['queued_at_depth']:,} (x{ratio:.2f}); submit p99 "
          f"{base['submit_p99_ms']} vs {deep['submit_p99_ms']} ms")  # fmt: skip
    for name, ok in results["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    save()
    return 0 if all(results["checks"].values()) else 1


def non_negative_float(value: str) -> float:
    """A rate of 0 or more, checked before anything is started."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def prepare_threshold_arg(value: str) -> int | None:
    """'none' (never prepare) or a count of executions >= 0, checked before anything is started."""
    if value.lower() == "none":
        return None
    try:
        threshold = int(value)
    except ValueError:
        threshold = -1
    if threshold < 0:
        raise argparse.ArgumentTypeError(f"expected 'none' or an integer >= 0, got {value!r}")
    return threshold


def main() -> int:
    ap = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--annotators", type=int, default=64)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=IDLE.batch_size,
        help="pairs per claim (default %(default)s, the real annotator's)",
    )
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    ap.add_argument("--honeypots", type=int, default=3000)
    ap.add_argument("--noise", type=float, default=0.02, help="share of ordinary verdicts flipped at random")
    ap.add_argument("--ceiling-pairs", type=int, default=100_000)
    ap.add_argument("--ceiling-threads", type=int, default=4)
    ap.add_argument("--ceiling-seconds", type=float, default=20.0)
    ap.add_argument(
        "--rate",
        type=non_negative_float,
        default=90.0,
        help="labels/s each simulated annotator produces (its model's speed; default %(default)s: 64 of them offer "
        "5,760 labels/s, above the 5,000 target, with the machine not saturated); 0 = no labeling time "
        "(saturation: the throughput ceiling, with queueing in every latency)",
    )
    ap.add_argument("--db-pool-size", type=int, default=4, help="hot-path database connections per uvicorn worker")
    ap.add_argument("--db-max-overflow", type=int, default=0, help="extra hot-path connections per worker at peaks")
    ap.add_argument(
        "--db-prepare-threshold",
        type=prepare_threshold_arg,
        default=None,
        help="psycopg prepare_threshold of the server's general pool ('none': never prepare, kombinat's default)",
    )
    ap.add_argument(
        "--hot-path-generic-plans",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="claim/submit prepared once per connection with generic plans, in the server and the ceiling "
        "(kombinat's default); --no-hot-path-generic-plans plans every call afresh",
    )
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument("--depth", type=int, default=0, help="depth mode: claim/submit with this many pairs queued")
    ap.add_argument("--depth-baseline", type=int, default=DEPTH_BASELINE, help="depth mode: the baseline depth")
    ap.add_argument("--depth-copy-pairs", type=int, default=1_000_000, help="depth mode: pairs sent by client COPY")
    ap.add_argument("--depth-fill-budget-s", type=float, default=3600.0, help="depth mode: stop filling after this")
    ap.add_argument("--depth-upkeep-every", type=float, default=10.0, help="depth mode: upkeep pass interval, s")
    ap.add_argument(
        "--depth-db",
        default="",
        help="depth mode: reuse this database (one a run with --keep-db left, named at its end) and fill it up to "
        "--depth instead of making and filling a new one; it is kept",
    )
    ap.add_argument(
        "--depth-warmup-s",
        type=non_negative_float,
        default=10.0,
        help="depth mode: seconds of claims and submits before the measured ones, at each depth (a serving "
        "database has its hot pages cached; one just filled or restarted does not)",
    )
    ap.add_argument("--export-labels", type=int, default=1_000_000, help="depth mode: labels the export pages out")
    ap.add_argument("--export-page", type=int, default=10_000, help="depth mode: export page size")
    ap.add_argument(
        "--data-dir",
        default=os.environ.get(
            "EMBEDKOMB_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
        ),
    )
    ap.add_argument("--json-out", default="")
    ap.add_argument(
        "--latency-log",
        default="",
        help="write every claim and submit to this CSV file: when it finished (s after the first request, and "
        "as CLOCK_MONOTONIC), its latency in ms, its kind",
    )
    args = ap.parse_args()
    if args.depth:
        if args.depth <= args.depth_baseline:
            ap.error(f"--depth must be above the {args.depth_baseline:,}-pair baseline, got {args.depth}")
        if args.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(args.json_out))):
            ap.error(f"--json-out {args.json_out}: no such folder")
        if args.depth_db:
            with psycopg.connect(admin_dsn(), autocommit=True) as conn:
                found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (args.depth_db,)).fetchone()
                kept_dbs = conn.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE 'kombinat_depth%%' ORDER BY datname"
                ).fetchall()
            if not found:
                kept = ", ".join(row[0] for row in kept_dbs) or "none"
                ap.error(f"--depth-db {args.depth_db}: no such database on this server (kept depth databases: {kept})")
    elif args.depth_db:
        ap.error("--depth-db needs --depth (it names the deep database of a depth run)")
    if args.depth:
        return depth_main(args)
    # Output files are checked before a run of minutes, not found unwritable at its end with the figures lost.
    for flag, path in (("--json-out", args.json_out), ("--latency-log", args.latency_log)):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(path):
                ap.error(f"{flag} {path}: cannot write a file there (no such writable folder, or it is a folder)")

    dbname = create_database("kombinat_bench")
    # PGHOST/PGPORT/PGUSER choose the server (tests/support/postgres.py); the local one by default
    database_url = sqlalchemy_url(dbname)
    dsn = admin_dsn(dbname)
    proc = None
    try:
        migrate_database(database_url)
        env = {
            "KOMBINAT_RATE_LIMIT_PER_MINUTE": "100000",
            "KOMBINAT_ADMIN_RATE_LIMIT_PER_MINUTE": "100000",
            "KOMBINAT_DB_POOL_SIZE": str(args.db_pool_size),
            "KOMBINAT_DB_MAX_OVERFLOW": str(args.db_max_overflow),
            "KOMBINAT_DB_PREPARE_THRESHOLD": str(args.db_prepare_threshold).lower(),
            "KOMBINAT_HOT_PATH_GENERIC_PLANS": str(args.hot_path_generic_plans).lower(),
            "KOMBINAT_LEASE_SECONDS": "600",
        }
        proc, url = start_server(database_url, workers=args.workers, env=env)
        admin = bearer(make_admin_token(database_url, "bench"))
        http = httpx.Client(base_url=url, timeout=120)
        http.put("/api/v1/admin/models", json={"models": [TEST_MODEL]}, headers=admin).raise_for_status()

        # Enqueue through the API, in the pipeline's bulk shape.
        rng = random.Random(0)
        t0 = time.perf_counter()
        for start in range(0, args.pairs, 50_000):
            pairs = [
                {"pair_id": str(uuid.uuid4()), "query": f"what is topic {i} about {rng.random():.6f}",
                 "document": f"Document {i}: " + "lorem ipsum dolor sit amet " * 10, "split": "bench",
                 "cycle": "c000", "priority": rng.random()}
                for i in range(start, min(args.pairs, start + 50_000))
            ]  # fmt: skip
            r = http.post("/api/v1/admin/pairs", json={"pairs": pairs}, headers=admin)
            r.raise_for_status()
        enqueue_s = time.perf_counter() - t0
        gold_rows = [
            {"pair_id": str(uuid.uuid4()), "query": f"gold query {i}", "document": f"gold document {i}",
             "relevant": i % 2 == 0, "grade": 2 if i % 2 == 0 else 0, "source": "bench"}
            for i in range(args.honeypots)
        ]  # fmt: skip
        if gold_rows:
            http.post("/api/v1/admin/honeypots", json={"honeypots": gold_rows}, headers=admin).raise_for_status()
        gold = {g["pair_id"]: g["relevant"] for g in gold_rows}
        print(f"enqueued {args.pairs} pairs in {enqueue_s:.1f} s ({args.pairs / enqueue_s:,.0f} pairs/s), "
              f"{len(gold)} honeypots; server: {args.workers} uvicorn workers at {url}")  # fmt: skip

        engine = make_engine(database_url, 2, 0)
        with engine.begin() as conn:
            annotators = []
            for i in range(args.annotators):
                cid = conn.exec_driver_sql(
                    "INSERT INTO contributor (github_id, login, trusted) VALUES (%(g)s, %(l)s, true) RETURNING id",
                    {"g": 900_000 + i, "l": f"bench{i}"},
                ).scalar_one()
                annotators.append((cid, issue_token(conn, cid, False, f"bench{i}")))
        engine.dispose()

        # Asked by the drain watcher; an async connection, so the question never blocks the generator's event loop
        # (a blocking call there stalled every request in flight and was counted into their latencies).
        check_conn: psycopg.AsyncConnection[Any] | None = None

        async def queue_open() -> bool:
            nonlocal check_conn
            if check_conn is None:
                check_conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            cur = await check_conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pair WHERE state = 'queued') "
                "OR EXISTS (SELECT 1 FROM pair WHERE state = 'leased')"
            )
            row = await cur.fetchone()
            return bool(row and row[0])

        stats = Stats()

        async def watch_drain(drained: asyncio.Event) -> None:
            # Once claims start coming back empty, asks twice a second whether anything is left to label.
            while not drained.is_set():
                await asyncio.sleep(0.5)
                if stats.empty_claims and not await queue_open():
                    drained.set()

        async def drive() -> float:
            drained = asyncio.Event()
            t_start = time.perf_counter()
            watcher = asyncio.create_task(watch_drain(drained))
            await asyncio.gather(
                *[
                    annotator(url, cid, tok, gold, args.batch_size, args.noise, stats, drained, i, args.rate)
                    for i, (cid, tok) in enumerate(annotators)
                ]
            )
            elapsed = time.perf_counter() - t_start
            await watcher
            if check_conn is not None:
                await check_conn.close()
            return elapsed

        # Every run starts at the same point of the checkpoint cycle: the enqueue alone writes hundreds of MB of
        # WAL, and checkpoints (with the full-page images that follow each) otherwise fall at random into the
        # drive. Needs a superuser or pg_checkpoint; without it the run goes on as it is.
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            print("(no CHECKPOINT before the drive: the bench's database role may not run one)")
        checkpoints_before = checkpoint_count(dsn)
        print(f"driving {args.annotators} annotators, batches of {args.batch_size}, chunks of {CHUNK} ...")
        server_pids = [proc.pid, *children(proc.pid)]
        cpu0 = (cpu_seconds([os.getpid()]), cpu_seconds(server_pids), os.times().elapsed)
        machine0 = machine_cpu()
        # The generator's bookkeeping (every lease and label, ~10^6 objects) makes each full collection of
        # Python's cyclic GC a pause of a second or more, which stalls every request in flight at once and
        # showed up as the slowest claims. Nothing it allocates forms cycles that need collecting.
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            elapsed = asyncio.run(drive())
        finally:
            gc.enable()
        cpu1 = (cpu_seconds([os.getpid()]), cpu_seconds(server_pids), os.times().elapsed)
        checkpoints_during_drive = checkpoint_count(dsn) - checkpoints_before
        machine1 = machine_cpu()
        wall = cpu1[2] - cpu0[2]
        busy = (machine1[0] - machine0[0]) / wall
        cpu_share = {
            "load_generator": round((cpu1[0] - cpu0[0]) / wall, 2),
            "kombinat_workers": round((cpu1[1] - cpu0[1]) / wall, 2),
            # the rest of the busy machine: PostgreSQL, plus anything else that ran meanwhile
            "postgresql_and_rest": round(busy - (cpu1[0] - cpu0[0] + cpu1[1] - cpu0[1]) / wall, 2),
            "machine_busy_of_cores": f"{busy:.2f} of {os.cpu_count()}",
            # a shared host: CPU the hypervisor gave to others while this machine wanted it
            "stolen_by_host_of_cores": round((machine1[2] - machine0[2]) / wall, 2),
        }
        stop_server(proc)
        proc = None

        # Sustained rate: labels per 5 s window, excluding the ramp-up and the drain-out tail.
        t_first = min(stats.label_times) if stats.label_times else 0.0
        windows: dict[int, int] = defaultdict(int)
        for t in stats.label_times:
            windows[int((t - t_first) // 5)] += 1
        per_window = [windows[k] / 5 for k in sorted(windows)]
        core = per_window[1:-2] if len(per_window) > 4 else per_window
        sustained = statistics.median(core) if core else 0.0
        # Steady state: from the end of the first 5 s window to the start of the last two (drain-out).
        t_lo = t_first + 5
        t_hi = t_first + 5 * max(1, len(per_window) - 2)
        steady_claims = [lat for t, lat, _ in stats.claim_log if t_lo <= t <= t_hi]
        # where the slow claims fall in time: periodic stalls (upkeep, checkpoints) show up as tall windows
        claim_windows: dict[int, list[float]] = defaultdict(list)
        for t, lat, _ in stats.claim_log:
            claim_windows[int((t - t_first) // 5)].append(lat)
        claim_max_per_window = [round(max(claim_windows[k]) * 1000) for k in sorted(claim_windows)]
        steady_submits = [lat for t, lat in stats.submit_log if t_lo <= t <= t_hi]

        # Server-side truth.
        with psycopg.connect(dsn) as conn:
            stored = conn.execute("SELECT count(*) FROM label").fetchone()[0]
            distinct = conn.execute("SELECT count(DISTINCT (pair_id, contributor_id)) FROM label").fetchone()[0]
            db_pairs = {(str(p), c) for p, c in conn.execute("SELECT pair_id, contributor_id FROM label").fetchall()}
            states = dict(conn.execute("SELECT state, count(*) FROM pair GROUP BY state").fetchall())
            statuses = dict(
                conn.execute("SELECT status, count(*) FROM pair WHERE NOT is_honeypot GROUP BY status").fetchall()
            )
            labels_per_pair = dict(
                conn.execute(
                    "SELECT n, count(*) FROM (SELECT pair_id, count(*) n FROM label WHERE NOT is_honeypot "
                    "GROUP BY pair_id) s GROUP BY n ORDER BY n"
                ).fetchall()
            )
            quarantined = conn.execute("SELECT count(*) FROM batch WHERE quarantined").fetchone()[0]

        # A pair's leases must not overlap: each lease must have sent its label before the next one began,
        # and every lease of an ordinary pair ended in a stored label (nothing expired or was lost here).
        overlaps = 0
        unlabeled_leases = 0
        for leases in stats.leases.values():
            leases.sort()
            for prev, nxt in itertools.pairwise(leases):
                if not nxt[0] > prev[1]:
                    overlaps += 1
            unlabeled_leases += sum(1 for lease in leases if lease[1] == float("inf"))
        ordinary_leases = sum(len(v) for v in stats.leases.values())

        checks = {
            "labels stored == labels accepted": stored == stats.accepted,
            "no (pair, contributor) stored twice": distinct == stored,
            "every accepted label is stored": stats.sent <= db_pairs and len(stats.sent) == stats.accepted,
            "no pair leased twice at once": overlaps == 0,
            "every lease ended in a label": unlabeled_leases == 0,
            "queue drained": states.get("queued", 0) == 0 and states.get("leased", 0) == 0,
            "no failed requests": not stats.errors,
        }
        result = {
            "pairs": args.pairs,
            "annotators": args.annotators,
            "batch_size": args.batch_size,
            "chunk": CHUNK,
            "uvicorn_workers": args.workers,
            "db_pool": {
                "size": args.db_pool_size,
                "max_overflow": args.db_max_overflow,
                "prepare_threshold": args.db_prepare_threshold,
                "hot_path_generic_plans": args.hot_path_generic_plans,
            },
            "elapsed_s": round(elapsed, 1),
            "labels_accepted": stats.accepted,
            "labels_per_s_mean": round(stats.accepted / elapsed, 1),
            "labels_per_s_sustained_median_5s": round(sustained, 1),
            "labels_per_s_5s_windows": [round(x) for x in per_window],
            "claims": stats.claims,
            "claims_per_s": round(stats.claims / elapsed, 1),
            "empty_claims": stats.empty_claims,
            "claim_p50_ms": round(pct(stats.claim_lat, 0.5) * 1000, 1),
            "claim_p99_ms": round(pct(stats.claim_lat, 0.99) * 1000, 1),
            "submit_p50_ms": round(pct(stats.submit_lat, 0.5) * 1000, 1),
            "submit_p99_ms": round(pct(stats.submit_lat, 0.99) * 1000, 1),
            "steady_state": {
                "claims": len(steady_claims),
                "claim_p50_ms": round(pct(steady_claims, 0.5) * 1000, 1),
                "claim_p99_ms": round(pct(steady_claims, 0.99) * 1000, 1),
                "submits": len(steady_submits),
                "submit_p50_ms": round(pct(steady_submits, 0.5) * 1000, 1),
                "submit_p99_ms": round(pct(steady_submits, 0.99) * 1000, 1),
            },
            "claim_max_ms_5s_windows": claim_max_per_window,
            "slowest_claims_s_after_start": sorted(
                ((round(lat * 1000), round(t - t_first, 1), n) for t, lat, n in stats.claim_log), reverse=True
            )[:8],
            "duplicates_reported": stats.duplicates,
            "ordinary_leases": ordinary_leases,
            "pair_states": states,
            "pair_statuses": statuses,
            "labels_per_pair": labels_per_pair,
            "quarantined_batches": quarantined,
            "errors": dict(stats.errors),
            "cores_used_during_drive": cpu_share,
            "checkpoints_during_drive": checkpoints_during_drive,
            "rate_per_annotator": args.rate or "unpaced",
            "checks": checks,
        }
        result["targets_met"] = {
            f">= {TARGET_LABELS_PER_S} labels/s sustained": result["labels_per_s_sustained_median_5s"]
            >= TARGET_LABELS_PER_S,
            f"claim p99 < {TARGET_CLAIM_P99_MS:.0f} ms (whole run)": result["claim_p99_ms"] < TARGET_CLAIM_P99_MS,
        }
        print(json.dumps(result, indent=2))
        print("measuring the bare claim/submit statements through psycopg (no HTTP) ...")
        ceiling = bare_ceiling(
            database_url,
            args.ceiling_pairs,
            args.batch_size,
            args.ceiling_threads,
            args.ceiling_seconds,
            args.hot_path_generic_plans,
        )
        result["ceiling_psycopg"] = ceiling
        print(json.dumps({"ceiling_psycopg": ceiling}, indent=2))
        targets = ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in result["targets_met"].items())
        print(
            f"\nSUMMARY: {result['labels_per_s_sustained_median_5s']:,} labels/s sustained "
            f"({result['labels_per_s_mean']:,} mean over {elapsed:.0f} s), {result['claims_per_s']} claims/s, "
            f"claim p50/p99 {result['claim_p50_ms']}/{result['claim_p99_ms']} ms, "
            f"submit p50/p99 {result['submit_p50_ms']}/{result['submit_p99_ms']} ms; "
            f"ceiling (psycopg, {ceiling['threads']} threads): {ceiling['claims_per_s']} claims/s, "
            f"{ceiling['labels_per_s']:,} labels/s, claim p99 {ceiling['claim_p99_ms']} ms; "
            f"checks {'all passed' if all(checks.values()) else 'FAILED: ' + str(checks)}; "
            f"targets: {targets}"
        )
        if args.latency_log:
            t0 = min(t - lat for t, lat, _ in stats.claim_log)
            with open(args.latency_log, "w") as f:
                # finished_s counts from the first request; finished_clock is time.perf_counter() (CLOCK_MONOTONIC),
                # for lining requests up with samples another process took meanwhile
                f.write("finished_s,latency_ms,kind,finished_clock\n")
                for t, lat, n in stats.claim_log:
                    f.write(f"{t - t0:.4f},{lat * 1000:.2f},claim{'_empty' if n == 0 else ''},{t:.4f}\n")
                for t, lat in stats.submit_log:
                    f.write(f"{t - t0:.4f},{lat * 1000:.2f},submit,{t:.4f}\n")
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=2)
        return 0 if all(checks.values()) else 1
    finally:
        if proc is not None:
            stop_server(proc)
        if not args.keep_db:
            drop_database(dbname)


if __name__ == "__main__":
    sys.exit(main())
