"""Feeding kombinat's work queue from a mining shard: hardest candidates first, in bounded chunks.

The order is (rank, -rrf_score, pair_id): every query's most confusable candidate goes out before any
query's second, so labels spread over all queries. A per-partition offset remembers how far the shard has
been pushed; kombinat ignores pair_ids it already holds, so a crash between a push and the offset update
costs a re-send, never a duplicate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb

from embedkomb_pipeline.labeling.kombinat_client import KombinatAdminClient

_CHUNK_SQL = """
SELECT c.pair_id, q.query, d.document, c.split, c.cycle, c.rrf_score AS priority
FROM read_parquet($shard) c
JOIN (SELECT DISTINCT ON (query_id) query_id, query FROM read_parquet($source)) q USING (query_id)
JOIN (SELECT DISTINCT ON (doc_id) doc_id, document FROM read_parquet($source)) d USING (doc_id)
ORDER BY c.rank, c.rrf_score DESC, c.pair_id
LIMIT $limit OFFSET $offset
"""


@dataclass
class FeedResult:
    enqueued: int
    already_present: int
    offset_before: int
    offset_after: int
    total_candidates: int
    queued_before: int

    @property
    def remaining(self) -> int:
        return self.total_candidates - self.offset_after


def read_offset(state_path: Path) -> int:
    if not state_path.exists():
        return 0
    return int(json.loads(state_path.read_text())["offset"])


def _write_offset(state_path: Path, offset: int) -> None:
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset": offset}))
    tmp.replace(state_path)


def feed_queue(
    client: KombinatAdminClient,
    shard: Path,
    source_pairs: Path,
    split: str,
    cycle: str,
    state_path: Path,
    depth_budget: int = 20_000,
    chunk_size: int = 5_000,
) -> FeedResult:
    """Push the next candidates of a shard until the partition's queued pairs reach depth_budget."""
    if depth_budget < 1 or chunk_size < 1:
        raise ValueError("depth_budget and chunk_size must be positive")
    con = duckdb.connect()
    row = con.execute("SELECT count(*) FROM read_parquet(?)", [str(shard)]).fetchone()
    assert row is not None  # an aggregate without GROUP BY always returns one row
    total = row[0]
    offset = offset_before = min(read_offset(state_path), total)
    queued = int(client.queue_counts(split=split, cycle=cycle)["queued"])
    room = max(0, depth_budget - queued)
    enqueued = already = 0
    while room > 0 and offset < total:
        limit = min(chunk_size, room, total - offset)
        rows = con.execute(
            _CHUNK_SQL, {"shard": str(shard), "source": str(source_pairs), "limit": limit, "offset": offset}
        ).fetchall()
        if not rows:
            break
        pairs = [
            {"pair_id": r[0], "query": r[1], "document": r[2], "split": r[3], "cycle": r[4], "priority": float(r[5])}
            for r in rows
        ]
        answer = client.enqueue(pairs)
        enqueued += answer["inserted"]
        already += answer["already_present"]
        offset += len(rows)
        room -= len(rows)
        _write_offset(state_path, offset)
    con.close()
    return FeedResult(enqueued, already, offset_before, offset, total, queued)
