"""Queue upkeep: frequent VACUUM (ANALYZE) of the tables that claim and submit rewrite all the time.

Every lease and every label rewrites a ``pair`` row, so the queue's indexes fill with entries of dead row
versions that each claim walks past, and the planner's statistics go stale. Autovacuum's default thresholds
(a fifth of a table changed) are far too lax for a queue, and some servers run with it off altogether. Each
server process therefore vacuums these tables itself at a short interval. ``SKIP_LOCKED`` makes the
processes of all replicas take turns without any coordination: a table another process is vacuuming right
now is skipped, never waited for. VACUUM never blocks reads or writes of the rows it cleans.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from kombinat_api.db import libpq_url

log = logging.getLogger("kombinat.upkeep")

# Only the tables whose rows claim and submit rewrite: the others only grow (label, batch_honeypot) or are
# tiny and pruned in place (contributor, api_token). Each VACUUM also invalidates the cached plans of every
# statement on the table, and the hot path's connections then plan them afresh, so fewer is cheaper.
HOT_TABLES = ("pair", "batch")
# PARALLEL 0: the index passes of a table this size qualify for parallel workers, and a vacuum that takes
# every core at once stalls every request in flight (parallel vacuum workers were running during a burst of
# slow claims in bench/queue.py; the API, not the vacuum, is what has to stay quick).
VACUUM_SQL = f"VACUUM (SKIP_LOCKED, ANALYZE, PARALLEL 0) {', '.join(HOT_TABLES)}"
# A manual VACUUM runs unthrottled: one pass over `pair` took a whole core for ~0.5 s every interval, and the
# slowest claims of bench/queue.py fell exactly into those passes. Paced at half autovacuum's default rate
# (2 ms sleeps per 100 cost units), a pass takes a few seconds at a fraction of a core beside the requests;
# at autovacuum's own 200 the bursts were smaller but still there.
UPKEEP_SESSION = "-c vacuum_cost_delay=2ms -c vacuum_cost_limit=100"


# The pages claim and submit read at random places. Every lease and every label writes a new version of a pair
# row, with an entry in each index of pair: in the primary key at the leaf of a random UUID. The claim reads
# the texts through pair_content's key, and both probe the label key per pair. At 20M queued pairs these are
# ~5 GB. While they are in memory (shared_buffers or the OS page cache) a claim at 20M is about as fast as at
# 200k (p99 1.1-1.5x); read from disk, as after a restart, it was 7x slower (bench/results/queue_depth).
WORKING_SET_SQL = """
SELECT pg_relation_size('pair') + pg_indexes_size('pair') + pg_relation_size('pair_content_pkey')
       + pg_relation_size('label_pkey') AS working_set,
       (SELECT setting::bigint * current_setting('block_size')::bigint FROM pg_settings
        WHERE name = 'shared_buffers') AS shared_buffers
"""
WORKING_SET_RELATIONS = ("pair_queue", "pair_pkey", "pair_content_pkey", "label_pkey", "pair")


@dataclass(frozen=True)
class WorkingSet:
    """The queue's randomly read pages against the server's buffer cache (both in bytes)."""

    bytes: int
    shared_buffers: int

    @property
    def fits(self) -> bool:
        return self.bytes <= self.shared_buffers

    def advice(self) -> str:
        gib = 1 << 30
        sizes = f"queue working set {self.bytes / gib:.2f} GiB"
        if self.fits:
            return f"{sizes} fits in shared_buffers {self.shared_buffers / gib:.2f} GiB"
        return (
            f"{sizes} is larger than shared_buffers {self.shared_buffers / gib:.2f} GiB: claims stay fast only while "
            "the OS page cache holds the rest, and slow down several-fold when it must come from disk (after a "
            "restart, or with too little memory); raise shared_buffers above it, with autoprewarm (docs/deploy.md, "
            "'kombinat at depth'), or enqueue in smaller windows"
        )


def working_set(conn: psycopg.Connection[tuple[Any, ...]]) -> WorkingSet:
    row = conn.execute(WORKING_SET_SQL).fetchone()
    assert row is not None
    return WorkingSet(int(row[0]), int(row[1]))


def connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """The upkeep's own autocommit connection (VACUUM cannot run inside a transaction), paced by UPKEEP_SESSION."""
    return psycopg.connect(dsn, autocommit=True, options=UPKEEP_SESSION)


def vacuum_once(conn: psycopg.Connection[tuple[Any, ...]]) -> float:
    """One pass over the hot tables on an autocommit connection; returns its seconds."""
    started = time.perf_counter()
    conn.execute(VACUUM_SQL)
    return time.perf_counter() - started


async def run_upkeep(database_url: str, interval_s: float) -> None:
    """Vacuum every ``interval_s`` until cancelled. A failure is logged and retried at the next interval with
    a fresh connection: upkeep must never take the server down."""
    dsn = libpq_url(database_url)
    conn: psycopg.Connection[tuple[Any, ...]] | None = None
    fitted: bool | None = None  # said once, and again when it changes
    try:
        while True:
            await asyncio.sleep(interval_s)
            try:
                if conn is None or conn.closed:
                    conn = await asyncio.to_thread(connect, dsn)
                seconds = await asyncio.to_thread(vacuum_once, conn)
                log.debug("vacuumed %s in %.3f s", ", ".join(HOT_TABLES), seconds)
                pages = await asyncio.to_thread(working_set, conn)
                if pages.fits is not fitted:
                    (log.info if pages.fits else log.warning)("%s", pages.advice())
                    fitted = pages.fits
            except psycopg.Error as exc:
                log.warning("queue upkeep failed (retrying in %.0f s): %s", interval_s, exc)
                if conn is not None:
                    conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()
