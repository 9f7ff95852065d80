"""Bulk enqueue through COPY (kombinat_api.queue.copy_enqueue_pairs): what the JSON statement stores, idempotently."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine

from kombinat_api import queue as kq
from tests.kombinat.conftest import Kombinat


def rows(n: int, split: str = "bulk", offset: int = 0) -> list[tuple[uuid.UUID, str, str, str, str, float]]:
    return [
        # tabs, newlines and backslashes travel through COPY's text format unharmed
        (uuid.uuid5(uuid.NAMESPACE_OID, f"p{offset + i}"), f"query\t{i}", f"document {i}\nline \\ two", split,
         "c000", float(offset + i))
        for i in range(n)
    ]  # fmt: skip


def test_copy_stores_pairs_and_texts_like_the_json_statement(engine: Engine, kmb: Kombinat) -> None:
    with engine.begin() as conn:
        assert kq.copy_enqueue_pairs(conn, rows(500)) == 500
        assert kq.enqueue_pairs(conn, [{"pair_id": uuid.uuid4(), "query": "q", "document": "d", "split": "json",
                                        "cycle": "c000", "priority": 1.0}]) == 1  # fmt: skip
    stored = kmb.sql(
        "SELECT p.split, p.state, p.is_honeypot, count(*) FROM pair p JOIN pair_content c USING (pair_id) "
        "GROUP BY 1, 2, 3 ORDER BY 1"
    )
    assert [tuple(r) for r in stored] == [("bulk", "queued", False, 500), ("json", "queued", False, 1)]
    pid = str(uuid.uuid5(uuid.NAMESPACE_OID, "p7"))
    [content] = kmb.sql("SELECT query, document FROM pair_content WHERE pair_id = %(p)s", {"p": pid})
    assert tuple(content) == ("query\t7", "document 7\nline \\ two")


def test_copy_is_idempotent_and_skips_duplicates_within_a_load(engine: Engine, kmb: Kombinat) -> None:
    with engine.begin() as conn:
        assert kq.copy_enqueue_pairs(conn, rows(300)) == 300
    with engine.begin() as conn:
        # 300 known + 100 new, each of the new ones twice
        assert kq.copy_enqueue_pairs(conn, rows(400) + rows(100, offset=300)) == 100
        # the staging table is empty again within the transaction
        assert kq.copy_enqueue_pairs(conn, []) == 0
    assert kmb.sql("SELECT count(*) FROM pair")[0][0] == 400
    assert kmb.sql("SELECT count(*) FROM pair_content")[0][0] == 400


def test_copied_pairs_are_claimed_hardest_first(engine: Engine, kmb: Kombinat) -> None:
    kmb.admit()
    with engine.begin() as conn:
        kq.copy_enqueue_pairs(conn, rows(200))
    who = kmb.contributor(trusted=True)
    batch = kmb.claim(who, 20)
    claimed = {p["pair_id"] for p in batch["pairs"]}
    top = {str(uuid.uuid5(uuid.NAMESPACE_OID, f"p{i}")) for i in range(180, 200)}
    # the batch holds honeypots only when some are loaded; here it is the 20 highest priorities
    assert claimed == top


def test_bad_rows_fail_the_whole_load(engine: Engine, kmb: Kombinat) -> None:
    with pytest.raises(Exception, match="uuid"), engine.begin() as conn:
        kq.copy_enqueue_pairs(conn, [*rows(10), ("not-a-uuid", "q", "d", "bulk", "c000", 0.0)])
    assert kmb.sql("SELECT count(*) FROM pair")[0][0] == 0
