"""Reputation: honeypot accuracy, agreement with other contributors, and how far a contributor's share of
'relevant' verdicts strays from the population's. Recomputed from the labels (never incrementally drifted)
when a batch completes or is quarantined; a change of standing recounts every pair the contributor touched.
Besides the weighted reputation, an agreement test (a binomial test over the window's comparisons) takes the
standing of a contributor whose labels the others contradict far beyond honest disagreement: the check that goes
on once the honeypots it may be shown are spent.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine

from kombinat_api import queue
from kombinat_api.settings import Settings

# Priors (pseudo-counts) so that a contributor with little history is neither trusted nor condemned.
HP_PRIOR, HP_PRIOR_WEIGHT = 0.75, 5.0
AGREE_PRIOR, AGREE_PRIOR_WEIGHT = 0.75, 10.0
RATE_PRIOR_WEIGHT = 20.0
W_HONEYPOT, W_AGREEMENT, W_DIVERGENCE = 0.5, 0.3, 0.2
QUARANTINE_PENALTY = 0.05


@dataclass
class Reputation:
    reputation: float
    honeypot_accuracy: float | None
    agreement: float | None
    divergence: float
    good_standing: bool
    trusted: bool
    # the agreement test rejected an honest agreement rate (the standing is then lost whatever the reputation)
    agreement_implausible: bool = False


def score(
    hp_total: int,
    hp_correct: int,
    agree_total: int,
    agree_count: float,
    n_labels: int,
    n_relevant: int,
    population_rate: float | None,
    quarantined_batches: int,
    banned: bool,
    settings: Settings,
) -> Reputation:
    hp_s = (hp_correct + HP_PRIOR * HP_PRIOR_WEIGHT) / (hp_total + HP_PRIOR_WEIGHT)
    agree_s = (agree_count + AGREE_PRIOR * AGREE_PRIOR_WEIGHT) / (agree_total + AGREE_PRIOR_WEIGHT)
    divergence = 0.0
    if population_rate is not None and n_labels > 0:
        # Shrunk toward the population so that a short run of one verdict is not mistaken for bias.
        own = (n_relevant + population_rate * RATE_PRIOR_WEIGHT) / (n_labels + RATE_PRIOR_WEIGHT)
        divergence = abs(own - population_rate)
    rep = (
        W_HONEYPOT * hp_s
        + W_AGREEMENT * agree_s
        + W_DIVERGENCE * (1.0 - min(1.0, 2.0 * divergence))
        - QUARANTINE_PENALTY * quarantined_batches
    )
    rep = min(1.0, max(0.0, rep))
    # The honeypots a contributor may see run out (each goes to a few contributors only); this test keeps checking
    # it on ordinary pairs. Ties count one half, so the misses are rounded toward agreement.
    disagreed = int(agree_total - agree_count)
    agreement_implausible = agree_total >= settings.agreement_min_compared and disagreed >= queue.implausible_misses(
        agree_total, settings.agreement_honest, settings.agreement_alpha
    )
    good = not banned and rep >= settings.min_reputation and not agreement_implausible
    hp_raw = hp_correct / hp_total if hp_total else None
    trusted = (
        good
        and hp_total >= settings.trust_min_honeypots
        and hp_raw is not None
        and hp_raw >= settings.honeypot_min_accuracy
        and rep >= settings.trust_min_reputation
    )
    return Reputation(
        reputation=rep,
        honeypot_accuracy=hp_raw,
        agreement=agree_count / agree_total if agree_total else None,
        divergence=divergence,
        good_standing=good,
        trusted=trusted,
        agreement_implausible=agreement_implausible,
    )


# Agreement compares a label with the *other* counted labels of the same pair (the caller's own vote is
# taken out of the pair's tallies when it counts); a tie among the others scores one half.
STATS_SQL = """
WITH lab AS (
    SELECT l.relevant, l.is_honeypot, l.quarantined, h.relevant AS gold,
           p.n_labels - (NOT l.quarantined AND l.tier >= p.tier AND c.good_standing)::int AS on_,
           p.n_relevant
               - (NOT l.quarantined AND l.tier >= p.tier AND c.good_standing AND l.relevant)::int AS or_
    -- The contributor's most recent batches only: a refresh costs the same for a veteran as for a newcomer
    -- (over the whole history it grew with every label: ~20 us each), and recent work is what the standing
    -- should reflect.
    FROM (SELECT batch_id FROM batch WHERE contributor_id = %(cid)s
          ORDER BY created_at DESC LIMIT %(window)s) b
    -- One probe of label's batch index per batch of the contributor. OFFSET 0 keeps it that way: as a
    -- plain join the planner hashed a sequential scan of every label (one refresh cost grew with the whole
    -- table: 300+ ms at 150k labels).
    CROSS JOIN LATERAL (SELECT * FROM label l WHERE l.batch_id = b.batch_id OFFSET 0) l
    JOIN contributor c ON c.id = l.contributor_id
    JOIN pair p ON p.pair_id = l.pair_id
    LEFT JOIN honeypot h ON h.pair_id = l.pair_id
)
SELECT
    count(*) FILTER (WHERE is_honeypot) AS hp_total,
    count(*) FILTER (WHERE is_honeypot AND relevant = gold) AS hp_correct,
    count(*) FILTER (WHERE NOT is_honeypot AND on_ >= 1) AS agree_total,
    coalesce(sum(CASE WHEN on_ < 1 OR is_honeypot THEN 0
                      WHEN or_ * 2 = on_ THEN 0.5
                      WHEN (or_ * 2 > on_) = relevant THEN 1 ELSE 0 END), 0) AS agree_count,
    count(*) FILTER (WHERE NOT is_honeypot) AS n_labels,
    count(*) FILTER (WHERE NOT is_honeypot AND relevant) AS n_relevant,
    -- quarantines within the same recent window: an old misfortune stops weighing once it is out of it
    (SELECT count(*) FROM (SELECT quarantined FROM batch WHERE contributor_id = %(cid)s
                           ORDER BY created_at DESC LIMIT %(window)s) w WHERE quarantined) AS quarantined_batches,
    (SELECT banned FROM contributor WHERE id = %(cid)s) AS banned,
    (SELECT good_standing FROM contributor WHERE id = %(cid)s) AS was_good,
    (SELECT sum(n_relevant)::float8 / nullif(sum(n_labels), 0) FROM contributor
        WHERE id <> %(cid)s AND n_labels > 0) AS population_rate
FROM lab
"""

UPDATE_SQL = """
UPDATE contributor SET reputation = %(rep)s, good_standing = %(good)s, trusted = %(trusted)s,
    hp_total = %(hp_total)s, hp_correct = %(hp_correct)s, agree_total = %(agree_total)s,
    agree_count = %(agree_count)s, n_labels = %(n_labels)s, n_relevant = %(n_relevant)s,
    divergence = %(div)s, quarantined_batches = %(qb)s, reputation_updated_at = now()
WHERE id = %(cid)s
"""

CONTRIBUTOR_PAIRS_SQL = """
SELECT pair_id FROM label
WHERE batch_id IN (SELECT batch_id FROM batch WHERE contributor_id = %(cid)s) AND NOT is_honeypot
"""


RECENT_SQL = """
SELECT reputation_updated_at > now() - make_interval(secs => %(s)s) FROM contributor WHERE id = %(cid)s
"""


def refresh(conn: Connection, contributor_id: int, settings: Settings, force: bool = True) -> Reputation | None:
    """Recompute one contributor's reputation from its labels. Without ``force`` a contributor refreshed
    within ``reputation_refresh_s`` is skipped: completed batches trigger this, and a busy contributor
    completes several a minute while its aggregate barely moves."""
    if not force:
        recent = conn.exec_driver_sql(RECENT_SQL, {"cid": contributor_id, "s": settings.reputation_refresh_s})
        if recent.scalar():
            return None
    row = conn.exec_driver_sql(STATS_SQL, {"cid": contributor_id, "window": settings.reputation_window_batches}).one()
    if row.banned is None:
        return None
    rep = score(
        hp_total=row.hp_total,
        hp_correct=row.hp_correct,
        agree_total=row.agree_total,
        agree_count=float(row.agree_count),
        n_labels=row.n_labels,
        n_relevant=row.n_relevant,
        population_rate=row.population_rate,
        quarantined_batches=row.quarantined_batches,
        banned=row.banned,
        settings=settings,
    )
    conn.exec_driver_sql(
        UPDATE_SQL,
        {
            "rep": rep.reputation,
            "good": rep.good_standing,
            "trusted": rep.trusted,
            "hp_total": row.hp_total,
            "hp_correct": row.hp_correct,
            "agree_total": row.agree_total,
            "agree_count": float(row.agree_count),
            "n_labels": row.n_labels,
            "n_relevant": row.n_relevant,
            "div": rep.divergence,
            "qb": row.quarantined_batches,
            "cid": contributor_id,
        },
    )
    if rep.good_standing != row.was_good:
        # The contributor's labels start or stop counting: every pair it labeled is recounted.
        pairs = [r[0] for r in conn.exec_driver_sql(CONTRIBUTOR_PAIRS_SQL, {"cid": contributor_id})]
        recompute_in_chunks(conn, pairs, settings)
    return rep


def recompute_in_chunks(conn: Connection, pair_ids: Sequence[uuid.UUID], settings: Settings, chunk: int = 5000) -> None:
    for i in range(0, len(pair_ids), chunk):
        queue.recompute_pairs(
            conn,
            pair_ids[i : i + chunk],
            settings.verify_min_agreement,
            settings.max_labels_per_tier,
            settings.max_tier,
            settings.quorum_distinct_models,
        )


def after_submit(
    engine: Engine,
    batch_id: uuid.UUID,
    contributor_id: int,
    check_honeypots: bool,
    complete: bool,
    escalated: Sequence[uuid.UUID],
    settings: Settings,
) -> None:
    """Follow-up work of a label chunk, run after the response is sent (it reveals nothing to the caller):
    honeypot check and quarantine, recount of touched pairs, reputation refresh."""
    with engine.begin() as conn:
        if escalated:
            recompute_in_chunks(conn, list(escalated), settings)
        verdict = None
        if check_honeypots and settings.honeypot_quarantine:
            verdict = queue.check_batch_honeypots(
                conn,
                batch_id,
                settings.honeypot_honest_accuracy,
                settings.quarantine_alpha,
                settings.quarantine_history_batches,
            )
        if verdict is not None and verdict.newly_quarantined:
            recompute_in_chunks(conn, verdict.touched_pairs, settings)
        if verdict is not None and verdict.newly_quarantined:
            refresh(conn, contributor_id, settings)
        elif complete:
            refresh(conn, contributor_id, settings, force=False)
