"""The SQL that matters: enqueue, claim, submit, release, verification and quarantine, and the queue's counts.

Every request-path operation is one statement (one round trip) built from data-modifying CTEs, run in a
short transaction on a pooled connection. Parameters use psycopg's ``%(name)s`` style through
``exec_driver_sql`` so lists travel as PostgreSQL arrays and statements are prepared per connection.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypedDict, cast

import psycopg
from psycopg import AsyncCursor
from sqlalchemy import Connection

from kombinat_api.calibration import CALIBRATION, IsotonicCalibration, PlattCalibration, verdict
from kombinat_api.db import compact_sql
from kombinat_api.schemas import DEFAULT_PROMPT_VERSION

# --------------------------------------------------------------------------------------------------------
# Enqueue


def _merge_pairs_sql(source: str, honeypot: str, state: str) -> str:
    """The statement part both enqueue paths share: the new rows of ``source`` (pair_id, query, document, split,
    cycle, priority) into pair and pair_content, skipping pairs already there; selects how many were new."""
    return f"""
ins AS (
    INSERT INTO pair (pair_id, split, cycle, priority, is_honeypot, state)
    SELECT pair_id, split, cycle, priority, {honeypot}, {state}
    FROM {source}
    -- Stored hardest first, so the rows one claim takes (and their text) sit on few pages.
    ORDER BY priority DESC
    ON CONFLICT (pair_id) DO NOTHING
    RETURNING pair_id
), content AS (
    INSERT INTO pair_content (pair_id, query, document)
    SELECT s.pair_id, s.query, s.document FROM {source} s JOIN ins USING (pair_id)
    ORDER BY s.priority DESC
    ON CONFLICT (pair_id) DO NOTHING
)
SELECT count(*) FROM ins
"""


ENQUEUE_SQL = """
WITH input AS (
    SELECT * FROM json_to_recordset(%(pairs)s::json)
        AS t(pair_id uuid, query text, document text, split text, cycle text, priority float8)
),""" + _merge_pairs_sql("input", "%(honeypot)s", "CASE WHEN %(honeypot)s THEN 'honeypot' ELSE 'queued' END")


def enqueue_pairs(conn: Connection, pairs: Sequence[dict[str, Any]], honeypot: bool = False) -> int:
    """Insert pairs that are not there yet in one set-based statement; returns how many were new."""
    if not pairs:
        return 0
    # One JSON document instead of per-column arrays: the driver sends one string instead of dumping
    # every element in Python, and PostgreSQL unpacks it with json_to_recordset.
    rows = [
        {
            "pair_id": str(p["pair_id"]),
            "query": p["query"],
            "document": p["document"],
            "split": p.get("split", "honeypot"),
            "cycle": p.get("cycle", ""),
            "priority": float(p.get("priority", 0.0)),
        }
        for p in pairs
    ]
    row = conn.exec_driver_sql(ENQUEUE_SQL, {"pairs": json.dumps(rows), "honeypot": honeypot}).one()
    return int(row[0])


# Bulk enqueue for splits of millions of pairs: the rows stream into a session-local staging table by COPY
# (no JSON document to build, send and unpack: the wire format is PostgreSQL's own text rows), then one
# INSERT ... SELECT moves the new ones into pair and pair_content, hardest first, exactly as ENQUEUE_SQL does.
# Idempotent like it: pairs already there (or twice in one load) are skipped.
COPY_STAGE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS enqueue_stage (
    pair_id uuid NOT NULL, query text NOT NULL, document text NOT NULL, split text NOT NULL,
    cycle text NOT NULL, priority float8 NOT NULL
) ON COMMIT DELETE ROWS
"""
COPY_IN_SQL = "COPY enqueue_stage (pair_id, query, document, split, cycle, priority) FROM STDIN"
COPY_MERGE_SQL = "WITH" + _merge_pairs_sql("enqueue_stage", "false", "'queued'")

PairRow = tuple[uuid.UUID | str, str, str, str, str, float]


def copy_enqueue_pairs(conn: Connection, rows: Iterable[PairRow]) -> int:
    """Enqueue (pair_id, query, document, split, cycle, priority) rows through COPY; returns how many were new.

    Runs in the caller's transaction (the staging rows vanish at its commit). Memory stays flat for any number
    of rows: they stream to the server as they are produced.
    """
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection), "copy_enqueue_pairs needs a psycopg (3) connection"
    with driver.cursor() as cur:
        cur.execute(COPY_STAGE_SQL)
        with cur.copy(COPY_IN_SQL) as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(COPY_MERGE_SQL)
        merged = cur.fetchone()
        # ON COMMIT DELETE ROWS empties it at commit; emptied now too, for a caller that goes on in this transaction
        cur.execute("TRUNCATE enqueue_stage")
    return int(merged[0]) if merged else 0


HONEYPOT_GOLD_SQL = """
INSERT INTO honeypot (pair_id, relevant, grade, source)
SELECT t.pair_id, t.relevant, t.grade, t.source
FROM json_to_recordset(%(gold)s::json) AS t(pair_id uuid, relevant boolean, grade smallint, source text)
JOIN pair p ON p.pair_id = t.pair_id AND p.is_honeypot
ON CONFLICT (pair_id) DO NOTHING
"""


def enqueue_honeypots(conn: Connection, honeypots: Sequence[dict[str, Any]]) -> int:
    """Honeypots are pairs (same table, same ID space) in state 'honeypot' plus their gold judgment."""
    inserted = enqueue_pairs(
        conn, [{**h, "split": "honeypot", "cycle": "", "priority": 0.0} for h in honeypots], honeypot=True
    )
    if honeypots:
        gold = [
            {
                "pair_id": str(h["pair_id"]),
                "relevant": bool(h["relevant"]),
                "grade": h.get("grade"),
                "source": h.get("source", ""),
            }
            for h in honeypots
        ]
        conn.exec_driver_sql(HONEYPOT_GOLD_SQL, {"gold": json.dumps(gold)})
    return inserted


# --------------------------------------------------------------------------------------------------------
# Claim


def _servable_honeypots(side: str) -> str:
    """CLAIM_SQL's scan of the honeypots it may hand out, in key order, on one ``side`` ('>=' or '<') of hp_start's
    random point: the claim reads from the point up, then from the bottom up to it. Servable: never shown to this
    contributor, not retired (shown to hp_cap contributors already), and out with no other batch now (migration
    0005; rows are locked, or re-checked after the lock, so two claims at once never both take one). Both halves
    come from here so they cannot drift apart."""
    return f"""
        SELECT h.pair_id FROM honeypot h
        WHERE h.pair_id {side} (SELECT u FROM hp_start)
          AND NOT h.retired AND kombinat_hp_free(h.held_until)
          -- OFFSET 0 keeps both checks per-honeypot probes of (pair_id, contributor_id) keys: as anti joins
          -- the planner walked the whole label index or scanned all of batch_honeypot, costs that grew with
          -- every label and every batch stored.
          AND NOT EXISTS (SELECT 1 FROM batch_honeypot bh
                          WHERE bh.pair_id = h.pair_id AND bh.contributor_id = %(cid)s OFFSET 0)
          AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = h.pair_id AND l.contributor_id = %(cid)s
                          OFFSET 0)
        ORDER BY h.pair_id"""


RECONCILE_HONEYPOT_CAP_SQL = """
UPDATE honeypot SET retired = served >= %(cap)s WHERE retired IS DISTINCT FROM (served >= %(cap)s)
"""


def reconcile_honeypot_cap(conn: Connection, cap: int) -> int:
    """Retire exactly the honeypots served ``cap`` times or more (run at start-up: the claim retires a honeypot
    with the cap of its moment, so a raised cap brings retired ones back and a lowered one retires more)."""
    return conn.exec_driver_sql(RECONCILE_HONEYPOT_CAP_SQL, {"cap": cap}).rowcount


# Honeypots are drawn at random among those the contributor has never been shown (a share of the batch).
# Ordinary pairs fill the rest from two places, tried in order: pairs whose lease expired (their batch's
# real expiry, which chunk submissions extend, has passed too), then queued pairs by tier and priority.
# Both lock with SKIP LOCKED so concurrent claimers never wait on each other and never get the same row.
# The answer is sorted by pair_id, so the honeypots' position says nothing.
CLAIM_SQL = compact_sql(f"""
WITH async_commit AS (
    -- A claim lost in a database crash costs nothing: its pairs are simply still claimable and a label
    -- sent for the lost batch is refused, so this commit need not wait for the WAL flush.
    SELECT set_config('synchronous_commit', 'off', true) AS s
), m AS (
    -- the admitted model (at most one: the registry is unique on these three); its tier is NULL, so nothing is
    -- leased, when the registry wants another prompt wording than the claim's
    SELECT CASE WHEN prompt_version = %(prompt_version)s THEN tier END AS tier, prompt_version AS pv,
           calibration AS cal
    FROM model
    WHERE backend = %(backend)s AND model_id = %(model_id)s AND quantization = %(quantization)s AND admitted
), hp_start AS (
    SELECT gen_random_uuid() AS u
), hp_n AS (
    -- randomized rounding keeps the expected share exact for any batch size; one slot stays ordinary
    SELECT CASE WHEN (SELECT tier FROM m) IS NULL THEN 0
                ELSE least(floor(%(hp_expected)s + random())::int, %(n)s - 1) END AS k
), hp_hi AS (
    -- Honeypots from a random point of the (random) ID space onwards, wrapping around: an index range
    -- scan instead of sorting every honeypot by random() on each claim. Locked like ordinary pairs.
    {_servable_honeypots(">=")}
    LIMIT (SELECT k FROM hp_n)
    FOR UPDATE OF h SKIP LOCKED
), hp_lo AS (
    {_servable_honeypots("<")}
    LIMIT (SELECT k FROM hp_n) - (SELECT count(*) FROM hp_hi)
    FOR UPDATE OF h SKIP LOCKED
), hp_pick AS (
    SELECT pair_id FROM hp_hi UNION ALL SELECT pair_id FROM hp_lo
), exp AS (
    SELECT p.pair_id, p.ctid AS tid FROM pair p
    WHERE p.state = 'leased' AND p.lease_expires_at < now() AND p.tier <= (SELECT tier FROM m)
      AND NOT EXISTS (SELECT 1 FROM batch b WHERE b.batch_id = p.lease_batch_id
                      AND b.expires_at > now() AND b.released_at IS NULL)
      AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = p.pair_id AND l.contributor_id = %(cid)s
                      OFFSET 0)
    ORDER BY p.lease_expires_at
    LIMIT %(n)s - (SELECT count(*) FROM hp_pick)
    FOR UPDATE OF p SKIP LOCKED
), fresh AS (
    SELECT p.pair_id, p.ctid AS tid FROM pair p
    WHERE p.state = 'queued' AND p.tier <= (SELECT tier FROM m)
      -- a per-row probe of the label key (OFFSET 0 keeps it one): as an anti join, the generic plan made
      -- while label was small materialized every label of the contributor and compared each candidate
      -- with all of them, a claim that grew slower with every label the contributor sent
      AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = p.pair_id AND l.contributor_id = %(cid)s
                      OFFSET 0)
    ORDER BY p.tier DESC, p.priority DESC
    LIMIT greatest(%(n)s - (SELECT count(*) FROM hp_pick) - (SELECT count(*) FROM exp), 0)
    FOR UPDATE OF p SKIP LOCKED
), picked AS (
    SELECT pair_id, tid FROM exp UNION ALL SELECT pair_id, tid FROM fresh
), hp AS (
    -- never a batch of honeypots alone: with no ordinary pair to hide among they would be obvious
    SELECT pair_id FROM hp_pick WHERE EXISTS (SELECT 1 FROM picked)
), hpi AS (
    -- Two concurrent claims of one contributor may draw the same honeypot; the later one leaves it out
    -- (handing it out unrecorded would make its label a tell-tale refusal).
    INSERT INTO batch_honeypot (batch_id, pair_id, contributor_id)
    SELECT %(bid)s, pair_id, %(cid)s FROM hp
    ON CONFLICT (pair_id, contributor_id) DO NOTHING
    RETURNING pair_id
), hp_hold AS (
    -- one more contributor has seen it, and it is this batch's until answered, released or expired
    -- (triggers of migration 0005 free it and follow the batch's lease)
    UPDATE honeypot h SET served = h.served + 1, retired = h.served + 1 >= %(hp_cap)s, held_by = %(bid)s,
                          held_until = now() + make_interval(secs => %(lease)s)
    WHERE h.pair_id = ANY(ARRAY(SELECT pair_id FROM hpi))
    RETURNING 1
), nb AS (
    -- the batch keeps the registry's prompt version and calibration of this moment: its labels are judged
    -- with them whatever the registry says later (routes/work.py)
    INSERT INTO batch (batch_id, contributor_id, backend, model_id, quantization, annotator_version, tier,
                       size, n_honeypots, expires_at, prompt_version, calibration)
    SELECT %(bid)s, %(cid)s, %(backend)s, %(model_id)s, %(quantization)s, %(annotator_version)s,
           (SELECT tier FROM m), (SELECT count(*) FROM picked), (SELECT count(*) FROM hpi),
           now() + make_interval(secs => %(lease)s), %(prompt_version)s, (SELECT cal FROM m)
    WHERE EXISTS (SELECT 1 FROM picked)
    RETURNING expires_at
), leased AS (
    UPDATE pair p SET state = 'leased', lease_batch_id = %(bid)s,
                      lease_expires_at = now() + make_interval(secs => %(lease)s)
    -- The rows are locked by this statement, so their physical addresses are stable: a TID scan updates
    -- them without searching the primary key again (a join here even drifted into a full table scan).
    WHERE p.ctid = ANY(ARRAY(SELECT tid FROM picked))
    RETURNING p.pair_id
)
SELECT h.tier, h.expires_at, c.pair_id, c.query, c.document, h.pv
FROM (SELECT (SELECT tier FROM m) AS tier, (SELECT pv FROM m) AS pv,
             coalesce((SELECT expires_at FROM nb), now() + make_interval(secs => %(lease)s)) AS expires_at,
             (SELECT s FROM async_commit) AS s) h
LEFT JOIN pair_content c
    ON c.pair_id = ANY(ARRAY(SELECT pair_id FROM leased UNION ALL SELECT pair_id FROM hpi))
ORDER BY c.pair_id
""")


@dataclass
class ClaimResult:
    admitted: bool
    batch_id: uuid.UUID
    expires_at: datetime
    pairs: list[dict[str, Any]] = field(default_factory=list)
    # the prompt version the registry wants for an admitted model (None: the model is not admitted); a claim
    # made with another one is refused (admitted is False) and leases nothing
    registry_prompt_version: str | None = None


async def claim(
    cur: AsyncCursor[Any],
    contributor_id: int,
    size: int,
    model: dict[str, str],
    lease_seconds: int,
    honeypot_fraction: float,
    honeypot_max_exposure: int,
) -> ClaimResult:
    """Lease up to ``size`` pairs (honeypots included) to the contributor in one statement; a honeypot goes to at
    most ``honeypot_max_exposure`` contributors in all."""
    batch_id = uuid.uuid4()
    fraction = min(max(honeypot_fraction, 0.0), 0.9)
    await cur.execute(
        CLAIM_SQL,
        {
            "backend": model["backend"],
            "model_id": model["model_id"],
            "quantization": model["quantization"],
            "annotator_version": model.get("annotator_version", ""),
            "prompt_version": model.get("prompt_version", DEFAULT_PROMPT_VERSION),
            "cid": contributor_id,
            "n": size,
            "hp_expected": size * fraction,
            "hp_cap": honeypot_max_exposure,
            "bid": batch_id,
            "lease": float(lease_seconds),
        },
    )
    rows = await cur.fetchall()
    tier, expires_at, registry_prompt_version = rows[0][0], rows[0][1], rows[0][5]
    if tier is None:
        return ClaimResult(False, batch_id, expires_at, registry_prompt_version=registry_prompt_version)
    pairs = [{"pair_id": r[2], "query": r[3], "document": r[4]} for r in rows if r[2] is not None]
    return ClaimResult(True, batch_id, expires_at, pairs, registry_prompt_version)


# --------------------------------------------------------------------------------------------------------
# Submit

# Classification of the chunk's pairs: already labeled by the caller (a retry: a duplicate, ignored),
# leased to this batch (ordinary) or handed out with it (honeypot), or neither (refused: the whole chunk
# is rejected, nothing is written). Accepted labels of ordinary pairs end the pair's lease and move its
# verification forward through kombinat_next(); the batch's lease is extended.
# A label's model (and prompt version) is the batch's, as the claim admitted it. Its ``relevant`` and
# ``p_calibrated`` come in already decided by kombinat when the batch has a calibration (routes/work.py applies
# kombinat_api/calibration.py); everything below (counts, honeypot check, reputation) reads that verdict.
# Two variants (one prepared statement each) differ only in how a pair's tallies are brought up to date:
# - labels (the default): incrementally, from the pair's counters; the pair's labels are read only in the
#   submit that verifies it, to count the model configurations that agree (n_model_configs);
# - distinct models (KOMBINAT_QUORUM_DISTINCT_MODELS): every label recounts its pair with kombinat_count(), the
#   same recount the recomputation runs, since a configuration's vote depends on its other labels there.
#   The recount reads the pair's labels as of this statement's snapshot: a quarantine that commits while the
#   submit waits for the pair's lock is not seen by it (the incremental counters of the default variant are
#   re-read after the lock and are); the pair is right again at its next recount.
_SUBMIT_TEMPLATE = """
WITH durable AS (
    -- Labels are acknowledged to the annotator, which then forgets them: this commit waits for the WAL
    -- flush even if the same transaction's token check turned synchronous commit off.
    SELECT set_config('synchronous_commit', 'on', true) AS s
), inp AS (
    SELECT * FROM json_to_recordset(%(labels)s::json) AS t(pair_id uuid, relevant boolean, p_relevant real,
        p_calibrated real, grade smallint, truncated boolean, seconds real)
), b AS (
    SELECT *, (expires_at > now() AND released_at IS NULL) AS live
    FROM batch WHERE batch_id = %(bid)s
    FOR UPDATE
), me AS (
    SELECT good_standing FROM contributor WHERE id = %(cid)s
), dup AS (
    -- per-label probes of the label key: as a join, the generic plan (made while label was small) read the
    -- whole key index for the contributor's labels on every chunk, a cost that grew with every label stored
    SELECT inp.pair_id FROM inp
    WHERE EXISTS (SELECT 1 FROM label l WHERE l.pair_id = inp.pair_id AND l.contributor_id = %(cid)s OFFSET 0)
), own_p AS (
    -- the chunk's pairs by primary key, kept where this batch holds their lease
    SELECT p.pair_id FROM inp JOIN pair p USING (pair_id)
    WHERE p.lease_batch_id = %(bid)s AND NOT EXISTS (SELECT 1 FROM dup WHERE dup.pair_id = p.pair_id)
    FOR UPDATE OF p
), own_h AS (
    SELECT bh.pair_id FROM batch_honeypot bh JOIN inp USING (pair_id)
    WHERE bh.batch_id = %(bid)s AND NOT bh.released
      AND NOT EXISTS (SELECT 1 FROM dup WHERE dup.pair_id = bh.pair_id)
), chk AS (
    SELECT (SELECT count(*) FROM inp) AS n_in,
           (SELECT count(*) FROM dup) AS n_dup,
           (SELECT count(*) FROM own_p) + (SELECT count(*) FROM own_h) AS n_own,
           (SELECT contributor_id FROM b) AS owner,
           coalesce((SELECT live FROM b), false) AS live
), ok AS (
    SELECT owner = %(cid)s AND n_own + n_dup = n_in AND (live OR n_own = 0) AS ok FROM chk
), ins AS (
    INSERT INTO label (pair_id, contributor_id, batch_id, relevant, p_relevant, p_calibrated, grade, truncated,
                       seconds, backend, model_id, quantization, prompt_version, annotator_version, tier,
                       is_honeypot, quarantined)
    SELECT i.pair_id, %(cid)s, %(bid)s, i.relevant, i.p_relevant, i.p_calibrated, i.grade,
           coalesce(i.truncated, false), coalesce(i.seconds, 0), b.backend, b.model_id, b.quantization,
           b.prompt_version, %(annotator_version)s, b.tier, o.is_honeypot, b.quarantined
    FROM inp i
    JOIN (SELECT pair_id, false AS is_honeypot FROM own_p UNION ALL SELECT pair_id, true FROM own_h) o
        USING (pair_id)
    CROSS JOIN b
    WHERE (SELECT ok FROM ok)
    ON CONFLICT (pair_id, contributor_id) DO NOTHING
    RETURNING pair_id, relevant, coalesce(p_calibrated, p_relevant) AS p, model_id AS m, quantization AS q,
              prompt_version AS v, is_honeypot, quarantined
), d AS (
    -- me as a join, not a sub-select: the tallies stay plain columns, and only then does the planner inline
    -- kombinat_next() below instead of calling it once per label. rel: the verdict if the label counts.
    SELECT ins.*, x.c::int AS dn, (x.c AND ins.relevant)::int AS dr, CASE WHEN x.c THEN ins.p ELSE 0 END AS dp,
           CASE WHEN x.c THEN ins.relevant END AS rel
    FROM ins CROSS JOIN me CROSS JOIN LATERAL (SELECT NOT ins.quarantined AND me.good_standing AS c) x
    WHERE NOT ins.is_honeypot
), upd AS (
    UPDATE pair p SET
        -- kombinat_next's columns in its order, then the two that depend on its outcome
        (status, state, tier, n_labels, n_relevant, n_votes, n_votes_relevant, p_sum, n_model_configs,
         resolved_at) = (
            SELECT f.*,
                   CASE WHEN f.status = 'verified' THEN {configs} END,
                   CASE WHEN f.state = 'done' THEN now() END
            FROM {tally} t,
                 kombinat_next(t.n, t.r, {votes}, t.ps, p.tier, %(min_agree)s, %(max_per_tier)s, %(max_tier)s) f),
        lease_batch_id = NULL,
        lease_expires_at = NULL
    FROM d WHERE p.pair_id = d.pair_id
    RETURNING p.pair_id, p.status
), bu AS (
    UPDATE batch SET expires_at = now() + make_interval(secs => %(lease)s),
                     n_labeled = n_labeled + (SELECT count(*) FROM ins),
                     -- only a wrong honeypot answer can push a batch below the accuracy bar, so the
                     -- follow-up check runs for batches that have one and skips the rest
                     hp_wrong = hp_wrong + (SELECT count(*) FROM ins JOIN honeypot h USING (pair_id)
                                            WHERE ins.is_honeypot AND ins.relevant <> h.relevant)
    WHERE batch_id = %(bid)s AND (SELECT ok FROM ok) AND (SELECT live FROM chk)
    RETURNING expires_at, n_labeled, size + n_honeypots AS total, hp_wrong
)
SELECT chk.n_in, chk.n_dup, chk.n_own, chk.owner, chk.live, ok.ok,
       (SELECT count(*) FROM ins) AS accepted,
       (SELECT count(*) FROM ins WHERE is_honeypot) AS honeypots,
       coalesce((SELECT expires_at FROM bu), (SELECT expires_at FROM b)) AS expires_at,
       (SELECT n_labeled FROM bu) AS n_labeled,
       (SELECT total FROM bu) AS total,
       (SELECT array_agg(pair_id) FROM upd WHERE status = 'escalated') AS escalated,
       (SELECT s FROM durable) AS durable,
       coalesce((SELECT hp_wrong FROM bu), 0) AS hp_wrong
FROM chk, ok
"""

# The new label in kombinat_count()'s arguments: the statement cannot see its own insert.
_NEW_LABEL = "d.m, d.q, d.v, d.rel, d.p"
SUBMIT_SQL = compact_sql(
    _SUBMIT_TEMPLATE.format(
        tally="(SELECT p.n_labels + d.dn AS n, p.n_relevant + d.dr AS r, p.p_sum + d.dp AS ps)",
        votes="t.n, t.r",
        # a sub-select in a CASE branch runs only when the branch is taken: once per pair, when it is verified
        configs=f"(SELECT c.a FROM kombinat_count(p.pair_id, p.tier, false, {_NEW_LABEL}) c)",
    )
)
SUBMIT_DISTINCT_SQL = compact_sql(
    _SUBMIT_TEMPLATE.format(
        tally=f"kombinat_count(p.pair_id, p.tier, true, {_NEW_LABEL})", votes="t.vn, t.vr", configs="t.a"
    )
)


@dataclass
class SubmitResult:
    outcome: str  # ok | not_found | forbidden | foreign | expired
    accepted: int = 0
    duplicates: int = 0
    expires_at: datetime | None = None
    honeypots: int = 0
    batch_complete: bool = False
    escalated: list[uuid.UUID] = field(default_factory=list)
    # honeypots of the batch answered wrong so far (this chunk included)
    honeypots_wrong: int = 0

    @property
    def needs_honeypot_check(self) -> bool:
        """Whether this chunk can have moved the batch's honeypot verdict: it answered honeypots or finished
        the batch, and the batch has a wrong answer (without one its accuracy is perfect)."""
        return (self.honeypots > 0 or self.batch_complete) and self.honeypots_wrong > 0


async def submit(
    cur: AsyncCursor[Any],
    contributor_id: int,
    batch_id: uuid.UUID,
    labels_json: str,
    model: dict[str, str],
    lease_seconds: int,
    min_agreement: float,
    max_labels_per_tier: int,
    max_tier: int,
    distinct_models: bool = False,
) -> SubmitResult:
    """``labels_json``: a JSON array of {pair_id, relevant, p_relevant, p_calibrated, grade, truncated, seconds}
    (``render_labels``); ``model`` gives the annotator_version (the model itself is the batch's)."""
    await cur.execute(
        SUBMIT_DISTINCT_SQL if distinct_models else SUBMIT_SQL,
        {
            "labels": labels_json,
            "bid": batch_id,
            "cid": contributor_id,
            "annotator_version": model.get("annotator_version", ""),
            "lease": float(lease_seconds),
            "min_agree": float(min_agreement),
            "max_per_tier": int(max_labels_per_tier),
            "max_tier": int(max_tier),
        },
    )
    row = await cur.fetchone()
    assert row is not None
    n_dup, owner, live, ok = row[1], row[3], row[4], row[5]
    if owner is None:
        return SubmitResult("not_found")
    if owner != contributor_id:
        return SubmitResult("forbidden")
    if not ok:
        # Pairs that are not in the lease: with a live batch that is the caller's error; with a dead one
        # the lease ran out (or was released) and its pairs may already belong to someone else.
        return SubmitResult("expired" if not live else "foreign", duplicates=n_dup)
    return SubmitResult(
        "ok",
        accepted=int(row[6]),
        duplicates=int(n_dup),
        expires_at=row[8],
        honeypots=int(row[7]),
        batch_complete=row[9] is not None and row[10] is not None and row[9] >= row[10] and row[6] > 0,
        escalated=list(row[11] or []),
        honeypots_wrong=int(row[13]),
    )


# The model a batch was claimed with, as the claim stored it. Immutable for the batch's lifetime, so a replica
# may keep it in memory (BatchModelCache) instead of reading it for every chunk.
BATCH_MODEL_SQL = """
SELECT contributor_id, backend, model_id, quantization, prompt_version, calibration FROM batch WHERE batch_id = %(bid)s
"""


@dataclass(frozen=True)
class BatchModel:
    contributor_id: int
    backend: str
    model_id: str
    quantization: str
    prompt_version: str
    calibration: PlattCalibration | IsotonicCalibration | None

    def mismatch(self, model: dict[str, str]) -> str | None:
        """What in a chunk's ``model`` differs from the batch's (None: nothing), as a sentence."""
        ours = (self.backend, self.model_id, self.quantization, self.prompt_version)
        theirs = (
            model["backend"],
            model["model_id"],
            model["quantization"],
            model.get("prompt_version", DEFAULT_PROMPT_VERSION),
        )
        if ours == theirs:
            return None
        return (
            f"This batch was claimed with {'/'.join(ours[:3])} and prompt version {ours[3]}, but the labels say "
            f"{'/'.join(theirs[:3])} and prompt version {theirs[3]}; labels are only comparable when they are "
            "made as claimed: claim a new batch with the model and prompt you run."
        )


async def batch_model(cur: AsyncCursor[Any], batch_id: uuid.UUID) -> BatchModel | None:
    """The batch's model, prompt version and calibration as claimed (None: no such batch)."""
    await cur.execute(BATCH_MODEL_SQL, {"bid": batch_id})
    row = await cur.fetchone()
    if row is None:
        return None
    calibration = None if row[5] is None else CALIBRATION.validate_python(row[5])
    return BatchModel(row[0], row[1], row[2], row[3], row[4], calibration)


class BatchModelCache:
    """Batch models a replica has read, oldest dropped first past ``capacity`` (a lease lasts minutes, and a miss
    costs one key lookup in the chunk's own transaction)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._items: dict[uuid.UUID, BatchModel] = {}

    def get(self, batch_id: uuid.UUID) -> BatchModel | None:
        return self._items.get(batch_id)

    def put(self, batch_id: uuid.UUID, model: BatchModel) -> None:
        if len(self._items) >= self.capacity:
            # dicts keep insertion order: drop the oldest tenth at once, not one entry per insert
            for key in list(itertools.islice(self._items, max(1, self.capacity // 10))):
                del self._items[key]
        self._items[batch_id] = model


def render_calibrated(labels: Sequence[Any], calibration: PlattCalibration | IsotonicCalibration) -> str:
    """A chunk's labels (``LabelIn``) as SUBMIT_SQL reads them, judged by kombinat: each one's ``relevant`` is
    p_cal >= threshold (the annotator's own verdict is dropped) and p_cal travels as ``p_calibrated``."""
    rows = []
    for lab in labels:
        p_cal, relevant = verdict(calibration, lab.p_relevant)
        rows.append(
            {"pair_id": str(lab.pair_id), "relevant": relevant, "p_relevant": lab.p_relevant, "p_calibrated": p_cal,
             "grade": lab.grade, "truncated": lab.truncated, "seconds": lab.seconds}
        )  # fmt: skip
    return json.dumps(rows)


# --------------------------------------------------------------------------------------------------------
# Release

RELEASE_SQL = compact_sql("""
WITH b AS (
    SELECT batch_id, contributor_id FROM batch WHERE batch_id = %(bid)s FOR UPDATE
), rp AS (
    UPDATE pair p SET state = 'queued', lease_batch_id = NULL, lease_expires_at = NULL
    WHERE p.lease_batch_id = %(bid)s AND p.state = 'leased'
      AND (%(all)s OR p.pair_id = ANY(%(ids)s::uuid[]))
      AND (SELECT contributor_id FROM b) = %(cid)s
    RETURNING 1
), rh AS (
    UPDATE batch_honeypot bh SET released = true
    WHERE bh.batch_id = %(bid)s AND NOT bh.released
      AND (%(all)s OR bh.pair_id = ANY(%(ids)s::uuid[]))
      AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = bh.pair_id AND l.contributor_id = %(cid)s
                      OFFSET 0)
      AND (SELECT contributor_id FROM b) = %(cid)s
    RETURNING 1
), bu AS (
    UPDATE batch SET released_at = now()
    WHERE batch_id = %(bid)s AND %(all)s AND contributor_id = %(cid)s AND released_at IS NULL
    RETURNING 1
)
SELECT (SELECT contributor_id FROM b), (SELECT count(*) FROM rp) + (SELECT count(*) FROM rh)
""")


async def release(
    cur: AsyncCursor[Any], contributor_id: int, batch_id: uuid.UUID, pair_ids: Sequence[uuid.UUID] | None
) -> tuple[str, int]:
    await cur.execute(
        RELEASE_SQL,
        {"bid": batch_id, "cid": contributor_id, "all": pair_ids is None, "ids": list(pair_ids or [])},
    )
    row = await cur.fetchone()
    assert row is not None
    if row[0] is None:
        return "not_found", 0
    if row[0] != contributor_id:
        return "forbidden", 0
    return "ok", int(row[1])


# --------------------------------------------------------------------------------------------------------
# Verification recomputation and quarantine

LOCK_PAIRS_SQL = """
SELECT pair_id FROM pair WHERE pair_id = ANY(%(ids)s::uuid[]) AND NOT is_honeypot ORDER BY pair_id FOR UPDATE
"""

# Runs after LOCK_PAIRS_SQL in the same transaction: with the rows locked, this statement's fresh snapshot
# sees their latest versions, so the recount cannot race a concurrent submit. The tallies come from
# kombinat_count(), the recount the distinct-model submit runs too, and the outcome from the same kombinat_next().
RECOMPUTE_SQL = """
UPDATE pair p SET
    (status, state, tier, n_labels, n_relevant, n_votes, n_votes_relevant, p_sum, n_model_configs, resolved_at) = (
        SELECT f.status,
               -- a pair that still needs labels keeps a live lease it has
               CASE WHEN f.state = 'queued' AND p.lease_batch_id IS NOT NULL THEN 'leased' ELSE f.state END,
               f.new_tier, f.n_labels, f.n_relevant, f.n_votes, f.n_votes_relevant, f.p_sum,
               CASE WHEN f.status = 'verified' THEN t.a END,
               CASE WHEN f.state = 'done' THEN coalesce(p.resolved_at, now()) END
        FROM kombinat_count(p.pair_id, p.tier, %(distinct)s, NULL, NULL, NULL, NULL, NULL) t,
             kombinat_next(t.n, t.r, t.vn, t.vr, t.ps, p.tier, %(min_agree)s, %(max_per_tier)s, %(max_tier)s) f)
WHERE p.pair_id = ANY(%(ids)s::uuid[]) AND NOT p.is_honeypot
RETURNING p.pair_id, p.status
"""


def recompute_pairs(
    conn: Connection,
    pair_ids: Sequence[uuid.UUID],
    min_agreement: float,
    max_labels_per_tier: int,
    max_tier: int,
    distinct_models: bool = False,
) -> dict[uuid.UUID, str]:
    """Recount the verification state of ``pair_ids`` from their labels that count right now.

    Escalation is sticky (a pair never drops back a tier); an escalated pair is recounted again so labels
    that already exist at its new tier count there. ``distinct_models``: the quorum counts model
    configurations, not labels (Settings.quorum_distinct_models).
    """
    statuses: dict[uuid.UUID, str] = {}
    todo = list(dict.fromkeys(pair_ids))
    for _round in range(4):
        if not todo:
            break
        params = {
            "ids": todo,
            "distinct": bool(distinct_models),
            "min_agree": float(min_agreement),
            "max_per_tier": int(max_labels_per_tier),
            "max_tier": int(max_tier),
        }
        conn.exec_driver_sql(LOCK_PAIRS_SQL, {"ids": todo})
        rows = conn.exec_driver_sql(RECOMPUTE_SQL, params).all()
        todo = []
        for pid, status in rows:
            if status == "escalated" and statuses.get(pid) != "escalated":
                todo.append(pid)
            statuses[pid] = status
    return statuses


HONEYPOT_CHECK_SQL = """
SELECT b.contributor_id, b.quarantined,
       (SELECT count(*) FROM batch_honeypot bh WHERE bh.batch_id = b.batch_id
            AND (NOT bh.released OR EXISTS (SELECT 1 FROM label l WHERE l.batch_id = b.batch_id
                                             AND l.pair_id = bh.pair_id))) AS expected,
       (SELECT count(*) FROM label l WHERE l.batch_id = b.batch_id AND l.is_honeypot) AS answered,
       (SELECT count(*) FROM label l JOIN honeypot h ON h.pair_id = l.pair_id
            WHERE l.batch_id = b.batch_id AND l.is_honeypot AND l.relevant = h.relevant) AS correct,
       hist.answered, hist.correct
FROM batch b
-- the contributor's honeypot record in its previous batches (through batch_contributor and label_batch)
CROSS JOIN LATERAL (
    SELECT count(*) AS answered, count(*) FILTER (WHERE l.relevant = h.relevant) AS correct
    FROM (SELECT batch_id FROM batch pb
          WHERE pb.contributor_id = b.contributor_id AND pb.created_at < b.created_at
          ORDER BY pb.created_at DESC LIMIT %(history)s) pb
    JOIN label l ON l.batch_id = pb.batch_id AND l.is_honeypot
    JOIN honeypot h ON h.pair_id = l.pair_id
) hist
WHERE b.batch_id = %(bid)s
"""

QUARANTINE_SQL = """
WITH b AS (
    UPDATE batch SET quarantined = true WHERE batch_id = %(bid)s AND NOT quarantined RETURNING batch_id
), l AS (
    UPDATE label SET quarantined = true
    WHERE batch_id = %(bid)s AND EXISTS (SELECT 1 FROM b) AND NOT quarantined
    RETURNING pair_id, is_honeypot
)
SELECT (SELECT count(*) FROM b), array_agg(pair_id) FILTER (WHERE NOT is_honeypot) FROM l
"""


@dataclass
class HoneypotVerdict:
    contributor_id: int
    expected: int
    answered: int
    correct: int
    quarantined: bool
    newly_quarantined: bool = False
    touched_pairs: list[uuid.UUID] = field(default_factory=list)
    history_answered: int = 0
    history_correct: int = 0


@functools.lru_cache(maxsize=4096)
def implausible_misses(n: int, honest_accuracy: float, alpha: float) -> int:
    """The fewest wrong answers out of ``n`` that an honest contributor (each answer right with probability
    ``honest_accuracy``, independently) gives with probability below ``alpha`` (the honeypot quarantine test and
    trust.py's agreement test): P(X >= k) < alpha for
    X ~ Binomial(n, 1 - honest_accuracy). ``n + 1`` when even n wrong answers are not that unlikely.
    Terms are summed in log space: a reputation window holds thousands of comparisons, where comb(n, k) times a
    float would overflow."""
    p = 1.0 - honest_accuracy
    log_p, log_q = math.log(p), math.log1p(-p)
    tail = 1.0  # P(X >= k), from k = 0 upwards
    for k in range(n + 1):
        if tail < alpha:
            return k
        log_term = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
        tail -= math.exp(log_term)
    return n + 1


def check_batch_honeypots(
    conn: Connection, batch_id: uuid.UUID, honest_accuracy: float, alpha: float, history_batches: int
) -> HoneypotVerdict | None:
    """Quarantine the batch as soon as its contributor's honeypot answers — this batch's so far and those of its
    previous ``history_batches`` batches — reject "accuracy >= honest_accuracy" at level ``alpha``.

    A test over the record rather than a bar on one batch: a batch of 14 honeypots with 2 misses is what an honest
    contributor at 90 % gives one time in six, and that must not cost its labels; evidence across batches catches
    a bad contributor even when each of its batches is small. Deciding before every honeypot is answered means
    the rest of a bad batch's labels are stored quarantined from the start instead of counting and being
    recounted later.
    """
    row = conn.exec_driver_sql(HONEYPOT_CHECK_SQL, {"bid": batch_id, "history": history_batches}).one_or_none()
    if row is None:
        return None
    verdict = HoneypotVerdict(
        contributor_id=row[0], quarantined=row[1], expected=row[2], answered=row[3], correct=row[4],
        history_answered=row[5], history_correct=row[6],
    )  # fmt: skip
    if verdict.quarantined or verdict.answered == 0:
        return verdict
    n = verdict.answered + verdict.history_answered
    wrong = n - verdict.correct - verdict.history_correct
    if wrong >= implausible_misses(n, honest_accuracy, alpha):
        q = conn.exec_driver_sql(QUARANTINE_SQL, {"bid": batch_id}).one()
        verdict.quarantined = True
        verdict.newly_quarantined = bool(q[0])
        verdict.touched_pairs = list(q[1] or [])
    return verdict


# --------------------------------------------------------------------------------------------------------
# Counts (honeypots left out of every pair count; ``pair`` has no index for them, so each is one table scan)

# What a pair counts as, per split × cycle: SPLITS_SQL and SPLIT_COUNTS_SQL share these columns so a number
# means the same in the public statistics, ``kombinat stats`` and the demo. An escalated pair's counters
# start again at its new tier, so "labeled" looks at its status too.
PAIR_COUNT_COLUMNS = """
       count(*) AS pairs,
       count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'leased') AS leased,
       count(*) FILTER (WHERE n_labels > 0 OR status <> 'new') AS labeled,
       count(*) FILTER (WHERE status = 'verified') AS verified,
       count(*) FILTER (WHERE status = 'disputed') AS disputed,
       count(*) FILTER (WHERE status = 'escalated') AS escalated,
       count(*) FILTER (WHERE status = 'unresolved') AS unresolved"""


class PairCounts(TypedDict):
    """The ordinary pairs of a split × cycle (PAIR_COUNT_COLUMNS)."""

    pairs: int
    queued: int
    leased: int
    labeled: int
    verified: int
    disputed: int
    escalated: int
    unresolved: int


class SplitSummary(PairCounts):
    """One row of SPLITS_SQL."""

    split: str
    cycle: str
    compared: int  # pairs with at least 2 counted labels
    agreement_sum: float  # over the compared pairs: the majority's share of each one's counted labels


# Agreement of a pair = the majority's share of its counted labels; it means something once ≥ 2 labels
# were compared, so the mean is taken over those pairs only (sum and count travel, the mean is derived).
SPLITS_SQL = f"""
SELECT split, cycle,{PAIR_COUNT_COLUMNS},
       count(*) FILTER (WHERE n_labels >= 2) AS compared,
       coalesce(sum(greatest(n_relevant, n_labels - n_relevant)::float8 / n_labels)
                FILTER (WHERE n_labels >= 2), 0) AS agreement_sum
FROM pair WHERE NOT is_honeypot
GROUP BY split, cycle ORDER BY split, cycle
"""


def split_summaries(conn: Connection) -> list[SplitSummary]:
    """Every split × cycle that has pairs, in order, with its counts (the public statistics' main query)."""
    return [cast(SplitSummary, dict(row)) for row in conn.exec_driver_sql(SPLITS_SQL).mappings()]


class SplitCounts(PairCounts):
    """One split × cycle's pairs and labels, and the honeypots of all splits (SPLIT_COUNTS_SQL)."""

    labels: int  # labels of the split × cycle's ordinary pairs
    honeypots: int
    honeypot_labels: int  # answers to honeypots


SPLIT_COUNTS_SQL = f"""
WITH p AS (
    SELECT{PAIR_COUNT_COLUMNS}
    FROM pair WHERE NOT is_honeypot AND split = %(split)s AND cycle = %(cycle)s
)
SELECT p.*,
       (SELECT count(*) FROM label l JOIN pair lp ON lp.pair_id = l.pair_id
            WHERE NOT l.is_honeypot AND lp.split = %(split)s AND lp.cycle = %(cycle)s) AS labels,
       (SELECT count(*) FROM honeypot) AS honeypots,
       (SELECT count(*) FROM label WHERE is_honeypot) AS honeypot_labels
FROM p
"""


def split_counts(conn: Connection, split: str, cycle: str) -> SplitCounts:
    """What is stored for one split × cycle (all zeros for one that has no pairs yet)."""
    row = conn.exec_driver_sql(SPLIT_COUNTS_SQL, {"split": split, "cycle": cycle}).mappings().one()
    return cast(SplitCounts, {key: int(value) for key, value in row.items()})


LABELS_PER_CONTRIBUTOR_SQL = """
SELECT c.login, count(*) FROM label l JOIN contributor c ON c.id = l.contributor_id GROUP BY c.login
"""


def labels_per_contributor(conn: Connection) -> dict[str, int]:
    """Labels stored per contributor login, honeypot answers and quarantined labels included."""
    return {login: int(n) for login, n in conn.exec_driver_sql(LABELS_PER_CONTRIBUTOR_SQL).all()}


def labels_stored(conn: Connection) -> int:
    """Every label stored, honeypot answers and quarantined labels included."""
    return int(conn.exec_driver_sql("SELECT count(*) FROM label").scalar_one())
