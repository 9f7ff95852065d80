"""SQLModel tables. The schema itself is created only by the Alembic migrations in ``migrations/``;
these classes mirror it for typed access outside the hot paths (which use hand-written SQL in queue.py).

Layout decisions that matter for throughput:
- ``pair`` is narrow (no text) because claim and submit rewrite its rows constantly; the immutable
  query/document text lives in ``pair_content`` and is only read when a batch is handed out.
- A pair has at most one live lease (``lease_batch_id``); redundancy comes from re-queueing it after each
  label until verification settles it, so no pair is ever held by more leases than it still needs labels.
- The lease expiry that counts is ``batch.expires_at`` (one row to extend per chunk);
  ``pair.lease_expires_at``
  is the initial expiry, a lower bound the claim uses to find candidates cheaply through an index.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, SmallInteger, Text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlmodel import Field, SQLModel


def _ts(nullable: bool = False) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable))


class Contributor(SQLModel, table=True):
    __tablename__ = "contributor"

    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True, autoincrement=True))
    github_id: int | None = Field(default=None, sa_column=Column(BigInteger, unique=True, nullable=True))
    login: str = Field(sa_column=Column(Text, nullable=False))
    is_admin: bool = False
    banned: bool = False
    created_at: datetime | None = _ts()
    reputation: float = 0.8
    good_standing: bool = True
    trusted: bool = False
    hp_total: int = 0
    hp_correct: int = 0
    agree_total: int = 0
    agree_count: int = 0
    n_labels: int = 0
    n_relevant: int = 0
    divergence: float = 0.0
    quarantined_batches: int = 0
    reputation_updated_at: datetime | None = _ts(True)


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"

    token_hash: str = Field(sa_column=Column(Text, primary_key=True))
    contributor_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    is_admin: bool = False
    name: str = ""
    created_at: datetime | None = _ts()
    last_used_at: datetime | None = _ts(True)
    revoked_at: datetime | None = _ts(True)
    rl_window: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    rl_count: int = 0


class RateBucket(SQLModel, table=True):
    """Fixed-window counters for callers without a token (sign-in), keyed by e.g. ``ip:1.2.3.4``."""

    __tablename__ = "rate_bucket"

    key: str = Field(sa_column=Column(Text, primary_key=True))
    window: int = Field(sa_column=Column(BigInteger, nullable=False))
    count: int = 0


class Model(SQLModel, table=True):
    """The registry of backend/model/quantization combinations and whether they passed qualification."""

    __tablename__ = "model"

    name: str = Field(sa_column=Column(Text, primary_key=True))
    backend: str
    model_id: str
    quantization: str
    tier: int = 0
    hub_repo: str = ""
    hub_file: str = ""
    sha256: str = ""
    size_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    min_memory_gb: float = 0.0
    admitted: bool = False
    qualification: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB))
    updated_at: datetime | None = _ts()


class Pair(SQLModel, table=True):
    __tablename__ = "pair"

    pair_id: uuid.UUID = Field(sa_column=Column(UUID(as_uuid=True), primary_key=True))
    split: str
    cycle: str
    priority: float = 0.0
    is_honeypot: bool = False
    # queue mechanics: queued | leased | done | honeypot
    state: str = "queued"
    # verification: new | labeled | verified | disputed | escalated | unresolved
    status: str = "new"
    tier: int = Field(default=0, sa_column=Column(SmallInteger, nullable=False))
    n_labels: int = Field(default=0, sa_column=Column(SmallInteger, nullable=False))
    n_relevant: int = Field(default=0, sa_column=Column(SmallInteger, nullable=False))
    p_sum: float = 0.0
    lease_batch_id: uuid.UUID | None = Field(default=None, sa_column=Column(UUID(as_uuid=True), nullable=True))
    lease_expires_at: datetime | None = _ts(True)
    created_at: datetime | None = _ts()
    resolved_at: datetime | None = _ts(True)


class PairContent(SQLModel, table=True):
    __tablename__ = "pair_content"

    pair_id: uuid.UUID = Field(sa_column=Column(UUID(as_uuid=True), primary_key=True))
    query: str = Field(sa_column=Column(Text, nullable=False))
    document: str = Field(sa_column=Column(Text, nullable=False))


class Honeypot(SQLModel, table=True):
    __tablename__ = "honeypot"

    pair_id: uuid.UUID = Field(sa_column=Column(UUID(as_uuid=True), primary_key=True))
    relevant: bool
    grade: int | None = Field(default=None, sa_column=Column(SmallInteger, nullable=True))
    source: str = ""


class Batch(SQLModel, table=True):
    __tablename__ = "batch"

    batch_id: uuid.UUID = Field(sa_column=Column(UUID(as_uuid=True), primary_key=True))
    contributor_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    backend: str
    model_id: str
    quantization: str
    annotator_version: str
    tier: int = Field(default=0, sa_column=Column(SmallInteger, nullable=False))
    size: int = 0
    n_honeypots: int = 0
    n_labeled: int = 0
    created_at: datetime | None = _ts()
    expires_at: datetime | None = _ts()
    released_at: datetime | None = _ts(True)
    quarantined: bool = False
    hp_checked: bool = False
    hp_wrong: int = 0


class BatchHoneypot(SQLModel, table=True):
    __tablename__ = "batch_honeypot"

    batch_id: uuid.UUID = Field(sa_column=Column(UUID(as_uuid=True), primary_key=True))
    pair_id: uuid.UUID = Field(sa_column=Column(UUID(as_uuid=True), primary_key=True))
    contributor_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    released: bool = False


class Label(SQLModel, table=True):
    __tablename__ = "label"

    # Identity, unique by its sequence; the key is (pair_id, contributor_id): one label per pair and contributor.
    label_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=False))
    # The inserting transaction's 64-bit id: export pages on (xact, label_id) and only hands out rows
    # older than every in-flight transaction, so a cursor never skips a label that commits late.
    xact: int = Field(sa_column=Column(BigInteger, nullable=False))
    pair_id: uuid.UUID = Field(sa_column=Column(UUID(as_uuid=True), primary_key=True))
    contributor_id: int = Field(sa_column=Column(BigInteger, primary_key=True))
    batch_id: uuid.UUID = Field(sa_column=Column(UUID(as_uuid=True), nullable=False))
    relevant: bool
    p_relevant: float
    grade: int | None = Field(default=None, sa_column=Column(SmallInteger, nullable=True))
    truncated: bool = False
    seconds: float = 0.0
    backend: str
    model_id: str
    quantization: str
    annotator_version: str
    tier: int = Field(default=0, sa_column=Column(SmallInteger, nullable=False))
    is_honeypot: bool = False
    quarantined: bool = False
    created_at: datetime | None = _ts()
