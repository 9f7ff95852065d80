"""Public statistics: JSON and a small readable page. Honeypots are left out of every count."""

from __future__ import annotations

import html
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from kombinat_api.routes.deps import engine_of, settings_of

router = APIRouter(tags=["public"])

SPLITS_SQL = """
SELECT split, cycle,
       count(*) AS pairs,
       count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'leased') AS leased,
       count(*) FILTER (WHERE n_labels > 0 OR status <> 'new') AS labeled,
       count(*) FILTER (WHERE status = 'verified') AS verified,
       count(*) FILTER (WHERE status = 'disputed') AS disputed,
       count(*) FILTER (WHERE status = 'escalated') AS escalated
FROM pair WHERE NOT is_honeypot
GROUP BY split, cycle ORDER BY split, cycle
"""

# Throughput comes from batches (few rows) rather than from scanning labels.
ACTIVITY_SQL = """
SELECT (SELECT count(*) FROM label WHERE created_at > now() - make_interval(hours => %(h)s)) AS labels,
       (SELECT count(DISTINCT contributor_id) FROM batch
            WHERE created_at > now() - make_interval(hours => %(h)s)) AS active_contributors,
       (SELECT count(*) FROM contributor WHERE NOT is_admin) AS contributors,
       (SELECT count(*) FROM label) AS labels_total
"""

LEADERBOARD_SQL = """
SELECT c.login, sum(b.n_labeled)::bigint AS labels
FROM batch b JOIN contributor c ON c.id = b.contributor_id
WHERE NOT b.quarantined AND NOT c.banned
GROUP BY c.login ORDER BY labels DESC, c.login LIMIT 20
"""


def collect_stats(request: Request) -> dict[str, Any]:
    hours = settings_of(request).stats_window_hours
    with engine_of(request).connect() as conn:
        splits = [dict(r) for r in conn.exec_driver_sql(SPLITS_SQL).mappings()]
        activity = conn.exec_driver_sql(ACTIVITY_SQL, {"h": hours}).mappings().one()
        leaderboard = [dict(r) for r in conn.exec_driver_sql(LEADERBOARD_SQL).mappings()]
    totals = {k: sum(s[k] for s in splits) for k in ("pairs", "queued", "leased", "labeled", "verified", "disputed")}
    return {
        "splits": splits,
        "totals": totals,
        "labels_per_hour": round(activity["labels"] / hours, 1),
        "labels_total": activity["labels_total"],
        "active_contributors": activity["active_contributors"],
        "contributors": activity["contributors"],
        "leaderboard": leaderboard,
    }


@router.get("/api/v1/stats")
def stats(request: Request) -> dict[str, Any]:
    return collect_stats(request)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = (
        "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
        or f'<tr><td colspan="{len(headers)}">nothing yet</td></tr>'
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    s = collect_stats(request)
    t = s["totals"]
    splits = _table(
        ["split", "cycle", "pairs", "queued", "leased", "labeled", "verified", "disputed", "escalated"],
        [
            [
                r["split"],
                r["cycle"],
                r["pairs"],
                r["queued"],
                r["leased"],
                r["labeled"],
                r["verified"],
                r["disputed"],
                r["escalated"],
            ]
            for r in s["splits"]
        ],
    )
    board = _table(
        ["#", "contributor", "labels"],
        [[i + 1, r["login"], r["labels"]] for i, r in enumerate(s["leaderboard"])],
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Embed Kombinat</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }}
h1 {{ margin-bottom: 0.2rem; }} .sub {{ color: #666; margin-top: 0; }}
.cards {{ display: flex; gap: 1rem; flex-wrap: wrap; margin: 1.5rem 0; }}
.card {{ border: 1px solid #ddd; border-radius: 8px; padding: 0.8rem 1.2rem; min-width: 9rem; }}
.card b {{ display: block; font-size: 1.6rem; }}
table {{ border-collapse: collapse; width: 100%; margin-bottom: 2rem; }}
th, td {{ text-align: right; padding: 0.3rem 0.6rem; border-bottom: 1px solid #eee; }}
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) {{ text-align: left; }}
</style></head><body>
<h1>Embed Kombinat</h1>
<p class="sub">Volunteer-labeled, LLM-verified training pairs for embedding models.
Machine-readable: <a href="/api/v1/stats">/api/v1/stats</a>.</p>
<div class="cards">
<div class="card"><b>{t["verified"]:,}</b>verified pairs</div>
<div class="card"><b>{t["labeled"]:,}</b>labeled pairs</div>
<div class="card"><b>{t["queued"]:,}</b>queued pairs</div>
<div class="card"><b>{s["labels_per_hour"]:,}</b>labels / hour</div>
<div class="card"><b>{s["active_contributors"]:,}</b>active contributors</div>
</div>
<h2>Per split and cycle</h2>
{splits}
<h2>Leaderboard</h2>
{board}
</body></html>"""
    return HTMLResponse(page)
