"""The local SQLite journal: leased pairs and labels not yet acknowledged by kombinat.

Every state change is its own committed transaction (WAL, synchronous=FULL) *before* the next step runs,
so a SIGKILL at any instant leaves a journal that says exactly what is done:

    leased ──label──▶ labeled ──kombinat 200──▶ acked
       └──release──▶ released

On start the worker resubmits ``labeled`` rows first, then resumes ``leased`` ones. A label that kombinat
accepted but whose answer we never saw is resubmitted too; kombinat's unique (pair, contributor) makes
that a no-op, so nothing is lost and nothing is counted twice.

The query and document texts are kept only while their batch is open (to resume without re-claiming)
and deleted with the batch; they never leave the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotator.backends.base import Pair

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id         TEXT PRIMARY KEY,
    model            TEXT NOT NULL,          -- JSON: the model metadata the batch is labeled with
    lease_expires_at TEXT,
    claimed_at       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    batch_id TEXT NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
    pair_id  TEXT NOT NULL,
    position INTEGER NOT NULL,
    query    TEXT NOT NULL,
    document TEXT NOT NULL,
    state    TEXT NOT NULL DEFAULT 'leased' CHECK (state IN ('leased', 'labeled', 'acked', 'released')),
    label    TEXT,                           -- JSON, exactly as it will be sent
    PRIMARY KEY (batch_id, pair_id)
);
CREATE INDEX IF NOT EXISTS pairs_state ON pairs (batch_id, state, position);
"""


class JournalBusy(RuntimeError):
    """Another annotator process is using this journal."""


@dataclass(frozen=True)
class OpenBatch:
    batch_id: str
    model: dict[str, str]
    lease_expires_at: str | None
    leased: int
    labeled: int


def journal_path(data_dir: Path, server: str, contributor_id: str) -> Path:
    # One journal per (server, contributor): a batch is only valid for the identity that leased it.
    key = hashlib.sha256(f"{server.rstrip('/')}\n{contributor_id}".encode()).hexdigest()[:16]
    return data_dir / "journal" / f"{key}.sqlite3"


class Journal:
    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._lock(path.with_suffix(".lock"))
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions are explicit
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    @staticmethod
    def _lock(path: Path) -> Any:
        # Two annotators resuming the same batches would label every pair twice. The OS drops the lock
        # when the process dies (even by SIGKILL), so a crash never leaves a stale lock behind.
        fh = path.open("a+")
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows: no flock; the volunteer must not run two
            pass
        except OSError as exc:
            fh.close()
            raise JournalBusy(f"another annotator is already running with the journal {path.parent}") from exc
        return fh

    def close(self) -> None:
        self.db.close()
        self._lock_file.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- batches --------------------------------------------------------------------------------------
    def add_batch(
        self, batch_id: str, model: dict[str, str], lease_expires_at: str | None, pairs: Sequence[Pair]
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO batches (batch_id, model, lease_expires_at, claimed_at) VALUES (?, ?, ?, ?)",
                (batch_id, json.dumps(model, sort_keys=True), lease_expires_at, time.time()),
            )
            db.executemany(
                "INSERT OR IGNORE INTO pairs (batch_id, pair_id, position, query, document) VALUES (?, ?, ?, ?, ?)",
                [(batch_id, p.pair_id, i, p.query, p.document) for i, p in enumerate(pairs)],
            )

    def set_lease(self, batch_id: str, lease_expires_at: str | None) -> None:
        self.db.execute("UPDATE batches SET lease_expires_at = ? WHERE batch_id = ?", (lease_expires_at, batch_id))

    def open_batches(self) -> list[OpenBatch]:
        rows = self.db.execute(
            """SELECT b.batch_id, b.model, b.lease_expires_at,
                      SUM(p.state = 'leased') AS leased, SUM(p.state = 'labeled') AS labeled
               FROM batches b LEFT JOIN pairs p USING (batch_id)
               GROUP BY b.batch_id ORDER BY b.claimed_at"""
        ).fetchall()
        return [
            OpenBatch(
                r["batch_id"],
                json.loads(r["model"]),
                r["lease_expires_at"],
                r["leased"] or 0,
                r["labeled"] or 0,
            )
            for r in rows
        ]

    def close_batch(self, batch_id: str) -> None:
        """Forget a finished, released or lost batch (and its texts)."""
        with self._tx() as db:
            db.execute("DELETE FROM pairs WHERE batch_id = ?", (batch_id,))
            db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))

    # --- pairs and labels -----------------------------------------------------------------------------
    def unlabeled(self, batch_id: str) -> list[Pair]:
        rows = self.db.execute(
            "SELECT pair_id, query, document FROM pairs WHERE batch_id = ? AND state = 'leased' ORDER BY position",
            (batch_id,),
        ).fetchall()
        return [Pair(r["pair_id"], r["query"], r["document"]) for r in rows]

    def record_label(self, batch_id: str, label: dict[str, Any]) -> None:
        cur = self.db.execute(
            "UPDATE pairs SET state = 'labeled', label = ? WHERE batch_id = ? AND pair_id = ? AND state = 'leased'",
            (json.dumps(label), batch_id, label["pair_id"]),
        )
        if cur.rowcount != 1:
            raise RuntimeError(f"pair {label['pair_id']} of batch {batch_id} is not leased in the journal")

    def pending(self, batch_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT label FROM pairs WHERE batch_id = ? AND state = 'labeled' ORDER BY position"
        params: tuple[Any, ...] = (batch_id,)
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        return [json.loads(r["label"]) for r in self.db.execute(sql, params).fetchall()]

    def count(self, batch_id: str, state: str) -> int:
        return int(
            self.db.execute(
                "SELECT COUNT(*) FROM pairs WHERE batch_id = ? AND state = ?", (batch_id, state)
            ).fetchone()[0]
        )

    def mark(self, batch_id: str, pair_ids: Sequence[str], state: str) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE pairs SET state = ? WHERE batch_id = ? AND pair_id = ?",
                [(state, batch_id, pid) for pid in pair_ids],
            )

    def total_pending(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM pairs WHERE state = 'labeled'").fetchone()[0])


def peek(path: Path) -> dict[str, Any]:
    """Read-only summary for `doctor`: works while a worker holds the journal, never creates it."""
    if not path.exists():
        return {"path": str(path), "exists": False, "open_batches": 0, "pending_labels": 0}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        batches = db.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        pending = db.execute("SELECT COUNT(*) FROM pairs WHERE state = 'labeled'").fetchone()[0]
    except sqlite3.OperationalError:  # created a moment ago, schema not written yet: nothing in it
        batches = pending = 0
    finally:
        db.close()
    return {"path": str(path), "exists": True, "open_batches": int(batches), "pending_labels": int(pending)}
