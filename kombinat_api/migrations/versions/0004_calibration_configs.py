"""Labels worth trusting: server-side calibration, prompt versions, and model configurations in the quorum.

- ``model.prompt_version`` names the prompt wording a model's labels must be made with (a claim with another
  one is refused), ``model.calibration`` maps the model's raw score to a calibrated probability and a verdict
  (kombinat_api/calibration.py is its one definition).
- ``batch.prompt_version`` and ``batch.calibration`` are the registry's values when the batch was claimed: every
  label of a batch is judged with the calibration that was fitted for the wording it was claimed with, even if
  the registry changes while the batch is out (and a replica may cache them for the batch's lifetime).
- ``label.prompt_version`` and ``label.p_calibrated`` (NULL when the model had no calibration); ``label.relevant``
  is then kombinat's verdict, not the annotator's.
- A label's model configuration is (model_id, quantization, prompt_version), whatever the backend. ``pair``
  records the quorum's tallies (``n_votes``, ``n_votes_relevant``: labels, or configurations when
  ``KOMBINAT_QUORUM_DISTINCT_MODELS`` is on) and, once verified, ``n_model_configs``: how many configurations'
  own majority agrees with the verdict.
- ``kombinat_next`` takes the votes besides the labels (verification looks at the votes, escalation at the
  labels, so a pair that only one configuration ever labels still escalates instead of circling forever), and
  ``kombinat_count`` is the one recount of a pair from its labels, used by the recomputation, by the submit in
  distinct-model mode and, once a pair is verified, for its ``n_model_configs``.

Revision ID: 0004_calibration_configs
Revises: 0003_keep_queue_pages
Create Date: 2026-12-09
"""

from __future__ import annotations

from alembic import op

revision: str = "0004_calibration_configs"
down_revision: str | None = "0003_keep_queue_pages"
branch_labels = None
depends_on = None

OLD_SIGNATURE = "kombinat_next(integer, integer, integer, double precision, integer, integer)"
OLD_ARGS = "n integer, r integer, tier integer, min_agree double precision, max_per_tier integer, max_tier integer"
NEW_SIGNATURE = "kombinat_next(integer, integer, integer, integer, real, integer, double precision, integer, integer)"
NEW_ARGS = (
    "n integer, r integer, vn integer, vr integer, ps real, tier integer, min_agree double precision, "
    "max_per_tier integer, max_tier integer"
)
COUNT_SIGNATURE = "kombinat_count(uuid, integer, boolean, text, text, text, boolean, real)"

# 0002's rule, for the downgrade.
OLD_RULE_BODY = r"""
    SELECT
        CASE v WHEN 'verified' THEN 'verified'
               WHEN 'escalate' THEN CASE WHEN tier < max_tier THEN 'escalated' ELSE 'unresolved' END
               ELSE CASE WHEN tier > 0 THEN 'escalated' ELSE v END END,
        CASE WHEN v = 'verified' OR (v = 'escalate' AND tier >= max_tier) THEN 'done' ELSE 'queued' END,
        CASE WHEN v = 'escalate' AND tier < max_tier THEN tier + 1 ELSE tier END,
        v = 'escalate' AND tier < max_tier
    FROM (SELECT CASE
        WHEN n >= 2 AND greatest(r, n - r) >= 2 AND greatest(r, n - r)::double precision / n >= min_agree
            THEN 'verified'
        WHEN n >= max_per_tier THEN 'escalate'
        WHEN n >= 2 THEN 'disputed'
        WHEN n = 1 THEN 'labeled'
        ELSE 'new' END AS v) s
"""

# n, r: counted labels and how many say relevant; vn, vr: the quorum's votes (= n, r unless configurations vote);
# ps: the labels' summed probability. With vn = n and vr = r the rule is exactly 0002's (two labels that are not
# verified always disagree there). Only the votes verify; escalation looks at the labels, so a pair labeled by
# one configuration alone (one vote however many labels) escalates after max_per_tier labels; agreeing labels
# that are not yet enough votes leave the pair 'labeled', and 'disputed' keeps meaning that its labels disagree.
# Besides the outcome (status, state, tier) it returns the tallies the pair keeps: as given, or 0 when it moves
# up a tier (only labels of the new tier count there).
NEW_RULE_BODY = r"""
    SELECT st, sa, nt, CASE WHEN esc THEN 0 ELSE n END, CASE WHEN esc THEN 0 ELSE r END,
           CASE WHEN esc THEN 0 ELSE vn END, CASE WHEN esc THEN 0 ELSE vr END, CASE WHEN esc THEN 0 ELSE ps END
    FROM (SELECT
        CASE v WHEN 'verified' THEN 'verified'
               WHEN 'escalate' THEN CASE WHEN tier < max_tier THEN 'escalated' ELSE 'unresolved' END
               ELSE CASE WHEN tier > 0 THEN 'escalated' ELSE v END END AS st,
        CASE WHEN v = 'verified' OR (v = 'escalate' AND tier >= max_tier) THEN 'done' ELSE 'queued' END AS sa,
        CASE WHEN v = 'escalate' AND tier < max_tier THEN tier + 1 ELSE tier END AS nt,
        v = 'escalate' AND tier < max_tier AS esc
    FROM (SELECT CASE
        WHEN vn >= 2 AND greatest(vr, vn - vr) >= 2 AND greatest(vr, vn - vr)::double precision / vn >= min_agree
            THEN 'verified'
        WHEN n >= max_per_tier THEN 'escalate'
        WHEN n >= 2 AND r > 0 AND r < n THEN 'disputed'
        WHEN n >= 1 THEN 'labeled'
        ELSE 'new' END AS v) s) o
"""

# A pair's counted labels at its tier (not quarantined, contributor in good standing), plus one label that the
# calling statement is inserting (it cannot see its own insert) when lrel is not null, grouped by model
# configuration. A configuration votes with its labels' majority (a tie abstains).
# n, r: labels, relevant labels; vn, vr: the quorum's votes (configurations when dm, else labels);
# ps: sum of the labels' probabilities (calibrated where the model had a calibration);
# a: configurations whose vote is the quorum's majority verdict (relevant iff 2·vr >= vn).
# Set-returning, STABLE and not STRICT so that the planner inlines it; its label read is bounded by the pair.
COUNT_BODY = r"""
    SELECT n, r, vn, vr, ps, CASE WHEN 2 * vr >= vn THEN cr ELSE ci END
    FROM (SELECT n, r, ps, cr, ci,
                 CASE WHEN dm THEN cr + ci ELSE n END AS vn,
                 CASE WHEN dm THEN cr ELSE r END AS vr
          FROM (SELECT coalesce(sum(g.cn), 0)::integer AS n,
                       coalesce(sum(g.crel), 0)::integer AS r,
                       coalesce(sum(g.cp), 0)::real AS ps,
                       (count(*) FILTER (WHERE 2 * g.crel > g.cn))::integer AS cr,
                       (count(*) FILTER (WHERE 2 * g.crel < g.cn))::integer AS ci
                FROM (SELECT count(*) AS cn, count(*) FILTER (WHERE s.rel) AS crel, sum(s.p) AS cp
                      FROM (SELECT l.model_id AS m, l.quantization AS q, l.prompt_version AS v, l.relevant AS rel,
                                   coalesce(l.p_calibrated, l.p_relevant) AS p
                            FROM label l
                            WHERE l.pair_id = pid AND NOT l.quarantined AND l.tier >= ptier
                              AND EXISTS (SELECT 1 FROM contributor c
                                          WHERE c.id = l.contributor_id AND c.good_standing)
                            UNION ALL
                            SELECT lm, lq, lv, lrel, lp WHERE lrel IS NOT NULL) s
                      GROUP BY s.m, s.q, s.v) g) t) u
"""

UPGRADE = [
    r"""ALTER TABLE model
        ADD COLUMN prompt_version text NOT NULL DEFAULT 'p1' CHECK (prompt_version ~ '^[a-z][a-z0-9._-]{0,31}$'),
        ADD COLUMN calibration jsonb""",
    "ALTER TABLE batch ADD COLUMN prompt_version text NOT NULL DEFAULT 'p1', ADD COLUMN calibration jsonb",
    "ALTER TABLE label ADD COLUMN prompt_version text NOT NULL DEFAULT 'p1', ADD COLUMN p_calibrated real",
    """ALTER TABLE pair ADD COLUMN n_votes smallint NOT NULL DEFAULT 0,
        ADD COLUMN n_votes_relevant smallint NOT NULL DEFAULT 0, ADD COLUMN n_model_configs smallint""",
    f"DROP FUNCTION {OLD_SIGNATURE}",
    f"""CREATE FUNCTION kombinat_next({NEW_ARGS})
    RETURNS TABLE (status text, state text, new_tier integer,
                   n_labels integer, n_relevant integer, n_votes integer, n_votes_relevant integer, p_sum real)
    LANGUAGE sql IMMUTABLE AS $${NEW_RULE_BODY}$$""",
    """CREATE FUNCTION kombinat_count(pid uuid, ptier integer, dm boolean,
                                      lm text, lq text, lv text, lrel boolean, lp real)
    RETURNS TABLE (n integer, r integer, vn integer, vr integer, ps real, a integer)
    LANGUAGE sql STABLE AS $$"""
    + COUNT_BODY
    + "$$",
    # Until now every counted label was a vote; pairs verified before this migration get their configurations.
    """UPDATE pair p SET n_votes = p.n_labels, n_votes_relevant = p.n_relevant,
        n_model_configs = CASE WHEN p.status = 'verified'
            THEN (SELECT c.a FROM kombinat_count(p.pair_id, p.tier, false, NULL, NULL, NULL, NULL, NULL) c) END
    WHERE p.n_labels > 0 OR p.status = 'verified'""",
]

DOWNGRADE = [
    f"DROP FUNCTION {COUNT_SIGNATURE}",
    f"DROP FUNCTION {NEW_SIGNATURE}",
    f"""CREATE FUNCTION kombinat_next({OLD_ARGS})
    RETURNS TABLE (status text, state text, new_tier integer, escalated boolean)
    LANGUAGE sql IMMUTABLE AS $${OLD_RULE_BODY}$$""",
    "ALTER TABLE pair DROP COLUMN n_model_configs, DROP COLUMN n_votes_relevant, DROP COLUMN n_votes",
    "ALTER TABLE label DROP COLUMN p_calibrated, DROP COLUMN prompt_version",
    "ALTER TABLE batch DROP COLUMN calibration, DROP COLUMN prompt_version",
    "ALTER TABLE model DROP COLUMN calibration, DROP COLUMN prompt_version",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
