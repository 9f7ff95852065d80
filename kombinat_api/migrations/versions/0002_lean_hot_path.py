"""Leaner hot path: an inlinable verification rule, fewer index and trigger writes per label.

- ``kombinat_next`` becomes a set-returning SQL function. PostgreSQL inlines only set-returning SQL
  functions, so the submit no longer runs the SQL-function executor once per label (it was a third of the
  submit statement's time).
- ``label`` keeps one unique index where it had two: the natural key (pair_id, contributor_id) becomes the
  primary key and the surrogate ``label_id`` key goes (``label_id`` stays, still unique by its identity
  sequence, and ``label_export`` still orders the export by it).
- ``pair_lease_batch`` goes: one index entry less for every pair a claim leases.
- ``batch.hp_wrong`` counts the batch's wrong honeypot answers, so the honeypot check after a chunk runs
  only for batches that have one (a batch without a wrong answer cannot fall below the bar).
- The foreign key label → pair goes: its per-row trigger cost as much as the insert itself, and the submit
  accepts a label only for a pair it has just locked in the caller's own lease (pairs are never deleted).

Revision ID: 0002_lean_hot_path
Revises: 0001_initial
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision: str = "0002_lean_hot_path"
down_revision: str | None = "0001_initial"
branch_labels = None
depends_on = None

RULE_BODY = r"""
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

SIGNATURE = "kombinat_next(integer, integer, integer, double precision, integer, integer)"
ARGS = "n integer, r integer, tier integer, min_agree double precision, max_per_tier integer, max_tier integer"

UPGRADE = [
    f"DROP FUNCTION {SIGNATURE}",
    # Exactly one row for any input; declared as a set only so that the planner inlines it.
    f"""CREATE FUNCTION kombinat_next({ARGS})
    RETURNS TABLE (status text, state text, new_tier integer, escalated boolean)
    LANGUAGE sql IMMUTABLE AS $${RULE_BODY}$$""",
    "ALTER TABLE label DROP CONSTRAINT label_pair_id_fkey",
    "ALTER TABLE label DROP CONSTRAINT label_pkey",
    "ALTER TABLE label DROP CONSTRAINT label_pair_id_contributor_id_key",
    "ALTER TABLE label ADD CONSTRAINT label_pkey PRIMARY KEY (pair_id, contributor_id)",
    # Every lease wrote an entry here; the submit finds its pairs through the primary key of the labels it
    # carries, and a release (rare) walks the live leases instead.
    "DROP INDEX pair_lease_batch",
    "ALTER TABLE batch ADD COLUMN hp_wrong integer NOT NULL DEFAULT 0",
    # batches handed out before this migration: count their wrong honeypot answers once
    """UPDATE batch b SET hp_wrong = w.n FROM (
        SELECT l.batch_id, count(*) AS n FROM label l JOIN honeypot h USING (pair_id)
        WHERE l.is_honeypot AND l.relevant <> h.relevant GROUP BY l.batch_id) w
    WHERE b.batch_id = w.batch_id""",
]

DOWNGRADE = [
    "ALTER TABLE batch DROP COLUMN hp_wrong",
    "CREATE INDEX pair_lease_batch ON pair (lease_batch_id) WHERE lease_batch_id IS NOT NULL",
    "ALTER TABLE label DROP CONSTRAINT label_pkey",
    "ALTER TABLE label ADD CONSTRAINT label_pair_id_contributor_id_key UNIQUE (pair_id, contributor_id)",
    "ALTER TABLE label ADD CONSTRAINT label_pkey PRIMARY KEY (label_id)",
    "ALTER TABLE label ADD CONSTRAINT label_pair_id_fkey FOREIGN KEY (pair_id) REFERENCES pair(pair_id)",
    f"DROP FUNCTION {SIGNATURE}",
    f"""CREATE FUNCTION kombinat_next({ARGS},
    OUT status text, OUT state text, OUT new_tier integer, OUT escalated boolean)
    LANGUAGE sql IMMUTABLE AS $${RULE_BODY}$$""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
