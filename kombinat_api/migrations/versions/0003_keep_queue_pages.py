"""Queue tables keep their trailing pages: VACUUM never truncates ``pair`` or ``batch``.

Truncating a table's empty tail takes an ACCESS EXCLUSIVE lock, and on a table that every claim and submit
touches, each truncation queues every request behind it (upkeep vacuums these tables every 30 s). A precaution:
one ``bench/queue.py`` run had a stall of 1-2.4 s in which every request was slow, whose cause was not caught;
truncation is the one step of VACUUM that can block the queue's DML. Space freed inside a queue table is reused
by the next leases and labels anyway, so the tail is kept (``vacuum_truncate``, PostgreSQL 12+; it applies to
autovacuum and to upkeep's VACUUM alike).

Revision ID: 0003_keep_queue_pages
Revises: 0002_lean_hot_path
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision: str = "0003_keep_queue_pages"
down_revision: str | None = "0002_lean_hot_path"
branch_labels = None
depends_on = None

QUEUE_TABLES = ("pair", "batch")


def upgrade() -> None:
    for table in QUEUE_TABLES:
        op.execute(f"ALTER TABLE {table} SET (vacuum_truncate = false)")


def downgrade() -> None:
    for table in QUEUE_TABLES:
        op.execute(f"ALTER TABLE {table} RESET (vacuum_truncate)")
