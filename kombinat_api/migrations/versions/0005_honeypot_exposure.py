"""Honeypots that last and hide: each gold pair's exposure is counted and capped, and it is out to one batch at a time.

- ``honeypot.served``: how many contributors it has been handed to; ``retired`` once that reaches
  ``KOMBINAT_HONEYPOT_MAX_EXPOSURE`` (set by the claim that hands it out for the last time; kombinat re-derives it
  from ``served`` at start-up, so a changed cap applies to the whole pool). An ordinary pair is labeled by a few
  contributors and then never shown again, so a honeypot shown to everyone would stand out to accounts that
  compare what they were served.
- ``honeypot.held_by`` / ``held_until``: the batch it is out with and that batch's lease. While held, no other
  claim takes it, exactly as a leased ordinary pair is in one batch at a time; before this, two accounts
  claiming at once were served the same honeypots, which ordinary pairs never are.

The claim's scan reads a partial index of the unretired honeypots in key order and tests the hold with
``kombinat_hp_free`` (inlined by the planner: no per-row function call). Holds follow their batch by triggers,
so the hot submit and release statements stay as they were: a honeypot label's insert, or its batch_honeypot
row turning ``released``, frees it; a batch whose lease is extended (every chunk) extends its holds.
``served`` is backfilled from ``batch_honeypot``.

Revision ID: 0005_honeypot_exposure
Revises: 0004_calibration_configs
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision: str = "0005_honeypot_exposure"
down_revision: str | None = "0004_calibration_configs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE honeypot
    ADD COLUMN served integer NOT NULL DEFAULT 0,
    ADD COLUMN retired boolean NOT NULL DEFAULT false,
    ADD COLUMN held_by uuid,
    ADD COLUMN held_until timestamptz;
UPDATE honeypot h SET served = s.n
FROM (SELECT pair_id, count(*)::int AS n FROM batch_honeypot GROUP BY pair_id) s
WHERE s.pair_id = h.pair_id;
-- served and the hold change on every claim that hands the honeypot out: room for HOT updates
ALTER TABLE honeypot SET (fillfactor = 70);
CREATE INDEX honeypot_unretired ON honeypot (pair_id) WHERE NOT retired;
CREATE INDEX honeypot_held ON honeypot (held_by) WHERE held_by IS NOT NULL;

-- Not out with any batch now. A plain expression (no sub-select), so the planner inlines it.
CREATE FUNCTION kombinat_hp_free(held_until timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$ SELECT held_until IS NULL OR held_until < now() $$;

CREATE FUNCTION kombinat_free_honeypot() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE honeypot SET held_by = NULL, held_until = NULL
    WHERE pair_id = NEW.pair_id AND held_by = NEW.batch_id;
    RETURN NULL;
END $$;

CREATE FUNCTION kombinat_extend_holds() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE honeypot SET held_until = NEW.expires_at WHERE held_by = NEW.batch_id;
    RETURN NULL;
END $$;

CREATE TRIGGER honeypot_answered AFTER INSERT ON label
    FOR EACH ROW WHEN (NEW.is_honeypot) EXECUTE FUNCTION kombinat_free_honeypot();
CREATE TRIGGER honeypot_released AFTER UPDATE OF released ON batch_honeypot
    FOR EACH ROW WHEN (NEW.released AND NOT OLD.released) EXECUTE FUNCTION kombinat_free_honeypot();
CREATE TRIGGER honeypot_hold_extended AFTER UPDATE OF expires_at ON batch
    FOR EACH ROW WHEN (NEW.n_honeypots > 0 AND NEW.expires_at > OLD.expires_at)
    EXECUTE FUNCTION kombinat_extend_holds();
""")


def downgrade() -> None:
    op.execute("""
DROP TRIGGER honeypot_hold_extended ON batch;
DROP TRIGGER honeypot_released ON batch_honeypot;
DROP TRIGGER honeypot_answered ON label;
DROP FUNCTION kombinat_extend_holds();
DROP FUNCTION kombinat_free_honeypot();
DROP FUNCTION kombinat_hp_free(timestamptz);
DROP INDEX honeypot_held;
DROP INDEX honeypot_unretired;
ALTER TABLE honeypot RESET (fillfactor);
ALTER TABLE honeypot DROP COLUMN held_until, DROP COLUMN held_by, DROP COLUMN retired, DROP COLUMN served;
""")
