"""The hot path's economies keep kombinat's behaviour: the verification rule is inlined into the submit, the
claim and submit run prepared generic plans on their own pool, the honeypot check runs only for batches
with a wrong answer, the submit body is validated in one pass with FastAPI's error shape, and a
reputation refresh reads a bounded window of recent batches."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import ClientCursor
from psycopg import Connection as PgConnection

from kombinat_api import queue
from kombinat_api.auth import resolve, resolve_async
from kombinat_api.db import async_transaction, compact_sql, hot_connection_kwargs, libpq_url, make_hot_pool
from tests.kombinat.conftest import Contributor, Kombinat
from tests.support.kombinat_server import model_info


def _submit_params(cid: int, batch_id: str, pair_ids: list[str]) -> dict[str, object]:
    labels = [{"pair_id": p, "relevant": True, "p_relevant": 0.9, "grade": None, "truncated": False, "seconds": 0.1}
              for p in pair_ids]  # fmt: skip
    return {"labels": json.dumps(labels), "bid": uuid.UUID(batch_id), "cid": cid, **model_info(), "lease": 900.0,
            "min_agree": 0.66, "max_per_tier": 3, "max_tier": 1}  # fmt: skip


@contextmanager
def _pooled_connection(database_url: str, generic_plans: bool) -> Iterator[PgConnection[Any]]:
    """A blocking connection with the hot path's options (or the general path's), for EXPLAIN: the plans are
    the server's, whichever client sends the statements."""
    with psycopg.connect(libpq_url(database_url), **hot_connection_kwargs(generic_plans)) as conn:
        yield conn


def _fifty_labels_then_analyze(kmb: Kombinat, queued: int) -> tuple[Contributor, list[str], str]:
    """A contributor who labeled 50 of a first batch of 60 (of ``queued`` pairs), with fresh statistics: the
    small tables a pooled connection's first plans are made on. Returns (contributor, batch's pair ids, batch id)."""
    kmb.admit()
    kmb.enqueue(queued)
    alice = kmb.contributor(trusted=True)
    batch = kmb.claim(alice, 60)
    ids = [p["pair_id"] for p in batch["pairs"]]
    assert kmb.submit(alice, batch["batch_id"], {p: True for p in ids[:50]}).status_code == 200
    kmb.sql("ANALYZE")
    return alice, ids, batch["batch_id"]


def test_the_verification_rule_is_inlined_into_the_submit(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(4)
    alice = kmb.contributor(trusted=True)
    batch = kmb.claim(alice, 4)
    params = _submit_params(alice.id, batch["batch_id"], [p["pair_id"] for p in batch["pairs"]])
    # EXPLAIN runs nothing; with the rule (or the recount) as a called function the plan shows a per-row
    # Function Scan.
    for statement in (queue.SUBMIT_SQL, queue.SUBMIT_DISTINCT_SQL):
        plan = "\n".join(r[0] for r in kmb.sql("EXPLAIN " + statement, params))
        assert "kombinat_" not in plan and "Function Scan on json_to_recordset" in plan, plan
    recount = {"ids": [p["pair_id"] for p in batch["pairs"]], "distinct": True, "min_agree": 0.66, "max_per_tier": 3,
               "max_tier": 1}  # fmt: skip
    plan = "\n".join(r[0] for r in kmb.sql("EXPLAIN " + queue.RECOMPUTE_SQL, recount))
    assert "kombinat_" not in plan and "label_pkey" in plan, plan
    # and the inlined rule still decides: the same statement, executed, labels the pairs once each
    assert kmb.submit(alice, batch["batch_id"], {p["pair_id"]: True for p in batch["pairs"]}).status_code == 200
    assert {r[0] for r in kmb.sql("SELECT status FROM pair WHERE NOT is_honeypot")} == {"labeled"}


@pytest.mark.parametrize("generic", [True, False])
def test_the_hot_path_runs_prepared_generic_plans(database_url: str, kmb: Kombinat, generic: bool) -> None:
    kmb.admit()
    kmb.enqueue(6)
    alice = kmb.contributor(trusted=True)

    async def two_claims_on_the_hot_pool() -> list[tuple[int, int]]:
        pool = make_hot_pool(database_url, 1, 0, generic_plans=True)
        await pool.open(wait=True)
        try:
            for _ in range(2):
                async with async_transaction(pool) as cur:
                    # what the claim endpoint runs: the caller's token check, then the claim
                    await resolve_async(cur, alice.token, 100, 100, generic_plans=generic)
                    assert cur.connection.prepare_threshold == 0
                    await queue.claim(cur, alice.id, 3, model_info(), 900, 0.0, 3)
            async with async_transaction(pool) as cur:
                await cur.execute(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE %s",
                    ["%async_commit%"],
                )
                return await cur.fetchall()
        finally:
            await pool.close()

    rows = asyncio.run(two_claims_on_the_hot_pool())
    # prepared once; planned generically for both claims (never a custom plan), or custom without the switch
    assert rows == ([(2, 0)] if generic else [(0, 2)]), rows
    assert kmb.sql("SELECT count(*) FROM pair WHERE state = 'leased'")[0][0] == 6


def test_the_honeypot_check_runs_only_for_batches_with_a_wrong_answer(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(30)
    gold = kmb.honeypots(20)
    careful, careless = kmb.contributor(), kmb.contributor()
    for who, right in ((careful, True), (careless, False)):
        batch = kmb.claim(who, 20)
        verdicts = {
            p["pair_id"]: (gold[p["pair_id"]] if right else not gold[p["pair_id"]]) if p["pair_id"] in gold else True
            for p in batch["pairs"]
        }
        assert any(pid in gold for pid in verdicts)
        resp = kmb.submit(who, batch["batch_id"], verdicts)
        assert resp.status_code == 200, resp.text
        hp_wrong, quarantined = kmb.sql(
            "SELECT hp_wrong, quarantined FROM batch WHERE batch_id = %(b)s", {"b": batch["batch_id"]}
        )[0]
        answered = sum(pid in gold for pid in verdicts)
        assert hp_wrong == (0 if right else answered)
        assert quarantined is (not right)
    submit = queue.SubmitResult("ok", honeypots=3, honeypots_wrong=0)
    assert not submit.needs_honeypot_check
    assert queue.SubmitResult("ok", honeypots=1, honeypots_wrong=1).needs_honeypot_check
    assert queue.SubmitResult("ok", batch_complete=True, honeypots_wrong=2).needs_honeypot_check
    assert not queue.SubmitResult("ok", honeypots=0, honeypots_wrong=2).needs_honeypot_check


def test_submit_body_errors_keep_fastapis_shape(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(2)
    alice = kmb.contributor(trusted=True)
    batch = kmb.claim(alice, 2)
    url = f"/api/v1/batches/{batch['batch_id']}/labels"
    pid = batch["pairs"][0]["pair_id"]
    bad_p = {"model": model_info(), "labels": [{"pair_id": pid, "relevant": True, "p_relevant": 1.5}]}
    resp = kmb.client.post(url, json=bad_p, headers=alice.headers)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "labels", 0, "p_relevant"], resp.text
    twice = {"model": model_info(), "labels": [{"pair_id": pid, "relevant": True, "p_relevant": 0.5}] * 2}
    resp = kmb.client.post(url, json=twice, headers=alice.headers)
    assert resp.status_code == 422 and "appears more than once" in resp.text
    broken = kmb.client.post(url, content=b'{"model": ', headers={**alice.headers, "content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
    # no token: 401 before the body is even looked at
    assert kmb.client.post(url, content=b"not json").status_code == 401
    assert kmb.sql("SELECT count(*) FROM label")[0][0] == 0
    schema = kmb.client.get("/openapi.json").json()
    body = schema["paths"]["/api/v1/batches/{batch_id}/labels"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/LabelChunk"}
    assert {"LabelChunk", "LabelIn", "ModelInfo"} <= set(schema["components"]["schemas"])


def test_a_reputation_refresh_reads_only_recent_batches(kmb: Kombinat) -> None:
    from kombinat_api import trust

    plan = "\n".join(
        r[0] for r in kmb.sql("EXPLAIN " + trust.STATS_SQL.replace("%(cid)s", "1").replace("%(window)s", "3"))
    )
    assert "Limit" in plan and "batch_contributor" in plan, plan


@pytest.mark.parametrize("hot", [True, False])
def test_hot_path_plans_stay_on_indexes_when_made_on_small_tables(database_url: str, kmb: Kombinat, hot: bool) -> None:
    """A generic plan outlives the statistics it was made with: one made while label was tiny must not scan it
    whole later. The hot path's transaction rules sequential scans out; the general path (control) shows the
    scan a small table invites."""
    alice, ids, batch_id = _fifty_labels_then_analyze(kmb, 60)
    with _pooled_connection(database_url, generic_plans=hot) as conn, conn.transaction(force_rollback=True):
        resolve(conn.cursor(), alice.token, 100, 100, generic_plans=hot)
        explained = conn.execute("EXPLAIN " + queue.SUBMIT_SQL, _submit_params(alice.id, batch_id, ids[50:]))
        plan = "\n".join(r[0] for r in explained)
    assert ("Seq Scan on label" in plan) is not hot, plan


@pytest.mark.parametrize("hot", [True, False])
def test_the_hot_path_never_jit_compiles(database_url: str, kmb: Kombinat, hot: bool) -> None:
    """The claim's estimated cost grows with the queue; past jit_above_cost (from a few hundred thousand
    queued pairs) every claim would compile its plan again, ~80 ms on top of ~6 ms of work. A threshold of 0
    stands in for that queue here; the general path (control) shows the compilation it would invite."""
    kmb.admit()
    kmb.enqueue(20)
    alice = kmb.contributor(trusted=True)
    params = {
        **model_info(),
        "cid": alice.id,
        "n": 5,
        "hp_expected": 0.0,
        "hp_cap": 3,
        "bid": uuid.uuid4(),
        "lease": 900.0,
    }
    with _pooled_connection(database_url, generic_plans=hot) as conn, conn.transaction(force_rollback=True):
        # JIT on whatever the server's own configuration says, so only the token check can turn it off
        conn.execute("SET LOCAL jit = on")
        conn.execute("SET LOCAL jit_above_cost = 0")
        resolve(conn.cursor(), alice.token, 100, 100, generic_plans=hot)
        setting = conn.execute("SELECT current_setting('jit')").fetchone()
        jit_available = conn.execute("SELECT pg_jit_available()").fetchone()
        row = conn.execute("EXPLAIN (FORMAT JSON) " + queue.CLAIM_SQL, params).fetchone()
    assert setting == ("off" if hot else "on",)
    assert row is not None and jit_available is not None
    # where the server has llvmjit, the plan itself shows the compilation (or its absence)
    assert ("JIT" in row[0][0]) is (jit_available[0] and not hot), row[0][0].get("JIT")


def _generic_plan(conn: PgConnection, statement: str, params: dict[str, Any], types: dict[str, str]) -> Any:
    """The generic plan PostgreSQL caches for ``statement`` on a pooled hot-path connection: prepared on the
    server with typed $n parameters and explained with plan_cache_mode=force_generic_plan, as the hot path
    runs it (EXPLAIN of a statement sent with values would show a custom plan instead)."""
    sql = statement.replace("%%", "%")
    names = list(types)
    for i, name in enumerate(names, start=1):
        sql = sql.replace(f"%({name})s", f"${i}")
    assert "%(" not in sql, "a parameter without a type"
    conn.execute(f"PREPARE hot_stmt ({', '.join(types.values())}) AS {sql}")
    literals = ", ".join(["%s"] * len(names))
    with ClientCursor(conn) as cur:
        cur.execute(f"EXPLAIN (FORMAT JSON) EXECUTE hot_stmt ({literals})", [params[n] for n in names])
        row = cur.fetchone()
    conn.execute("DEALLOCATE hot_stmt")
    assert row is not None
    return row[0][0]["Plan"]


def _label_reads(plan: dict[str, Any]) -> list[dict[str, Any]]:
    reads = []
    if plan.get("Relation Name") == "label" and plan["Node Type"] != "ModifyTable":
        reads.append(plan)
    for child in plan.get("Plans", []):
        reads.extend(_label_reads(child))
    return reads


def test_generic_plans_reach_labels_only_by_their_key(database_url: str, kmb: Kombinat) -> None:
    """A contributor's labels grow without bound, and the hot path's generic plans live as long as their
    connections: claim, submit and release must find a (pair, contributor) label by its key. Planned as
    joins on small tables, they read every label of the contributor instead (the whole key index, since
    contributor_id is its second column): with 40k pairs queued, a claim took 22 ms where probes take 7.
    The one other read allowed is the recount of a pair (kombinat_count: its model configurations), by the pair
    alone: a pair has a handful of labels, however many its contributors have."""
    # a queue long enough that the planner expects many candidates, which is what invites the join
    alice, ids, _ = _fifty_labels_then_analyze(kmb, 3000)
    second = kmb.claim(alice, 10)
    model = model_info()
    claim_types = {"backend": "text", "model_id": "text", "quantization": "text", "annotator_version": "text",
                   "prompt_version": "text", "cid": "bigint", "n": "int", "hp_expected": "float8",
                   "hp_cap": "int", "bid": "uuid", "lease": "float8"}  # fmt: skip
    submit_types = {"labels": "text", "bid": "uuid", "cid": "bigint", "annotator_version": "text", "lease": "float8",
                    "min_agree": "float8", "max_per_tier": "int", "max_tier": "int"}  # fmt: skip
    release_types = {"bid": "uuid", "cid": "bigint", "all": "boolean", "ids": "uuid[]"}
    claim_params = {
        **model,
        "cid": alice.id,
        "n": 20,
        "hp_expected": 1.0,
        "hp_cap": 3,
        "bid": uuid.uuid4(),
        "lease": 900.0,
    }
    release_params = {"bid": uuid.UUID(second["batch_id"]), "cid": alice.id, "all": True, "ids": []}
    submit_params = _submit_params(alice.id, second["batch_id"], ids[50:])
    statements = {
        "claim": (queue.CLAIM_SQL, claim_params, claim_types),
        "submit": (queue.SUBMIT_SQL, submit_params, submit_types),
        "submit (distinct models)": (queue.SUBMIT_DISTINCT_SQL, submit_params, submit_types),
        "release": (queue.RELEASE_SQL, release_params, release_types),
    }
    recounts = {"claim": 0, "submit": 1, "submit (distinct models)": 1, "release": 0}
    with _pooled_connection(database_url, generic_plans=True) as conn:
        for name, (statement, params, types) in statements.items():
            with conn.transaction(force_rollback=True):
                resolve(conn.cursor(), alice.token, 100, 100, generic_plans=True)
                reads = _label_reads(_generic_plan(conn, statement, params, types))
            assert reads, name
            by_pair_only = 0
            for read in reads:
                cond = read.get("Index Cond", "")
                assert "pair_id" in cond, (name, read)
                by_pair_only += "contributor_id" not in cond
            assert by_pair_only == recounts[name], (name, reads)


def test_hot_statements_fit_psycopgs_conversion_cache() -> None:
    """psycopg caches the %(name)s -> $n conversion only for statements up to MAX_CACHED_STATEMENT_LENGTH;
    a longer hot statement is converted again on every request."""
    from psycopg import _queries

    from kombinat_api.auth import HOT_RESOLVE_SQL

    for name, sql in {"claim": queue.CLAIM_SQL, "submit": queue.SUBMIT_SQL, "release": queue.RELEASE_SQL,
                      "token check": HOT_RESOLVE_SQL}.items():  # fmt: skip
        assert len(sql.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH, name
        assert "--" not in sql or name == "token check", name


def test_compact_sql_drops_comments_and_keeps_literals() -> None:
    sql = """
    SELECT 'a -- not a comment' AS x,  -- the caller's comment, with an apostrophe
           'it''s' AS y
    -- a whole-line comment
    FROM t WHERE s = 'queued'   -- trailing
    """
    assert compact_sql(sql) == "SELECT 'a -- not a comment' AS x,\n'it''s' AS y\nFROM t WHERE s = 'queued'\n"


def test_vacuum_never_truncates_the_queue_tables(kmb: Kombinat) -> None:
    """Truncation takes an ACCESS EXCLUSIVE lock that stalls every claim and submit behind it."""
    options = dict(kmb.sql("SELECT relname, reloptions FROM pg_class WHERE relname IN ('pair', 'batch', 'label')"))
    assert "vacuum_truncate=false" in (options["pair"] or []) and "vacuum_truncate=false" in (options["batch"] or [])
    assert options["label"] is None  # grow-only: its tail is never empty


def _label_read_loops(kmb: Kombinat, statement: str, params: dict[str, object]) -> dict[str, int]:
    """How often the statement's label reads ran, by kind: 'key' (pair, contributor) probes, 'pair' recounts.
    EXPLAIN ANALYZE runs the statement; it is rolled back."""
    with kmb.engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).scalar_one()[0]["Plan"]
        conn.rollback()
    loops = {"key": 0, "pair": 0}
    for read in _label_reads(plan):
        cond = read.get("Index Cond") or read.get("Recheck Cond") or ""
        loops["key" if "contributor_id" in cond else "pair"] += read.get("Actual Loops", 0)
    return loops


def test_the_default_submit_reads_a_pairs_labels_only_when_it_verifies_it(kmb: Kombinat) -> None:
    """Counting a verified pair's model configurations reads its labels; the default submit does it once per
    pair, in the submit that verifies it, and never for a label that leaves its pair unsettled."""
    kmb.admit()
    kmb.enqueue(4)
    alice, bob = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    first = kmb.claim(alice, 4)
    ids = [p["pair_id"] for p in first["pairs"]]
    assert _label_read_loops(kmb, queue.SUBMIT_SQL, _submit_params(alice.id, first["batch_id"], ids))["pair"] == 0
    assert kmb.submit(alice, first["batch_id"], {p: True for p in ids}).status_code == 200
    second = kmb.claim(bob, 4)
    # all four pairs get their second, agreeing label: each is verified and recounted once
    loops = _label_read_loops(kmb, queue.SUBMIT_SQL, _submit_params(bob.id, second["batch_id"], ids))
    assert loops["pair"] == 4, loops
    # the distinct-model variant recounts every pair it touches
    loops = _label_read_loops(kmb, queue.SUBMIT_DISTINCT_SQL, _submit_params(bob.id, second["batch_id"], ids[:3]))
    assert loops["pair"] == 3, loops
