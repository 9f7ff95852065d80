"""The SQL that matters: enqueue, claim, submit, release, verification and quarantine.

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
from typing import Any

from psycopg import AsyncConnection, Cursor
from sqlalchemy import Connection

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

# Honeypots are drawn at random among those the contributor has never been shown (a share of the batch).
# Ordinary pairs fill the rest from two places, tried in order: pairs whose lease expired (their batch's
# real expiry, which chunk submissions extend, has passed too), then queued pairs by tier and priority.
# Both lock with SKIP LOCKED so concurrent claimers never wait on each other and never get the same row.
# The answer is sorted by pair_id, so the honeypots' position says nothing.
# The caller is authenticated inside the same statement (the ``tok``/``who`` CTEs, see PRINCIPAL_BY_TOKEN):
# one round trip and one commit per request, and nothing is claimed unless the caller may claim.
_CLAIM_TEMPLATE = """
WITH {principal},
async_commit AS (
    -- A claim lost in a database crash costs nothing: its pairs are simply still claimable and a label
    -- sent for the lost batch is refused, so this commit need not wait for the WAL flush.
    SELECT set_config('synchronous_commit', 'off', true) AS s
), m AS (
    SELECT max(tier) AS tier FROM model
    WHERE backend = %(backend)s AND model_id = %(model_id)s AND quantization = %(quantization)s AND admitted
      -- a refused caller (unknown token, banned, rate-limited, batch too large) claims nothing
      AND (SELECT allowed FROM who) AND %(size_ok)s
), hp_start AS (
    SELECT gen_random_uuid() AS u
), hp_pick AS (
    -- Honeypots from a random point of the (random) ID space onwards, wrapping around: an index range
    -- scan instead of sorting every honeypot by random() on each claim.
    SELECT pair_id FROM (
        (SELECT h.pair_id FROM honeypot h
         WHERE h.pair_id >= (SELECT u FROM hp_start) AND (SELECT tier FROM m) IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM batch_honeypot bh
                           WHERE bh.pair_id = h.pair_id AND bh.contributor_id = {cid})
           -- OFFSET 0 keeps this a per-honeypot probe of label's (pair_id, contributor_id) key: as an anti
           -- join the planner walked the whole label index, a cost that grew with every label stored.
           AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = h.pair_id AND l.contributor_id = {cid}
                           OFFSET 0)
         ORDER BY h.pair_id LIMIT %(n)s)
        UNION ALL
        (SELECT h.pair_id FROM honeypot h
         WHERE h.pair_id < (SELECT u FROM hp_start) AND (SELECT tier FROM m) IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM batch_honeypot bh
                           WHERE bh.pair_id = h.pair_id AND bh.contributor_id = {cid})
           -- OFFSET 0 keeps this a per-honeypot probe of label's (pair_id, contributor_id) key: as an anti
           -- join the planner walked the whole label index, a cost that grew with every label stored.
           AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = h.pair_id AND l.contributor_id = {cid}
                           OFFSET 0)
         ORDER BY h.pair_id LIMIT %(n)s)
    ) wrapped
    -- randomized rounding keeps the expected share exact for any batch size; one slot stays ordinary
    LIMIT least(floor(%(n)s * (SELECT hp_fraction FROM who) + random())::int, %(n)s - 1)
), exp AS (
    SELECT p.pair_id, p.ctid AS tid FROM pair p
    WHERE p.state = 'leased' AND p.lease_expires_at < now() AND p.tier <= (SELECT tier FROM m)
      AND NOT EXISTS (SELECT 1 FROM batch b WHERE b.batch_id = p.lease_batch_id
                      AND b.expires_at > now() AND b.released_at IS NULL)
      AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = p.pair_id AND l.contributor_id = {cid})
    ORDER BY p.lease_expires_at
    LIMIT %(n)s - (SELECT count(*) FROM hp_pick)
    FOR UPDATE OF p SKIP LOCKED
), fresh AS (
    SELECT p.pair_id, p.ctid AS tid FROM pair p
    WHERE p.state = 'queued' AND p.tier <= (SELECT tier FROM m)
      AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = p.pair_id AND l.contributor_id = {cid})
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
    SELECT %(bid)s, pair_id, {cid} FROM hp
    ON CONFLICT (pair_id, contributor_id) DO NOTHING
    RETURNING pair_id
), nb AS (
    INSERT INTO batch (batch_id, contributor_id, backend, model_id, quantization, annotator_version, tier,
                       size, n_honeypots, expires_at)
    SELECT %(bid)s, {cid}, %(backend)s, %(model_id)s, %(quantization)s, %(annotator_version)s,
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
SELECT {principal_columns},
       (SELECT tier FROM m) AS tier,
       (SELECT s FROM async_commit) AS s,
       -- The response body, rendered by PostgreSQL in the same pass: the API worker passes the text on
       -- instead of building, validating and re-serializing hundreds of Python objects per claim.
       CASE WHEN (SELECT tier FROM m) IS NOT NULL THEN json_build_object(
           'batch_id', %(bid)s::uuid,
           'lease_expires_at', to_char(coalesce((SELECT expires_at FROM nb),
                                                now() + make_interval(secs => %(lease)s)) AT TIME ZONE 'UTC',
                                       'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'pairs', coalesce((
               SELECT json_agg(json_build_object('pair_id', c.pair_id, 'query', c.query, 'document', c.document)
                               ORDER BY c.pair_id)
               FROM pair_content c
               WHERE c.pair_id = ANY(ARRAY(SELECT pair_id FROM leased UNION ALL SELECT pair_id FROM hpi))
           ), '[]'::json)
       )::text END AS body
FROM (SELECT 1) one LEFT JOIN tok ON true
"""

# A caller's token is checked and counted against its per-minute limit by the first CTE of the claim and
# submit statements. Columns of ``tok``: id, login, admin bit, trusted, good standing, banned, requests in
# this minute, seconds until the next minute.
PRINCIPAL_BY_TOKEN = """
tok AS (
    UPDATE api_token t SET
        rl_count = CASE WHEN t.rl_window = w.w THEN t.rl_count + 1 ELSE 1 END,
        rl_window = w.w,
        last_used_at = now()
    FROM contributor c, (SELECT floor(extract(epoch FROM now()) / 60)::bigint AS w) w
    WHERE t.token_hash = %(token_hash)s AND t.revoked_at IS NULL AND c.id = t.contributor_id
    RETURNING c.id AS cid, c.login, t.is_admin, c.trusted, c.good_standing, c.banned, t.rl_count,
              60 - floor(extract(epoch FROM now()))::bigint %% 60 AS retry_after
), who AS (
    SELECT cid,
           NOT banned AND rl_count <= CASE WHEN is_admin THEN %(admin_limit)s ELSE %(limit)s END AS allowed,
           -- new and low-reputation contributors get honeypot-heavy batches until they have earned trust
           CASE WHEN trusted THEN %(hp_fraction)s ELSE %(hp_fraction_untrusted)s END AS hp_fraction
    FROM tok
)"""

# The same statements for a contributor known by id (the caller was resolved earlier in the transaction):
# no token, no rate-limit count.
PRINCIPAL_BY_ID = """
tok AS (
    SELECT c.id AS cid, c.login, c.is_admin, c.trusted, c.good_standing, c.banned, 0 AS rl_count,
           0::bigint AS retry_after
    FROM contributor c WHERE c.id = %(cid)s
), who AS (
    SELECT cid, NOT banned AS allowed,
           CASE WHEN trusted THEN %(hp_fraction)s ELSE %(hp_fraction_untrusted)s END AS hp_fraction
    FROM tok
)"""

PRINCIPAL_COLUMNS = (
    "tok.cid, tok.login, tok.is_admin, tok.trusted, tok.good_standing, tok.banned, tok.rl_count, tok.retry_after"
)
N_PRINCIPAL_COLUMNS = 8


def _statement(template: str, principal: str) -> str:
    return template.format(principal=principal, cid="(SELECT cid FROM who)", principal_columns=PRINCIPAL_COLUMNS)


CLAIM_SQL = _statement(_CLAIM_TEMPLATE, PRINCIPAL_BY_TOKEN)
CLAIM_BY_ID_SQL = _statement(_CLAIM_TEMPLATE, PRINCIPAL_BY_ID)


@dataclass
class ClaimResult:
    """``principal``: the caller's row (PRINCIPAL_COLUMNS; all None for an unknown token). ``body``: the
    response as JSON text, None when the model is not admitted or the caller was refused."""

    principal: tuple[Any, ...]
    admitted: bool
    body: str | None


def claim_params(
    size: int,
    model: dict[str, str],
    lease_seconds: int,
    honeypot_fraction: float,
    honeypot_fraction_untrusted: float,
    size_ok: bool = True,
    token_hash: str | None = None,
    contributor_id: int | None = None,
    rate_limit: int = 0,
    admin_rate_limit: int = 0,
) -> dict[str, Any]:
    """Parameters of CLAIM_SQL (``token_hash`` and the limits) or CLAIM_BY_ID_SQL (``contributor_id``)."""

    def clamp(f: float) -> float:
        return min(max(f, 0.0), 0.9)

    return {
        "token_hash": token_hash,
        "cid": contributor_id,
        "limit": rate_limit,
        "admin_limit": admin_rate_limit,
        "size_ok": size_ok,
        "backend": model["backend"],
        "model_id": model["model_id"],
        "quantization": model["quantization"],
        "annotator_version": model.get("annotator_version", ""),
        "n": size,
        "hp_fraction": clamp(honeypot_fraction),
        "hp_fraction_untrusted": clamp(honeypot_fraction_untrusted),
        "bid": uuid.uuid4(),
        "lease": float(lease_seconds),
    }


def claim_result(row: Sequence[Any]) -> ClaimResult:
    k = N_PRINCIPAL_COLUMNS
    return ClaimResult(principal=tuple(row[:k]), admitted=row[k] is not None, body=row[k + 2])


def claim(cur: Cursor[Any], params: dict[str, Any], by_id: bool = False) -> ClaimResult:
    """Lease up to ``size`` pairs (honeypots included) to the caller in one statement."""
    row = cur.execute(CLAIM_BY_ID_SQL if by_id else CLAIM_SQL, params).fetchone()
    assert row is not None
    return claim_result(row)


async def claim_async(conn: AsyncConnection[Any], params: dict[str, Any]) -> ClaimResult:
    cur = await conn.execute(CLAIM_SQL, params)
    row = await cur.fetchone()
    assert row is not None
    return claim_result(row)


# --------------------------------------------------------------------------------------------------------
# Submit

# Classification of the chunk's pairs: already labeled by the caller (a retry: a duplicate, ignored),
# leased to this batch (ordinary) or handed out with it (honeypot), or neither (refused: the whole chunk
# is rejected, nothing is written). Accepted labels of ordinary pairs end the pair's lease and move its
# verification forward through kombinat_next(); the batch's lease is extended.
_SUBMIT_TEMPLATE = """
WITH {principal},
durable AS (
    -- Labels are acknowledged to the annotator, which then forgets them: this commit waits for the WAL
    -- flush even if an earlier token check in the same transaction turned synchronous commit off.
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
    SELECT good_standing FROM contributor WHERE id = {cid}
), dup AS (
    SELECT l.pair_id FROM label l JOIN inp USING (pair_id) WHERE l.contributor_id = {cid}
), own_p AS (
    SELECT p.pair_id FROM pair p JOIN inp USING (pair_id)
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
    SELECT owner = {cid} AND n_own + n_dup = n_in AND (live OR n_own = 0)
           -- a refused caller (unknown token, banned, rate-limited, chunk too large) writes nothing
           AND coalesce((SELECT allowed FROM who), false) AND %(size_ok)s AS ok FROM chk
), ins AS (
    INSERT INTO label (pair_id, contributor_id, batch_id, relevant, p_relevant, grade, truncated, seconds,
                       backend, model_id, quantization, annotator_version, tier, is_honeypot, quarantined)
    SELECT i.pair_id, {cid}, %(bid)s, i.relevant, i.p_relevant, i.grade, coalesce(i.truncated, false),
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
    SELECT pair_id,
           (NOT quarantined AND (SELECT good_standing FROM me))::int AS dn,
           (NOT quarantined AND (SELECT good_standing FROM me) AND relevant)::int AS dr,
           CASE WHEN NOT quarantined AND (SELECT good_standing FROM me) THEN p_relevant ELSE 0 END AS dp
    FROM ins WHERE NOT is_honeypot
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
                     n_labeled = n_labeled + (SELECT count(*) FROM ins)
    WHERE batch_id = %(bid)s AND (SELECT ok FROM ok) AND (SELECT live FROM chk)
    RETURNING expires_at, n_labeled, size + n_honeypots AS total
), hp_now AS (
    SELECT count(*) AS answered, count(*) FILTER (WHERE i.relevant = h.relevant) AS correct
    FROM ins i JOIN honeypot h USING (pair_id) WHERE i.is_honeypot
)
SELECT {principal_columns},
       chk.n_in, chk.n_dup, chk.n_own, chk.owner, chk.live, ok.ok,
       (SELECT count(*) FROM ins) AS accepted,
       (SELECT count(*) FROM ins WHERE is_honeypot) AS honeypots,
       coalesce((SELECT expires_at FROM bu), (SELECT expires_at FROM b)) AS expires_at,
       (SELECT n_labeled FROM bu) AS n_labeled,
       (SELECT total FROM bu) AS total,
       (SELECT array_agg(pair_id) FROM upd WHERE status = 'escalated') AS escalated,
       (SELECT s FROM durable) AS durable,
       -- The batch's honeypot verdict after this chunk (check_batch_honeypots' rule, with this chunk's answers
       -- added to what the snapshot holds): true once its accuracy can no longer reach the minimum, so the
       -- follow-up that quarantines it runs only then, not after every chunk that carries a honeypot.
       CASE WHEN (SELECT answered FROM hp_now) > 0 AND NOT (SELECT quarantined FROM b) THEN (
           SELECT e.expected > 0
                  AND (e.expected - (a.answered - a.correct))::float8 / e.expected < %(hp_min_accuracy)s
           FROM (SELECT count(*) AS expected FROM batch_honeypot bh
                 WHERE bh.batch_id = %(bid)s
                   AND (NOT bh.released OR EXISTS (SELECT 1 FROM label l WHERE l.batch_id = %(bid)s
                                                                          AND l.pair_id = bh.pair_id))) e,
                (SELECT count(*) + (SELECT answered FROM hp_now) AS answered,
                        count(*) FILTER (WHERE l.relevant = h.relevant) + (SELECT correct FROM hp_now) AS correct
                 FROM label l JOIN honeypot h ON h.pair_id = l.pair_id
                 WHERE l.batch_id = %(bid)s AND l.is_honeypot) a
       ) ELSE false END AS hp_doomed
FROM chk CROSS JOIN ok LEFT JOIN tok ON true
"""

SUBMIT_SQL = _statement(_SUBMIT_TEMPLATE, PRINCIPAL_BY_TOKEN)
SUBMIT_BY_ID_SQL = _statement(_SUBMIT_TEMPLATE, PRINCIPAL_BY_ID)


@dataclass
class SubmitResult:
    outcome: str  # ok | not_found | forbidden | foreign | expired
    accepted: int = 0
    duplicates: int = 0
    expires_at: datetime | None = None
    honeypots: int = 0
    batch_complete: bool = False
    escalated: list[uuid.UUID] = field(default_factory=list)
    # the batch's honeypot accuracy can no longer reach the minimum: it must be quarantined
    honeypots_failed: bool = False
    # the caller's row (PRINCIPAL_COLUMNS; all None for an unknown token)
    principal: tuple[Any, ...] = ()


def submit_params(
    batch_id: uuid.UUID,
    labels_json: str,
    model: dict[str, str],
    lease_seconds: int,
    min_agreement: float,
    max_labels_per_tier: int,
    max_tier: int,
    size_ok: bool = True,
    token_hash: str | None = None,
    contributor_id: int | None = None,
    rate_limit: int = 0,
    admin_rate_limit: int = 0,
    honeypot_min_accuracy: float = 0.9,
) -> dict[str, Any]:
    """Parameters of SUBMIT_SQL (``token_hash`` and the limits) or SUBMIT_BY_ID_SQL (``contributor_id``).
    ``labels_json``: a JSON array of {pair_id, relevant, p_relevant, grade, truncated, seconds}."""
    return {
        "token_hash": token_hash,
        "cid": contributor_id,
        "limit": rate_limit,
        "admin_limit": admin_rate_limit,
        "hp_fraction": 0.0,
        "hp_fraction_untrusted": 0.0,
        "size_ok": size_ok,
        "labels": labels_json,
        "bid": batch_id,
        "backend": model["backend"],
        "model_id": model["model_id"],
        "quantization": model["quantization"],
        "annotator_version": model.get("annotator_version", ""),
        "lease": float(lease_seconds),
        "min_agree": float(min_agreement),
        "max_per_tier": int(max_labels_per_tier),
        "max_tier": int(max_tier),
        "hp_min_accuracy": float(honeypot_min_accuracy),
    }


def submit_result(row: Sequence[Any]) -> SubmitResult:
    k = N_PRINCIPAL_COLUMNS
    principal = tuple(row[:k])
    contributor_id = principal[0]
    n_dup, owner, live, ok = row[k + 1], row[k + 3], row[k + 4], row[k + 5]
    if owner is None:
        return SubmitResult("not_found", principal=principal)
    if owner != contributor_id:
        return SubmitResult("forbidden", principal=principal)
    if not ok:
        # Pairs that are not in the lease: with a live batch that is the caller's error; with a dead one
        # the lease ran out (or was released) and its pairs may already belong to someone else.
        return SubmitResult("expired" if not live else "foreign", duplicates=n_dup, principal=principal)
    accepted, n_labeled, total = row[k + 6], row[k + 9], row[k + 10]
    return SubmitResult(
        "ok",
        accepted=int(accepted),
        duplicates=int(n_dup),
        expires_at=row[k + 8],
        honeypots=int(row[k + 7]),
        batch_complete=n_labeled is not None and total is not None and n_labeled >= total and accepted > 0,
        escalated=list(row[k + 11] or []),
        honeypots_failed=bool(row[k + 13]),
        principal=principal,
    )


def submit(
    cur: Cursor[Any],
    contributor_id: int,
    batch_id: uuid.UUID,
    labels_json: str,
    model: dict[str, str],
    lease_seconds: int,
    min_agreement: float,
    max_labels_per_tier: int,
    max_tier: int,
) -> SubmitResult:
    """Submit a chunk for a contributor known by id, in the caller's transaction."""
    params = submit_params(
        batch_id, labels_json, model, lease_seconds, min_agreement, max_labels_per_tier, max_tier,
        contributor_id=contributor_id,
    )  # fmt: skip
    row = cur.execute(SUBMIT_BY_ID_SQL, params).fetchone()
    assert row is not None
    return submit_result(row)


async def submit_async(conn: AsyncConnection[Any], params: dict[str, Any]) -> SubmitResult:
    """Authenticate (token hash in ``params``) and submit in one statement on an autocommit connection."""
    cur = await conn.execute(SUBMIT_SQL, params)
    row = await cur.fetchone()
    assert row is not None
    return submit_result(row)


# --------------------------------------------------------------------------------------------------------
# Release

RELEASE_SQL = """
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
      AND NOT EXISTS (SELECT 1 FROM label l WHERE l.pair_id = bh.pair_id AND l.contributor_id = %(cid)s)
      AND (SELECT contributor_id FROM b) = %(cid)s
    RETURNING 1
), bu AS (
    UPDATE batch SET released_at = now()
    WHERE batch_id = %(bid)s AND %(all)s AND contributor_id = %(cid)s AND released_at IS NULL
    RETURNING 1
)
SELECT (SELECT contributor_id FROM b), (SELECT count(*) FROM rp) + (SELECT count(*) FROM rh)
"""


def release(
    cur: Cursor[Any], contributor_id: int, batch_id: uuid.UUID, pair_ids: Sequence[uuid.UUID] | None
) -> tuple[str, int]:
    row = cur.execute(
        RELEASE_SQL,
        {"bid": batch_id, "cid": contributor_id, "all": pair_ids is None, "ids": list(pair_ids or [])},
    ).fetchone()
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
