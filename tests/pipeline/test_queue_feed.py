"""Feeding kombinat from a shard: hardest candidates first, bounded by the queue budget, never twice."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from embedkomb_pipeline.labeling.kombinat_client import KombinatAdminClient, KombinatError
from embedkomb_pipeline.labeling.queue_feed import feed_queue, read_offset
from tests.support.kombinat_server import running_kombinat


def _shard_and_source(tmp_path: Path) -> tuple[Path, Path]:
    queries = [f"q{i}" for i in range(4)]
    docs = [f"d{j}" for j in range(6)]
    source = pl.DataFrame(
        {
            "query_id": [*queries, "q0"],
            "doc_id": ["d0", "d1", "d2", "d3", "d4"],
            "query": [*(f"query text {q}" for q in queries), "query text q0"],
            "document": [f"document text {d}" for d in docs[:5]],
            "source_dataset": ["toy"] * 5,
            "split": ["toy"] * 5,
        }
    )
    rows = []
    for qi, q in enumerate(queries):
        for rank in (1, 2, 3):
            rows.append(
                {
                    "pair_id": f"00000000-0000-4000-8000-{qi:06d}{rank:06d}",
                    "query_id": q,
                    "doc_id": docs[(qi + rank) % 5],
                    "split": "toy",
                    "cycle": "c000",
                    "bm25_rank": rank,
                    "dense_rank": rank,
                    "rrf_score": 2 / (60 + rank) + qi * 1e-4,
                    "rank": rank,
                }
            )
    shard = pl.DataFrame(rows)
    shard.write_parquet(tmp_path / "shard.parquet")
    source.write_parquet(tmp_path / "source.parquet")
    return tmp_path / "shard.parquet", tmp_path / "source.parquet"


@pytest.mark.subprocess
def test_hardest_first_within_the_budget_and_never_twice(tmp_path: Path) -> None:
    shard, source = _shard_and_source(tmp_path)
    state = tmp_path / "state.json"
    with running_kombinat() as server, KombinatAdminClient(server.url, server.admin_token) as client:
        first = feed_queue(client, shard, source, "toy", "c000", state, depth_budget=5, chunk_size=2)
        assert (first.enqueued, first.offset_after, first.remaining) == (5, 5, 7)
        queued = list(client.verified(split="toy", cycle="c000", status="new"))
        ranks = pl.read_parquet(shard).filter(pl.col("pair_id").is_in([p["pair_id"] for p in queued]))["rank"]
        # all four rank-1 candidates go before any rank-2 one
        assert sorted(ranks.to_list()) == [1, 1, 1, 1, 2]
        assert {p["query"] for p in queued} >= {"query text q0", "query text q3"}

        again = feed_queue(client, shard, source, "toy", "c000", state, depth_budget=5, chunk_size=2)
        assert (again.enqueued, again.offset_after) == (0, 5)  # the budget is full: nothing sent

        state.unlink()  # a lost offset only costs a re-send: kombinat keeps each pair_id once
        resent = feed_queue(client, shard, source, "toy", "c000", state, depth_budget=50, chunk_size=4)
        assert (resent.enqueued, resent.already_present, resent.offset_after) == (7, 5, 12)
        assert read_offset(state) == 12
        assert client.queue_counts(split="toy", cycle="c000")["queued"] == 12


@pytest.mark.subprocess
def test_client_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(KombinatError, match="KOMBINAT_ADMIN_TOKEN"):
        KombinatAdminClient("http://127.0.0.1:9", "")
    with (
        running_kombinat() as server,
        KombinatAdminClient(server.url, "not-a-token") as client,
        pytest.raises(KombinatError, match="401"),
    ):
        client.queue_counts()
    unreachable = KombinatAdminClient("http://127.0.0.1:9", "token", timeout=1.0, retries=1)
    with pytest.raises(KombinatError, match="unreachable"):
        unreachable.queue_counts()
