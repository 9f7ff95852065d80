"""Public statistics: JSON, a throughput time series and the live progress page. Honeypots are left out of
every count except the leaderboard's (see LEADERBOARD_SQL)."""

from __future__ import annotations

import html
import json
import math
import re
import secrets
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from kombinat_api import queue
from kombinat_api.routes.deps import engine_of, settings_of
from kombinat_api.validation import StrictJsonRoute

router = APIRouter(tags=["public"], route_class=StrictJsonRoute)

PAGE_TEMPLATE = Path(__file__).with_name("progress.html")
_PLACEHOLDER = re.compile(r"__(NONCE|INITIAL_STATS|STATIC_TABLES|POLL_MS)__")

# Public numbers may be a few seconds old: a load balancer or CDN in front of the replicas may cache them
# for this long (docs/deploy.md), which bounds the database work to one query set per interval however many
# browsers keep the page open. The page polls a little slower than this.
STATS_MAX_AGE_S = 3
POLL_MS = 5000

# Bounds of the throughput series: at most a week back and a few hundred buckets, so one call is one
# range scan of the label table's BRIN index on created_at plus a generate_series of ≤ MAX_BUCKETS rows.
MAX_SERIES_HOURS = 168
MAX_SERIES_BUCKETS = 360
MIN_BUCKET_SECONDS = 10

ACTIVITY_SQL = """
SELECT (SELECT count(*) FROM label
            WHERE created_at > now() - make_interval(hours => %(h)s) AND NOT is_honeypot) AS labels,
       (SELECT count(DISTINCT contributor_id) FROM batch
            WHERE created_at > now() - make_interval(hours => %(h)s)) AS active_contributors,
       (SELECT count(*) FROM contributor WHERE NOT is_admin) AS contributors,
       (SELECT count(*) FROM label WHERE NOT is_honeypot) AS labels_total,
       now() AS generated_at
"""

# From batches (few rows) rather than from scanning labels. It counts every label a contributor sent,
# honeypots included: counting them out would tell each contributor how many honeypots it was given. Only
# contributors in good standing are listed: a public rank is credit, and labels that no longer count earn none.
LEADERBOARD_SQL = """
SELECT c.login, sum(b.n_labeled)::bigint AS labels
FROM batch b JOIN contributor c ON c.id = b.contributor_id
WHERE NOT b.quarantined AND NOT c.banned AND c.good_standing
GROUP BY c.login ORDER BY labels DESC, c.login LIMIT 20
"""

# Buckets end at the current one (the one now() falls in) and are aligned to multiples of the bucket width
# since the epoch, so consecutive polls report the same bucket boundaries. Empty buckets come back as 0.
THROUGHPUT_SQL = """
WITH w AS (
    SELECT to_timestamp((floor(extract(epoch FROM now()) / %(s)s) - %(n)s + 1) * %(s)s) AS origin,
           make_interval(secs => %(s)s) AS width
), counted AS (
    SELECT date_bin(w.width, l.created_at, w.origin) AS t, count(*) AS labels
    FROM label l, w
    WHERE l.created_at >= w.origin AND NOT l.is_honeypot
    GROUP BY 1
)
SELECT g.t AS start, coalesce(c.labels, 0) AS labels
FROM w, generate_series(w.origin, w.origin + w.width * (%(n)s - 1), w.width) AS g(t)
LEFT JOIN counted c ON c.t = g.t
ORDER BY g.t
"""


def _totals(splits: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("pairs", "queued", "leased", "labeled", "verified", "disputed", "escalated", "unresolved", "compared")
    return {k: sum(s[k] for s in splits) for k in keys}


def _agreement(verified: int, disputed: int, compared: int, agreement_sum: float) -> dict[str, Any]:
    settled = verified + disputed
    return {
        "verified_share": round(verified / settled, 4) if settled else None,
        "mean_agreement": round(agreement_sum / compared, 4) if compared else None,
    }


def collect_stats(request: Request) -> dict[str, Any]:
    hours = settings_of(request).stats_window_hours
    with engine_of(request).connect() as conn:
        rows = queue.split_summaries(conn)
        activity = conn.exec_driver_sql(ACTIVITY_SQL, {"h": hours}).mappings().one()
        leaderboard = [dict(r) for r in conn.exec_driver_sql(LEADERBOARD_SQL).mappings()]
    agreement_sum = sum(float(r["agreement_sum"]) for r in rows)
    splits = [
        {
            **{k: v for k, v in r.items() if k != "agreement_sum"},
            "mean_agreement": _agreement(0, 0, r["compared"], float(r["agreement_sum"]))["mean_agreement"],
        }
        for r in rows
    ]
    totals = _totals(splits)
    return {
        "splits": splits,
        "totals": totals,
        "agreement": {
            "verified": totals["verified"],
            "disputed": totals["disputed"],
            "escalated": totals["escalated"],
            "unresolved": totals["unresolved"],
            "compared": totals["compared"],
            **_agreement(totals["verified"], totals["disputed"], totals["compared"], agreement_sum),
        },
        "window_hours": hours,
        "labels_per_hour": round(activity["labels"] / hours, 1),
        "labels_total": activity["labels_total"],
        "active_contributors": activity["active_contributors"],
        "contributors": activity["contributors"],
        "leaderboard": leaderboard,
        "generated_at": activity["generated_at"].isoformat(),
    }


def _cacheable(response: Response) -> None:
    response.headers["Cache-Control"] = f"public, max-age={STATS_MAX_AGE_S}"


@router.get("/api/v1/stats")
def stats(request: Request, response: Response) -> dict[str, Any]:
    _cacheable(response)
    return collect_stats(request)


@router.get("/api/v1/stats/throughput")
def throughput(
    request: Request,
    response: Response,
    hours: int = Query(default=1, ge=1, le=MAX_SERIES_HOURS, description="how far back the series reaches"),
    buckets: int = Query(default=60, ge=1, le=MAX_SERIES_BUCKETS, description="number of time buckets"),
) -> dict[str, Any]:
    """Labels received per time bucket (honeypots excluded), oldest bucket first, the last one still filling."""
    bucket_seconds = max(MIN_BUCKET_SECONDS, math.ceil(hours * 3600 / buckets))
    with engine_of(request).connect() as conn:
        rows = conn.exec_driver_sql(THROUGHPUT_SQL, {"s": bucket_seconds, "n": buckets}).all()
    _cacheable(response)
    series = [{"start": r.start.isoformat(), "labels": r.labels} for r in rows]
    return {
        "hours": hours,
        "bucket_seconds": bucket_seconds,
        "buckets": series,
        "labels": sum(b["labels"] for b in series),
    }


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in headers)
    body = (
        "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
        or f'<tr><td colspan="{len(headers)}">nothing yet</td></tr>'
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _static_tables(s: dict[str, Any]) -> str:
    """The numbers as plain tables, for readers without JavaScript (the page's <noscript>)."""
    t = s["totals"]
    cols = ["pairs", "queued", "leased", "labeled", "verified", "disputed", "escalated", "unresolved"]
    splits = _table(["split", "cycle", *cols], [[r["split"], r["cycle"], *(r[c] for c in cols)] for r in s["splits"]])
    board = _table(
        ["#", "contributor", "labels"], [[i + 1, r["login"], r["labels"]] for i, r in enumerate(s["leaderboard"])]
    )
    summary = _table(
        ["verified pairs", "labeled pairs", "queued pairs", "labels / hour", "active contributors"],
        [[t["verified"], t["labeled"], t["queued"], s["labels_per_hour"], s["active_contributors"]]],
    )
    return f"{summary}<h2>Per split and cycle</h2>{splits}<h2>Leaderboard</h2>{board}"


@cache
def _template() -> str:
    return PAGE_TEMPLATE.read_text(encoding="utf-8")


def _script_json(data: dict[str, Any]) -> str:
    """JSON safe inside a <script> element: '<', '>' and '&' never appear raw, so no login or split name
    can close the element or open a comment, whatever it contains."""
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def progress_page(request: Request) -> HTMLResponse:
    s = collect_stats(request)
    nonce = secrets.token_urlsafe(16)
    values = {
        "NONCE": nonce,
        "INITIAL_STATS": _script_json(s),
        "STATIC_TABLES": _static_tables(s),
        "POLL_MS": str(POLL_MS),
    }
    # One pass: text that came from the database is never scanned for placeholders again.
    page = _PLACEHOLDER.sub(lambda m: values[m.group(1)], _template())
    # The page's own script and style carry the nonce; nothing else may run, load or be framed, so even a
    # name that slipped past escaping could not execute. connect-src 'self': the JSON it polls.
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return HTMLResponse(
        page,
        headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    return progress_page(request)


@router.get("/progress", response_class=HTMLResponse)
def progress(request: Request) -> HTMLResponse:
    return progress_page(request)
