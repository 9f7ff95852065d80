"""The main loop: claim → label → stream chunks of ~50 → (each submit extends the lease) → repeat.

Invariants, each backed by the journal (see journal.py):
- a label is committed locally before it is sent; it leaves the journal only when kombinat acknowledged it;
- on start, labels left pending by a crash are resubmitted first, then the interrupted batch resumes;
- a stop request (Ctrl-C, SIGTERM) finishes the current pair, flushes, releases what was not labeled;
- a lost lease (409) voids that batch: its pending labels and unlabeled pairs are dropped, the loop goes on;
- any other 4xx stops the worker (the caller prints kombinat's reason); network trouble is retried by the
  client, and if it outlasts the retry budget the labels simply stay in the journal for the next start.

Only ``pair_id``, the label fields and the model metadata are ever put in a request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from annotator.backends.base import Backend, ModelMeta, Pair, Score, order_pairs
from annotator.client import ApiError, KombinatClient, LeaseLost
from annotator.journal import Journal
from annotator.report import Reporter, Totals

# kombinat accepts ≤ 500 labels a request; ~50 keeps the lease fresh and a lost chunk cheap.
MAX_LABELS_PER_REQUEST = 500
LABEL_FIELDS = ("pair_id", "relevant", "p_relevant", "grade", "truncated", "seconds")


def lease_expired(expires_at: str | None, now: datetime | None = None) -> bool:
    """True when kombinat's ``lease_expires_at`` (ISO 8601) is in the past; unknown or unparsable: False."""
    if not expires_at:
        return False
    try:
        expiry = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return False
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=UTC)
    return expiry < (now or datetime.now(UTC))


def make_label(score: Score, threshold: float) -> dict[str, Any]:
    """The label exactly as sent: the pair's ID and our judgment of it, nothing about its texts."""
    return {
        "pair_id": score.pair_id,
        "relevant": score.p_relevant >= threshold,
        "p_relevant": round(float(score.p_relevant), 6),
        "grade": None,
        "truncated": bool(score.truncated),
        "seconds": round(float(score.seconds), 4),
    }


@dataclass
class WorkerConfig:
    batch_size: int = 200
    chunk_size: int = 50
    flush_seconds: float = 60.0  # submit at least this often so that a slow model keeps its lease alive
    max_pairs: int | None = None
    once: bool = False
    threshold: float = 0.5
    idle_min: float = 5.0
    idle_max: float = 120.0


class Worker:
    def __init__(
        self,
        client: KombinatClient,
        backend: Backend,
        journal: Journal,
        model: ModelMeta,
        config: WorkerConfig,
        reporter: Reporter,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.backend = backend
        self.journal = journal
        self.model = model
        self.config = config
        self.reporter = reporter
        self.totals = Totals()
        self.stop_requested = False
        self._sleep = sleep

    def request_stop(self) -> None:
        """Called from a signal handler: finish the current pair, flush, release the rest."""
        self.stop_requested = True

    # --- top level ------------------------------------------------------------------------------------
    def run(self) -> Totals:
        resumed_any = self.recover()
        # --once after a crash means "finish what was interrupted", not "and then claim more".
        once_done = self.config.once and resumed_any
        reason = "finished the interrupted batch (--once)" if once_done else self._claim_loop()
        self.reporter.finish(self.totals, reason)
        return self.totals

    def _quota_left(self) -> int | None:
        if self.config.max_pairs is None:
            return None
        return max(0, self.config.max_pairs - self.totals.labeled)

    def _claim_loop(self) -> str:
        idle = self.config.idle_min
        while True:
            if self.stop_requested:
                return "stopped on request"
            left = self._quota_left()
            if left == 0:
                return f"--max-pairs {self.config.max_pairs} reached"
            size = self.config.batch_size if left is None else min(self.config.batch_size, left)
            batch = self.client.claim(size, self.model.as_dict())
            pairs = [Pair(str(p["pair_id"]), str(p["query"]), str(p["document"])) for p in batch.get("pairs", [])]
            if not pairs:
                if self.config.once:
                    return "no work available (--once)"
                self.reporter.idle(idle)
                self._interruptible_sleep(idle)
                idle = min(self.config.idle_max, idle * 2)
                continue
            idle = self.config.idle_min
            batch_id = str(batch["batch_id"])
            # Journal first: from here on a crash resumes this batch instead of forgetting its lease.
            self.journal.add_batch(batch_id, self.model.as_dict(), batch.get("lease_expires_at"), pairs)
            self.totals.batches += 1
            self.reporter.batch(batch_id, len(pairs))
            self._label_batch(batch_id, self.model.as_dict(), pairs)
            if self.config.once:
                return "labeled one batch (--once)"

    def _interruptible_sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < end:
            self._sleep(min(0.5, end - time.monotonic()))

    # --- recovery -------------------------------------------------------------------------------------
    def recover(self) -> bool:
        """Resubmit what a previous run left pending, then resume its unlabeled pairs. True if it resumed."""
        resumed = False
        for batch in self.journal.open_batches():
            if batch.labeled:
                self.reporter.info(f"resubmitting {batch.labeled} labels saved by an earlier run")
            try:
                self._flush(batch.batch_id, batch.model)
            except ApiError as exc:
                # 409 (lease expired), 403 (its pairs went to someone else while we were down) or 404
                # (kombinat forgot the batch): it is gone for good; keeping it would block every later start.
                if exc.status not in (403, 404, 409):
                    raise
                self._drop(batch.batch_id, exc)
                continue
            remaining = self.journal.unlabeled(batch.batch_id)
            if not remaining:
                self.journal.close_batch(batch.batch_id)
                continue
            if lease_expired(batch.lease_expires_at):
                # Labeling these would only earn a 409 at the first submit: kombinat has requeued them.
                self.reporter.info(f"lease of batch {batch.batch_id[:8]} expired while we were away: skipping it")
                self.journal.close_batch(batch.batch_id)
                continue
            if batch.model != self.model.as_dict():
                # Labels must come from the model the batch was claimed with; give the rest back.
                self.reporter.info(f"batch {batch.batch_id[:8]} was claimed with another model: releasing it")
                self._release(batch.batch_id, [p.pair_id for p in remaining])
                continue
            if self.stop_requested:
                self._release(batch.batch_id, [p.pair_id for p in remaining])
                continue
            resumed = True
            self.totals.batches += 1
            self.reporter.batch(batch.batch_id, len(remaining), resumed=True)
            self._label_batch(batch.batch_id, batch.model, remaining)
        return resumed

    # --- one batch ------------------------------------------------------------------------------------
    def _feed(self, pairs: list[Pair]) -> Iterator[Pair]:
        # The backend pulls pairs lazily: stopping here means "finish the pair in flight, start no other".
        for pair in pairs:
            if self.stop_requested or self._quota_left() == 0:
                return
            yield pair

    def _label_batch(self, batch_id: str, model: dict[str, str], pairs: list[Pair]) -> None:
        last_flush = time.monotonic()
        try:
            for score in self.backend.score_pairs(self._feed(order_pairs(pairs))):
                self.journal.record_label(batch_id, make_label(score, self.config.threshold))
                self.totals.labeled += 1
                self.totals.truncated += int(score.truncated)
                self.reporter.pair(self.totals, score.p_relevant)
                due = time.monotonic() - last_flush >= self.config.flush_seconds
                if due or self.journal.count(batch_id, "labeled") >= self.config.chunk_size:
                    self._flush(batch_id, model)
                    last_flush = time.monotonic()
            self._flush(batch_id, model)
        except LeaseLost as exc:
            self._drop(batch_id, exc)
            return
        rest = self.journal.unlabeled(batch_id)
        if rest:  # stopped early (Ctrl-C or --max-pairs): hand the rest back so others need not wait
            self._release(batch_id, [p.pair_id for p in rest])
        else:
            self.journal.close_batch(batch_id)

    def _flush(self, batch_id: str, model: dict[str, str]) -> None:
        while True:
            labels = self.journal.pending(batch_id, limit=min(self.config.chunk_size, MAX_LABELS_PER_REQUEST))
            if not labels:
                return
            body = [{k: label[k] for k in LABEL_FIELDS} for label in labels]
            answer = self.client.submit(batch_id, model, body)
            self.journal.mark(batch_id, [label["pair_id"] for label in labels], "acked")
            self.journal.set_lease(batch_id, answer.get("lease_expires_at"))
            accepted, duplicates = int(answer.get("accepted", 0)), int(answer.get("duplicates", 0))
            self.totals.accepted += accepted
            self.totals.duplicates += duplicates
            self.reporter.submitted(batch_id, len(labels), accepted, duplicates)

    def _release(self, batch_id: str, pair_ids: list[str]) -> None:
        try:
            answer = self.client.release(batch_id, pair_ids)
            self.totals.released += int(answer.get("released", len(pair_ids)))
        except LeaseLost:
            pass  # already expired: the pairs are back in the queue anyway
        self.journal.close_batch(batch_id)

    def _drop(self, batch_id: str, exc: ApiError) -> None:
        lost = self.journal.count(batch_id, "labeled") + self.journal.count(batch_id, "leased")
        self.reporter.warn(f"lease of batch {batch_id[:8]} lost ({exc.detail}); dropping its {lost} remaining pairs")
        self.totals.lost_batches += 1
        self.journal.close_batch(batch_id)
