"""Admin endpoints for the pipeline: enqueue, honeypots, exports, queue and trust reports."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from sqlalchemy import Connection

from kombinat_api import queue
from kombinat_api.auth import Principal, require_admin
from kombinat_api.routes.deps import engine_of, invalid_value, limit_error, settings_of
from kombinat_api.schemas import EnqueueRequest, HoneypotRequest, InsertResponse, error_responses
from kombinat_api.validation import BIGINT_MAX, StrictJsonRoute, Text

router = APIRouter(
    prefix="/api/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    route_class=StrictJsonRoute,
    responses=error_responses(401, 403, 413, 429),
)


def _insert_new(
    request: Request,
    field: str,
    rows: Sequence[BaseModel],
    insert: Callable[[Connection, list[dict[str, Any]]], int],
) -> InsertResponse:
    """Insert the body's ``field`` (at most the server's enqueue limit) with ``insert``, which skips rows that
    are already there and returns how many were new."""
    maximum = settings_of(request).max_enqueue_pairs
    if len(rows) > maximum:
        raise limit_error(("body", field), len(rows), maximum, f"number of {field}")
    with engine_of(request).begin() as conn:
        inserted = insert(conn, [row.model_dump() for row in rows])
    return InsertResponse(inserted=inserted, already_present=len(rows) - inserted)


def _copy_pairs(conn: Connection, pairs: list[dict[str, Any]]) -> int:
    # COPY instead of one JSON recordset: 2.3x the rate in bench/queue.py --depth (bench/results/queue_depth)
    return queue.copy_enqueue_pairs(
        conn, ((p["pair_id"], p["query"], p["document"], p["split"], p["cycle"], p["priority"]) for p in pairs)
    )


@router.post("/pairs", response_model=InsertResponse)
def enqueue(body: EnqueueRequest, request: Request) -> InsertResponse:
    return _insert_new(request, "pairs", body.pairs, _copy_pairs)


@router.post("/honeypots", response_model=InsertResponse)
def load_honeypots(body: HoneypotRequest, request: Request) -> InsertResponse:
    return _insert_new(request, "honeypots", body.honeypots, queue.enqueue_honeypots)


# The honeypot pool's exposure: how often each gold pair has been handed out, against the cap, and how many
# contributors have no servable honeypot left (they are then checked only by the agreement test).
HONEYPOT_EXPOSURE_SQL = """
WITH pool AS (
    SELECT served, retired, (held_by IS NOT NULL AND held_until > now()) AS held FROM honeypot
), people AS (
    SELECT c.id,
           (SELECT count(*) FROM batch b JOIN batch_honeypot bh ON bh.batch_id = b.batch_id
            WHERE b.contributor_id = c.id) AS seen,
           (SELECT count(*) FROM honeypot h
            WHERE NOT h.retired
              AND NOT EXISTS (SELECT 1 FROM batch_honeypot bh
                              WHERE bh.pair_id = h.pair_id AND bh.contributor_id = c.id)) AS servable
    FROM contributor c WHERE NOT c.is_admin AND NOT c.banned
)
SELECT (SELECT count(*) FROM pool) AS pool,
       (SELECT count(*) FROM pool WHERE retired) AS retired,
       (SELECT count(*) FROM pool WHERE served = 0) AS never_served,
       (SELECT count(*) FROM pool WHERE held) AS out_now,
       (SELECT coalesce(sum(served), 0) FROM pool) AS servings,
       (SELECT coalesce(sum(greatest(%(cap)s - served, 0)) FILTER (WHERE NOT retired), 0) FROM pool) AS servings_left,
       (SELECT coalesce(json_object_agg(served, n), '{}'::json)
        FROM (SELECT served, count(*) AS n FROM pool GROUP BY served ORDER BY served) x) AS by_exposure,
       (SELECT count(*) FROM people) AS contributors,
       (SELECT count(*) FROM people WHERE servable = 0) AS contributors_without_servable,
       (SELECT coalesce(avg(seen), 0) FROM people) AS mean_seen
"""


@router.get("/honeypots")
def honeypot_exposure(request: Request) -> dict[str, Any]:
    """The pool's exposure. ``servings_left`` is what the pool can still hand out (each honeypot goes to at most
    ``max_exposure`` contributors); when it nears zero, load more gold. Contributors without a servable honeypot
    are checked by the agreement test only."""
    cap = settings_of(request).honeypot_max_exposure
    with engine_of(request).connect() as conn:
        row = conn.exec_driver_sql(HONEYPOT_EXPOSURE_SQL, {"cap": cap}).mappings().one()
    return {
        "pool": row["pool"],
        "max_exposure": cap,
        "retired": row["retired"],
        "never_served": row["never_served"],
        "out_now": row["out_now"],
        "servings": row["servings"],
        "servings_left": row["servings_left"],
        "by_exposure": {str(k): v for k, v in row["by_exposure"].items()},
        "contributors": row["contributors"],
        "contributors_without_servable": row["contributors_without_servable"],
        "mean_seen_per_contributor": float(row["mean_seen"]),
    }


def _page_size(request: Request, limit: int | None) -> int:
    settings = settings_of(request)
    if limit is None:
        return settings.default_page_size
    if limit > settings.max_page_size:
        raise limit_error(("query", "limit"), limit, settings.max_page_size, "page size")
    return limit


def _parse_label_cursor(after: str | None) -> tuple[int, int]:
    if not after:
        return (-1, -1)
    try:
        xact, label_id = (int(part) for part in after.split(":"))
    except ValueError:
        xact = label_id = -2  # not two integers
    if not (0 <= xact <= BIGINT_MAX and 0 <= label_id <= BIGINT_MAX):
        raise invalid_value(("query", "after"), after, "invalid cursor: pass back a next_cursor unchanged")
    return xact, label_id


# Pages are ordered by (inserting transaction id, label id) and only hold labels below a horizon that
# no transaction still able to insert labels lies under, so a label that commits late always sorts after
# any cursor already handed out: polling with next_cursor never misses one and pages are stable.
#
# The horizon must ignore transactions of other databases on the same server (the cluster-wide snapshot
# xmin would let any long transaction elsewhere stall exports). So: first read which transactions of
# *this* database are running (pg_stat_activity) and the next transaction id then (x1); then, with a
# later snapshot, the horizon is the oldest transaction still in progress that is either one of ours or
# newer than x1 (started after the first read, database unknown).
OURS_SQL = """
SELECT coalesce(array_agg(backend_xid::text::bigint), '{}') AS xids,
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS x1
FROM pg_stat_activity WHERE datname = current_database() AND backend_xid IS NOT NULL
"""

LABELS_SQL = """
WITH h AS (
    SELECT coalesce(min(x::text::bigint), pg_snapshot_xmax(pg_current_snapshot())::text::bigint) AS horizon
    FROM pg_snapshot_xip(pg_current_snapshot()) x
    WHERE x::text::bigint >= %(x1)s OR x::text::bigint %% 4294967296 = ANY(%(xids)s::bigint[])
)
SELECT l.xact, l.label_id, l.pair_id, l.contributor_id, l.relevant, l.p_relevant, l.p_calibrated, l.grade,
       l.truncated, l.backend, l.model_id, l.quantization, l.prompt_version, l.annotator_version, l.created_at,
       l.quarantined, p.split, p.cycle
FROM label l JOIN pair p ON p.pair_id = l.pair_id
WHERE (l.xact, l.label_id) > (%(ax)s, %(al)s)
  AND l.xact < (SELECT horizon FROM h)
  AND (%(split)s::text IS NULL OR p.split = %(split)s::text)
  AND (%(cycle)s::text IS NULL OR p.cycle = %(cycle)s::text)
ORDER BY l.xact, l.label_id
LIMIT %(limit)s
"""


@router.get("/labels")
def export_labels(
    request: Request,
    after: Text | None = Query(default=None, max_length=50),
    limit: int | None = Query(default=None, ge=1, le=BIGINT_MAX),
    split: Text | None = Query(default=None, max_length=200),
    cycle: Text | None = Query(default=None, max_length=50),
) -> dict[str, Any]:
    ax, al = _parse_label_cursor(after)
    n = _page_size(request, limit)
    with engine_of(request).begin() as conn:
        xids, x1 = conn.exec_driver_sql(OURS_SQL).one()
        rows = conn.exec_driver_sql(
            LABELS_SQL,
            {"ax": ax, "al": al, "split": split, "cycle": cycle, "limit": n, "xids": xids, "x1": x1},
        ).all()
    labels = [
        {
            "label_id": r.label_id,
            "pair_id": str(r.pair_id),
            "contributor_id": r.contributor_id,
            "relevant": r.relevant,
            "p_relevant": r.p_relevant,
            "p_calibrated": r.p_calibrated,
            "grade": r.grade,
            "truncated": r.truncated,
            "backend": r.backend,
            "model_id": r.model_id,
            "quantization": r.quantization,
            "prompt_version": r.prompt_version,
            "annotator_version": r.annotator_version,
            "created_at": r.created_at.isoformat(),
            "quarantined": r.quarantined,
            "split": r.split,
            "cycle": r.cycle,
        }
        for r in rows
    ]
    next_cursor = f"{rows[-1].xact}:{rows[-1].label_id}" if rows else after
    return {"labels": labels, "next_cursor": next_cursor}


VERIFIED_SQL = """
SELECT p.pair_id, c.query, c.document, p.split, p.cycle, p.status, p.tier, p.n_labels, p.n_relevant, p.p_sum,
       p.n_votes, p.n_votes_relevant, p.n_model_configs,
       -- the models of the labels that counted: not quarantined, at the pair's tier, from a contributor in good
       -- standing (kombinat_count's rule); a bad contributor's model is never credited with a verified pair
       (SELECT coalesce(array_agg(DISTINCT l.backend || '/' || l.model_id || '/' || l.quantization), '{}')
        FROM label l JOIN contributor lc ON lc.id = l.contributor_id AND lc.good_standing
        WHERE l.pair_id = p.pair_id AND NOT l.quarantined AND l.tier >= p.tier) AS models
FROM pair p JOIN pair_content c ON c.pair_id = p.pair_id
WHERE p.status = %(status)s AND NOT p.is_honeypot
  AND (%(split)s::text IS NULL OR p.split = %(split)s::text)
  AND (%(cycle)s::text IS NULL OR p.cycle = %(cycle)s::text)
  AND p.pair_id > %(after)s
ORDER BY p.pair_id
LIMIT %(limit)s
"""

PairStatus = Literal["verified", "disputed", "escalated", "unresolved", "labeled", "new"]


@router.get("/verified")
def export_verified(
    request: Request,
    split: Text | None = Query(default=None, max_length=200),
    cycle: Text | None = Query(default=None, max_length=50),
    after: uuid.UUID | None = None,
    limit: int | None = Query(default=None, ge=1, le=BIGINT_MAX),
    status_: PairStatus = Query(default="verified", alias="status"),
) -> dict[str, Any]:
    n = _page_size(request, limit)
    with engine_of(request).connect() as conn:
        rows = conn.exec_driver_sql(
            VERIFIED_SQL,
            {
                "status": status_,
                "split": split,
                "cycle": cycle,
                "after": after or uuid.UUID(int=0),
                "limit": n,
            },
        ).all()
    pairs = []
    for r in rows:
        # the quorum's verdict and agreement: over labels, or over model configurations in distinct-model mode
        votes, yes = r.n_votes, r.n_votes_relevant
        majority = yes * 2 >= votes if votes else None
        agree = max(yes, votes - yes) / votes if votes else None
        pairs.append(
            {
                "pair_id": str(r.pair_id),
                "query": r.query,
                "document": r.document,
                "split": r.split,
                "cycle": r.cycle,
                "status": r.status,
                "label": majority,
                "p_relevant": r.p_sum / r.n_labels if r.n_labels else None,
                "n_labels": r.n_labels,
                "n_votes": votes,
                "n_model_configs": r.n_model_configs,
                "agreement": agree,
                "tier": r.tier,
                "models": sorted(r.models),
            }
        )
    next_cursor = pairs[-1]["pair_id"] if pairs else (str(after) if after else None)
    return {"pairs": pairs, "next_cursor": next_cursor}


QUEUE_SQL = """
SELECT count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'leased') AS leased,
       count(*) FILTER (WHERE n_labels > 0 OR status <> 'new') AS labeled,
       count(*) FILTER (WHERE status = 'verified') AS verified,
       count(*) FILTER (WHERE status = 'disputed') AS disputed,
       count(*) FILTER (WHERE status = 'escalated') AS escalated,
       count(*) FILTER (WHERE status = 'unresolved') AS unresolved
FROM pair
WHERE NOT is_honeypot
  AND (%(split)s::text IS NULL OR split = %(split)s::text)
  AND (%(cycle)s::text IS NULL OR cycle = %(cycle)s::text)
"""


@router.get("/queue")
def queue_counts(request: Request, split: str | None = None, cycle: str | None = None) -> dict[str, int]:
    with engine_of(request).connect() as conn:
        row = conn.exec_driver_sql(QUEUE_SQL, {"split": split, "cycle": cycle}).mappings().one()
    return dict(row)


CONTRIBUTORS_SQL = """
SELECT c.id AS contributor_id, c.login, c.is_admin, c.banned, c.reputation, c.good_standing, c.trusted,
       c.hp_total, c.hp_correct, c.agree_total, c.agree_count, c.n_labels, c.n_relevant, c.divergence,
       c.quarantined_batches, c.created_at, c.reputation_updated_at
FROM contributor c
WHERE NOT c.is_admin
ORDER BY c.reputation DESC, c.id
LIMIT %(limit)s OFFSET %(offset)s
"""


@router.get("/contributors")
def contributors(
    request: Request,
    limit: int | None = Query(default=None, ge=1, le=BIGINT_MAX),
    offset: int = Query(default=0, ge=0, le=BIGINT_MAX),
) -> dict[str, Any]:
    n = _page_size(request, limit)
    with engine_of(request).connect() as conn:
        rows = conn.exec_driver_sql(CONTRIBUTORS_SQL, {"limit": n, "offset": offset}).mappings().all()
    out = []
    for r in rows:
        out.append(
            {
                "contributor_id": r["contributor_id"],
                "login": r["login"],
                "banned": r["banned"],
                "reputation": r["reputation"],
                "good_standing": r["good_standing"],
                "trusted": r["trusted"],
                "honeypot_accuracy": r["hp_correct"] / r["hp_total"] if r["hp_total"] else None,
                "honeypots_answered": r["hp_total"],
                "agreement": r["agree_count"] / r["agree_total"] if r["agree_total"] else None,
                "divergence": r["divergence"],
                "labels": r["n_labels"],
                "relevant_share": r["n_relevant"] / r["n_labels"] if r["n_labels"] else None,
                "quarantined_batches": r["quarantined_batches"],
                "reputation_updated_at": r["reputation_updated_at"],
            }
        )
    return {"contributors": out}


# Agreement of a label: does it match the verdict of the other counted labels of its pair (ties 1/2)?
MODEL_QUALITY_SQL = """
WITH lab AS (
    SELECT l.backend, l.model_id, l.quantization, l.relevant, l.is_honeypot, l.quarantined,
           h.relevant AS gold,
           p.n_labels - (NOT l.quarantined AND l.tier >= p.tier AND c.good_standing)::int AS on_,
           p.n_relevant
               - (NOT l.quarantined AND l.tier >= p.tier AND c.good_standing AND l.relevant)::int AS or_
    FROM label l
    JOIN pair p ON p.pair_id = l.pair_id
    JOIN contributor c ON c.id = l.contributor_id
    LEFT JOIN honeypot h ON h.pair_id = l.pair_id
)
SELECT backend, model_id, quantization,
       count(*) FILTER (WHERE NOT is_honeypot) AS labels,
       count(*) FILTER (WHERE quarantined) AS quarantined,
       count(*) FILTER (WHERE is_honeypot) AS honeypots,
       count(*) FILTER (WHERE is_honeypot AND relevant = gold) AS honeypots_correct,
       count(*) FILTER (WHERE NOT is_honeypot AND on_ >= 1) AS compared,
       coalesce(sum(CASE WHEN is_honeypot OR on_ < 1 THEN 0 WHEN or_ * 2 = on_ THEN 0.5
                         WHEN (or_ * 2 > on_) = relevant THEN 1 ELSE 0 END), 0) AS agreed,
       avg(relevant::int) FILTER (WHERE NOT is_honeypot) AS relevant_share
FROM lab
GROUP BY backend, model_id, quantization
ORDER BY backend, model_id, quantization
"""


@router.get("/model-quality")
def model_quality(request: Request, _admin: Principal = Depends(require_admin)) -> dict[str, Any]:
    with engine_of(request).connect() as conn:
        rows = conn.exec_driver_sql(MODEL_QUALITY_SQL).mappings().all()
    return {
        "models": [
            {
                "backend": r["backend"],
                "model_id": r["model_id"],
                "quantization": r["quantization"],
                "labels": r["labels"],
                "quarantined": r["quarantined"],
                "honeypots_answered": r["honeypots"],
                "honeypot_accuracy": r["honeypots_correct"] / r["honeypots"] if r["honeypots"] else None,
                "compared": r["compared"],
                "agreement": float(r["agreed"]) / r["compared"] if r["compared"] else None,
                "relevant_share": float(r["relevant_share"]) if r["relevant_share"] is not None else None,
            }
            for r in rows
        ]
    }
