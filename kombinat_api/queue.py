"""The SQL that matters: enqueue, claim, submit, release, verification and quarantine, and the queue's counts.

Every request-path operation is one statement (one round trip) built from data-modifying CTEs, run in a
short transaction on a pooled connection. Parameters use psycopg's ``%(name)s`` style through
``exec_driver_sql`` so lists travel as PostgreSQL arrays and statements are prepared per connection.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypedDict, cast

from psycopg import AsyncCursor
from sqlalchemy import Connection

from kombinat_api.db import compact_sql

# --------------------------------------------------------------------------------------------------------
# Enqueue


ENQUEUE_SQL = """
WITH input AS (
    SELECT * FROM json_to_recordset(%(pairs)s::json)
        AS t(pair_id uuid, query text, document text, split text, cycle text, priority float8)
), ins AS (
    INSERT INTO pair (pair_id, split, cycle, priority, is_honeypot, state)
    SELECT pair_id, split, cycle, priority, %(honeypot)s,
           CASE WHEN %(honeypot)s THEN 'honeypot' ELSE 'queued' END
    FROM input
    -- Stored hardest first, so the rows one claim takes (and their text) sit on few pages.
    ORDER BY priority DESC
    ON CONFLICT (pair_id) DO NOTHING
    RETURNING pair_id
), content AS (
    INSERT INTO pair_content (pair_id, query, document)
    SELECT i.pair_id, i.query, i.document FROM input i JOIN ins USING (pair_id)
    ORDER BY i.priority DESC
    ON CONFLICT (pair_id) DO NOTHING
)
SELECT count(*) FROM ins
"""


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


def _unseen_honeypots(side: str) -> str:
    """CLAIM_SQL's scan of the honeypots the contributor has never been shown, in key order, on one ``side``
    ('>=' or '<') of hp_start's random point: the claim reads from the point up, then from the bottom up to it.
    Both halves come from here so they cannot drift apart; the statement sent is the same literal text."""
    return f"""
        (SELECT h.pair_id FROM honeypot h
         WHERE h.pair_id {side} (SELECT u FROM hp_start) AND (SELECT tier FROM m) IS NOT NULL
           -- OFFSET 0 keeps both checks per-honeypot probes of (pair_id, contributor_id) keys: as anti joins
           -- the planner walked the whole label index or scanned all of batch_honeypot, costs that grew with
           -- every label and every batch stored.
           AND NOT EXISTS (SELECT 1 FROM batch_honeypot bh
                           WHERE bh.pair_id = h.pair_id AND bh.contributor_id = %(cid)s OFFSET 0)
           AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = h.pair_id AND l.contributor_id = %(cid)s
                           OFFSET 0)
         ORDER BY h.pair_id LIMIT %(n)s)"""


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
    SELECT max(tier) AS tier FROM model
    WHERE backend = %(backend)s AND model_id = %(model_id)s AND quantization = %(quantization)s AND admitted
), hp_start AS (
    SELECT gen_random_uuid() AS u
), hp_pick AS (
    -- Honeypots from a random point of the (random) ID space onwards, wrapping around: an index range
    -- scan instead of sorting every honeypot by random() on each claim.
    SELECT pair_id FROM (
        {_unseen_honeypots(">=")}
        UNION ALL
        {_unseen_honeypots("<")}
    ) wrapped
    -- randomized rounding keeps the expected share exact for any batch size; one slot stays ordinary
    LIMIT least(floor(%(hp_expected)s + random())::int, %(n)s - 1)
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
), nb AS (
    INSERT INTO batch (batch_id, contributor_id, backend, model_id, quantization, annotator_version, tier,
                       size, n_honeypots, expires_at)
    SELECT %(bid)s, %(cid)s, %(backend)s, %(model_id)s, %(quantization)s, %(annotator_version)s,
           (SELECT tier FROM m), (SELECT count(*) FROM picked), (SELECT count(*) FROM hpi),
           now() + make_interval(secs => %(lease)s)
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
SELECT h.tier, h.expires_at, c.pair_id, c.query, c.document
FROM (SELECT (SELECT tier FROM m) AS tier,
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


async def claim(
    cur: AsyncCursor[Any],
    contributor_id: int,
    size: int,
    model: dict[str, str],
    lease_seconds: int,
    honeypot_fraction: float,
) -> ClaimResult:
    """Lease up to ``size`` pairs (honeypots included) to the contributor in one statement."""
    batch_id = uuid.uuid4()
    fraction = min(max(honeypot_fraction, 0.0), 0.9)
    await cur.execute(
        CLAIM_SQL,
        {
            "backend": model["backend"],
            "model_id": model["model_id"],
            "quantization": model["quantization"],
            "annotator_version": model.get("annotator_version", ""),
            "cid": contributor_id,
            "n": size,
            "hp_expected": size * fraction,
            "bid": batch_id,
            "lease": float(lease_seconds),
        },
    )
    rows = await cur.fetchall()
    tier = rows[0][0]
    if tier is None:
        return ClaimResult(admitted=False, batch_id=batch_id, expires_at=rows[0][1])
    pairs = [{"pair_id": r[2], "query": r[3], "document": r[4]} for r in rows if r[2] is not None]
    return ClaimResult(admitted=True, batch_id=batch_id, expires_at=rows[0][1], pairs=pairs)


# --------------------------------------------------------------------------------------------------------
# Submit

# Classification of the chunk's pairs: already labeled by the caller (a retry: a duplicate, ignored),
# leased to this batch (ordinary) or handed out with it (honeypot), or neither (refused: the whole chunk
# is rejected, nothing is written). Accepted labels of ordinary pairs end the pair's lease and move its
# verification forward through kombinat_next(); the batch's lease is extended.
SUBMIT_SQL = compact_sql("""
WITH durable AS (
    -- Labels are acknowledged to the annotator, which then forgets them: this commit waits for the WAL
    -- flush even if the same transaction's token check turned synchronous commit off.
    SELECT set_config('synchronous_commit', 'on', true) AS s
), inp AS (
    SELECT * FROM json_to_recordset(%(labels)s::json)
        AS t(pair_id uuid, relevant boolean, p_relevant real, grade smallint, truncated boolean, seconds real)
), b AS (
    SELECT batch_id, contributor_id, tier, quarantined,
           (expires_at > now() AND released_at IS NULL) AS live, expires_at
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
    INSERT INTO label (pair_id, contributor_id, batch_id, relevant, p_relevant, grade, truncated, seconds,
                       backend, model_id, quantization, annotator_version, tier, is_honeypot, quarantined)
    SELECT i.pair_id, %(cid)s, %(bid)s, i.relevant, i.p_relevant, i.grade, coalesce(i.truncated, false),
           coalesce(i.seconds, 0),
           %(backend)s, %(model_id)s, %(quantization)s, %(annotator_version)s,
           (SELECT tier FROM b), o.is_honeypot, (SELECT quarantined FROM b)
    FROM inp i
    JOIN (SELECT pair_id, false AS is_honeypot FROM own_p UNION ALL SELECT pair_id, true FROM own_h) o
        USING (pair_id)
    WHERE (SELECT ok FROM ok)
    ON CONFLICT (pair_id, contributor_id) DO NOTHING
    RETURNING pair_id, relevant, p_relevant, is_honeypot, quarantined
), d AS (
    -- me as a join, not a sub-select: the tallies stay plain columns, and only then does the planner inline
    -- kombinat_next() below instead of calling it once per label
    SELECT ins.pair_id,
           (NOT ins.quarantined AND me.good_standing)::int AS dn,
           (NOT ins.quarantined AND me.good_standing AND ins.relevant)::int AS dr,
           CASE WHEN NOT ins.quarantined AND me.good_standing THEN ins.p_relevant ELSE 0 END AS dp
    FROM ins CROSS JOIN me WHERE NOT ins.is_honeypot
), upd AS (
    UPDATE pair p SET
        (status, state, tier, n_labels, n_relevant, p_sum, resolved_at) = (
            SELECT f.status, f.state, f.new_tier,
                   CASE WHEN f.escalated THEN 0 ELSE p.n_labels + d.dn END,
                   CASE WHEN f.escalated THEN 0 ELSE p.n_relevant + d.dr END,
                   CASE WHEN f.escalated THEN 0 ELSE p.p_sum + d.dp END,
                   CASE WHEN f.state = 'done' THEN now() END
            FROM kombinat_next(p.n_labels + d.dn, p.n_relevant + d.dr, p.tier,
                               %(min_agree)s, %(max_per_tier)s, %(max_tier)s) f),
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
""")


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
) -> SubmitResult:
    """``labels_json``: a JSON array of {pair_id, relevant, p_relevant, grade, truncated, seconds}."""
    await cur.execute(
        SUBMIT_SQL,
        {
            "labels": labels_json,
            "bid": batch_id,
            "cid": contributor_id,
            "backend": model["backend"],
            "model_id": model["model_id"],
            "quantization": model["quantization"],
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
# sees their latest versions, so the recount cannot race a concurrent submit.
RECOMPUTE_SQL = """
WITH agg AS (
    SELECT p.pair_id,
           count(l.label_id)::int AS n,
           (count(l.label_id) FILTER (WHERE l.relevant))::int AS r,
           coalesce(sum(l.p_relevant), 0) AS ps
    FROM pair p
    LEFT JOIN label l ON l.pair_id = p.pair_id AND NOT l.quarantined AND l.tier >= p.tier
        AND EXISTS (SELECT 1 FROM contributor c WHERE c.id = l.contributor_id AND c.good_standing)
    WHERE p.pair_id = ANY(%(ids)s::uuid[]) AND NOT p.is_honeypot
    GROUP BY p.pair_id
)
UPDATE pair p SET
    (status, state, tier, n_labels, n_relevant, p_sum, resolved_at) = (
        SELECT f.status,
               -- a pair that still needs labels keeps a live lease it has
               CASE WHEN f.state = 'queued' AND p.lease_batch_id IS NOT NULL THEN 'leased' ELSE f.state END,
               f.new_tier,
               CASE WHEN f.escalated THEN 0 ELSE a.n END,
               CASE WHEN f.escalated THEN 0 ELSE a.r END,
               CASE WHEN f.escalated THEN 0 ELSE a.ps END,
               CASE WHEN f.state = 'done' THEN coalesce(p.resolved_at, now()) END
        FROM kombinat_next(a.n, a.r, p.tier, %(min_agree)s, %(max_per_tier)s, %(max_tier)s) f)
FROM agg a WHERE p.pair_id = a.pair_id
RETURNING p.pair_id, p.status
"""


def recompute_pairs(
    conn: Connection,
    pair_ids: Sequence[uuid.UUID],
    min_agreement: float,
    max_labels_per_tier: int,
    max_tier: int,
) -> dict[uuid.UUID, str]:
    """Recount the verification state of ``pair_ids`` from their labels that count right now.

    Escalation is sticky (a pair never drops back a tier); an escalated pair is recounted again so labels
    that already exist at its new tier count there.
    """
    statuses: dict[uuid.UUID, str] = {}
    todo = list(dict.fromkeys(pair_ids))
    for _round in range(4):
        if not todo:
            break
        params = {
            "ids": todo,
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
            WHERE l.batch_id = b.batch_id AND l.is_honeypot AND l.relevant = h.relevant) AS correct
FROM batch b WHERE b.batch_id = %(bid)s
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


def check_batch_honeypots(conn: Connection, batch_id: uuid.UUID, min_accuracy: float) -> HoneypotVerdict | None:
    """Quarantine the batch as soon as its honeypot accuracy can no longer reach ``min_accuracy``.

    Deciding early (before every honeypot is answered) means the rest of a bad batch's labels are stored
    quarantined from the start instead of counting and being recounted later.
    """
    row = conn.exec_driver_sql(HONEYPOT_CHECK_SQL, {"bid": batch_id}).one_or_none()
    if row is None:
        return None
    verdict = HoneypotVerdict(
        contributor_id=row[0], quarantined=row[1], expected=row[2], answered=row[3], correct=row[4]
    )
    if verdict.quarantined or verdict.expected == 0:
        return verdict
    wrong = verdict.answered - verdict.correct
    best_possible = (verdict.expected - wrong) / verdict.expected
    if best_possible < min_accuracy:
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
