"""Initial kombinat schema: contributors, tokens, model registry, pairs, batches, labels, honeypots.

The migrations are the only definition of kombinat's tables (no ORM classes mirror them); the statements that
use them are hand-written SQL in queue.py, auth.py, trust.py and the route modules.

Layout decisions that matter for throughput:
- ``pair`` is narrow (no text) because claim and submit rewrite its rows constantly; the immutable
  query/document text lives in ``pair_content`` and is only read when a batch is handed out.
- A pair has at most one live lease (``lease_batch_id``); redundancy comes from re-queueing it after each
  label until verification settles it, so no pair is ever held by more leases than it still needs labels.
- The lease expiry that counts is ``batch.expires_at`` (one row to extend per chunk); ``pair.lease_expires_at``
  is the initial expiry, a lower bound the claim uses to find candidates cheaply through an index.

What some columns mean:
- ``pair.state`` is the queue's mechanics (queued | leased | done | honeypot), ``pair.status`` the
  verification (new | labeled | verified | disputed | escalated | unresolved).
- ``rate_bucket`` holds fixed-window counters for callers without a token (sign-in), keyed by e.g.
  ``ip:1.2.3.4``; ``model`` is the registry of backend/model/quantization combinations and whether they
  passed qualification.
- ``label.xact`` is the inserting transaction's 64-bit id: the export pages on (xact, label_id) and only hands
  out rows older than every in-flight transaction, so a cursor never skips a label that commits late.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels = None
depends_on = None

# Hand-written DDL: the partial indexes and the SQL function are the point of this schema and are clearer
# as SQL than as ORM metadata.
UPGRADE = r"""
CREATE TABLE contributor (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    github_id bigint UNIQUE,
    login text NOT NULL,
    is_admin boolean NOT NULL DEFAULT false,
    banned boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    reputation double precision NOT NULL DEFAULT 0.8,
    good_standing boolean NOT NULL DEFAULT true,
    trusted boolean NOT NULL DEFAULT false,
    hp_total integer NOT NULL DEFAULT 0,
    hp_correct integer NOT NULL DEFAULT 0,
    agree_total integer NOT NULL DEFAULT 0,
    agree_count double precision NOT NULL DEFAULT 0,
    n_labels integer NOT NULL DEFAULT 0,
    n_relevant integer NOT NULL DEFAULT 0,
    divergence double precision NOT NULL DEFAULT 0,
    quarantined_batches integer NOT NULL DEFAULT 0,
    reputation_updated_at timestamptz
);

CREATE TABLE api_token (
    token_hash text PRIMARY KEY,
    contributor_id bigint NOT NULL REFERENCES contributor(id) ON DELETE CASCADE,
    is_admin boolean NOT NULL DEFAULT false,
    name text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz,
    rl_window bigint NOT NULL DEFAULT 0,
    rl_count integer NOT NULL DEFAULT 0
) WITH (fillfactor = 50);
CREATE INDEX api_token_contributor ON api_token (contributor_id);

CREATE TABLE rate_bucket (
    key text PRIMARY KEY,
    "window" bigint NOT NULL,
    count integer NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

CREATE TABLE model (
    name text PRIMARY KEY,
    backend text NOT NULL CHECK (backend IN ('llama_cpp', 'vllm', 'mlx')),
    model_id text NOT NULL,
    quantization text NOT NULL,
    tier smallint NOT NULL DEFAULT 0,
    hub_repo text NOT NULL DEFAULT '',
    hub_file text NOT NULL DEFAULT '',
    sha256 text NOT NULL DEFAULT '',
    size_bytes bigint NOT NULL DEFAULT 0,
    min_memory_gb double precision NOT NULL DEFAULT 0,
    admitted boolean NOT NULL DEFAULT false,
    qualification jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (backend, model_id, quantization)
);

CREATE TABLE pair (
    pair_id uuid PRIMARY KEY,
    split text NOT NULL,
    cycle text NOT NULL,
    priority double precision NOT NULL DEFAULT 0,
    is_honeypot boolean NOT NULL DEFAULT false,
    state text NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'leased', 'done', 'honeypot')),
    status text NOT NULL DEFAULT 'new'
        CHECK (status IN ('new', 'labeled', 'verified', 'disputed', 'escalated', 'unresolved')),
    tier smallint NOT NULL DEFAULT 0,
    n_labels smallint NOT NULL DEFAULT 0,
    n_relevant smallint NOT NULL DEFAULT 0,
    p_sum real NOT NULL DEFAULT 0,
    lease_batch_id uuid,
    lease_expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
) WITH (fillfactor = 80);
-- Claim and submit rewrite pair rows all the time and every rewrite adds an entry to each index whose
-- predicate the new row meets, so the table carries only the indexes those two statements need
-- (statistics scan the table instead).
-- The claim walks this from the top: only claimable rows are in it, hardest (highest priority) first.
CREATE INDEX pair_queue ON pair (tier DESC, priority DESC) WHERE state = 'queued';
-- Expired leases are found through their initial expiry, oldest first.
CREATE INDEX pair_lease_expiry ON pair (lease_expires_at) WHERE state = 'leased';
CREATE INDEX pair_lease_batch ON pair (lease_batch_id) WHERE lease_batch_id IS NOT NULL;
CREATE INDEX pair_verified ON pair (split, cycle, pair_id) WHERE status = 'verified';

CREATE TABLE pair_content (
    pair_id uuid PRIMARY KEY REFERENCES pair(pair_id) ON DELETE CASCADE,
    query text NOT NULL,
    document text NOT NULL
);

CREATE TABLE honeypot (
    pair_id uuid PRIMARY KEY REFERENCES pair(pair_id) ON DELETE CASCADE,
    relevant boolean NOT NULL,
    grade smallint,
    source text NOT NULL DEFAULT ''
);

CREATE TABLE batch (
    batch_id uuid PRIMARY KEY,
    contributor_id bigint NOT NULL REFERENCES contributor(id),
    backend text NOT NULL,
    model_id text NOT NULL,
    quantization text NOT NULL,
    annotator_version text NOT NULL,
    tier smallint NOT NULL DEFAULT 0,
    size integer NOT NULL DEFAULT 0,
    n_honeypots integer NOT NULL DEFAULT 0,
    n_labeled integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    released_at timestamptz,
    quarantined boolean NOT NULL DEFAULT false,
    hp_checked boolean NOT NULL DEFAULT false
) WITH (fillfactor = 70);
CREATE INDEX batch_contributor ON batch (contributor_id, created_at);
CREATE INDEX batch_created ON batch (created_at);

CREATE TABLE batch_honeypot (
    batch_id uuid NOT NULL,
    pair_id uuid NOT NULL,
    contributor_id bigint NOT NULL,
    released boolean NOT NULL DEFAULT false,
    PRIMARY KEY (batch_id, pair_id),
    -- A contributor sees a honeypot at most once, exactly as it never sees an ordinary pair twice.
    UNIQUE (pair_id, contributor_id)
);

CREATE TABLE label (
    label_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xact bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    pair_id uuid NOT NULL REFERENCES pair(pair_id),
    contributor_id bigint NOT NULL,
    batch_id uuid NOT NULL,
    relevant boolean NOT NULL,
    p_relevant real NOT NULL,
    grade smallint,
    truncated boolean NOT NULL DEFAULT false,
    seconds real NOT NULL DEFAULT 0,
    backend text NOT NULL,
    model_id text NOT NULL,
    quantization text NOT NULL,
    annotator_version text NOT NULL,
    tier smallint NOT NULL DEFAULT 0,
    is_honeypot boolean NOT NULL DEFAULT false,
    quarantined boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pair_id, contributor_id)
);
-- Per-contributor questions (reputation) go through the contributor's batches, not a separate index.
CREATE INDEX label_batch ON label (batch_id);
CREATE INDEX label_export ON label (xact, label_id);
CREATE INDEX label_created ON label USING brin (created_at);

-- The verification rule, written once and used by both the incremental path (label submit) and the
-- recomputation after quarantine or a change of standing, so the two can never disagree.
-- n, r: counted labels and how many of them say relevant, at the pair's current tier.
CREATE FUNCTION kombinat_next(
    n integer, r integer, tier integer, min_agree double precision, max_per_tier integer, max_tier integer,
    OUT status text, OUT state text, OUT new_tier integer, OUT escalated boolean
) LANGUAGE sql IMMUTABLE AS $$
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
$$;
"""

DOWNGRADE = r"""
DROP FUNCTION IF EXISTS kombinat_next(integer, integer, integer, double precision, integer, integer);
DROP TABLE IF EXISTS label, batch_honeypot, batch, honeypot, pair_content, pair, model, rate_bucket,
    api_token, contributor CASCADE;
"""


def _run(script: str) -> None:
    # One statement per execute: the driver's extended protocol refuses several commands in one call.
    for statement in script.split(";\n"):
        if statement.strip():
            op.execute(statement)


def upgrade() -> None:
    _run(UPGRADE)


def downgrade() -> None:
    _run(DOWNGRADE)
