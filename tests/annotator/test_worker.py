"""Worker logic against an in-memory kombinat (network boundary faked): chunking, lease loss, Ctrl-C,
recovery from the journal, 4xx handling, and what leaves the machine (privacy)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import httpx
import pytest

from annotator.backends.base import ModelMeta
from annotator.client import ApiError, KombinatClient
from annotator.journal import Journal
from annotator.report import Reporter
from annotator.worker import LABEL_FIELDS, Worker, WorkerConfig
from tests.annotator.fakes import FakeKombinat, ScriptedBackend

MODEL = ModelMeta("llama_cpp", "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1", "0.1.0+p1")


class RecordingReporter(Reporter):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, object]] = []

    def submitted(self, batch_id: str, sent: int, accepted: int, duplicates: int) -> None:
        self.events.append(("submitted", (sent, accepted, duplicates)))

    def warn(self, text: str) -> None:
        self.events.append(("warn", text))

    def retry(self, attempt: int, delay: float, problem: str) -> None:
        self.events.append(("retry", problem))


def make_worker(
    server: FakeKombinat, tmp_path: Path, backend: ScriptedBackend | None = None, **config: object
) -> tuple[Worker, RecordingReporter]:
    reporter = RecordingReporter()
    client = KombinatClient(
        "http://kombinat.test",
        "tok",
        transport=server.transport(),
        sleep=lambda s: None,
        on_retry=reporter.retry,
    )
    journal = Journal(tmp_path / "journal.sqlite3")
    cfg = WorkerConfig(**{"batch_size": 120, "chunk_size": 50, "once": True, **config})  # type: ignore[arg-type]
    return Worker(client, backend or ScriptedBackend(), journal, MODEL, cfg, reporter), reporter


def test_once_labels_one_batch_in_chunks_of_50(tmp_path: Path) -> None:
    server = FakeKombinat()
    server.add_pairs(300)
    worker, reporter = make_worker(server, tmp_path)
    totals = worker.run()
    assert totals.labeled == 120 and totals.accepted == 120 and totals.batches == 1
    sent = [e[1][0] for e in reporter.events if e[0] == "submitted"]
    assert sent == [50, 50, 20]
    assert len(server.labels) == 120
    assert worker.journal.open_batches() == []  # finished batches leave the journal
    # relevant = P >= threshold (0.5)
    for label in server.labels.values():
        assert label["relevant"] == (label["p_relevant"] >= 0.5)
        assert label["grade"] is None and label["truncated"] is False


def test_pairs_sharing_a_query_are_labeled_back_to_back(tmp_path: Path) -> None:
    server = FakeKombinat()
    pairs = server.add_pairs(30, queries=3)
    backend = ScriptedBackend()
    worker, _ = make_worker(server, tmp_path, backend, batch_size=30)
    worker.run()
    query_of = {p["pair_id"]: p["query"] for p in pairs}
    order = [query_of[pid] for pid in backend.seen]
    changes = sum(1 for a, b in itertools.pairwise(order) if a != b)
    assert changes == 2  # three groups, two boundaries


def test_max_pairs_stops_and_releases_nothing_it_did_not_claim(tmp_path: Path) -> None:
    server = FakeKombinat()
    server.add_pairs(300)
    worker, _ = make_worker(server, tmp_path, once=False, max_pairs=70, batch_size=50)
    totals = worker.run()
    assert totals.labeled == 70 and len(server.labels) == 70
    # second claim asked only for the 20 still allowed
    claims = [json.loads(r.content)["size"] for r in server.requests if r.url.path.endswith("/claim")]
    assert claims == [50, 20]


def test_lost_lease_drops_the_rest_of_that_batch_and_goes_on(tmp_path: Path) -> None:
    server = FakeKombinat()
    server.add_pairs(100)
    server.expire_after_submits = 1  # the second chunk of the batch gets 409
    worker, reporter = make_worker(server, tmp_path, batch_size=100)
    totals = worker.run()
    assert totals.lost_batches == 1 and totals.accepted == 50
    assert any(kind == "warn" and "lost" in str(text) for kind, text in reporter.events)
    assert worker.journal.open_batches() == []  # nothing of the dead batch is kept or retried


def test_stop_request_finishes_the_pair_flushes_and_releases_the_rest(tmp_path: Path) -> None:
    server = FakeKombinat()
    server.add_pairs(100)
    worker, _ = make_worker(server, tmp_path, batch_size=100)

    original = worker.journal.record_label
    count = 0

    def record_and_stop(batch_id: str, label: dict[str, object]) -> None:
        nonlocal count
        original(batch_id, label)
        count += 1
        if count == 7:
            worker.request_stop()  # as the Ctrl-C handler does, in the middle of the 7th pair

    worker.journal.record_label = record_and_stop  # type: ignore[method-assign]
    totals = worker.run()
    assert totals.labeled == 7 and len(server.labels) == 7
    release = [r for r in server.requests if r.url.path.endswith("/release")]
    assert len(release) == 1
    released_ids = json.loads(release[0].content)["pair_ids"]
    assert len(released_ids) == 93 and not set(released_ids) & set(server.labels)
    assert worker.journal.open_batches() == []


def test_crash_then_restart_resubmits_pending_first_and_resumes(tmp_path: Path) -> None:
    server = FakeKombinat()
    server.add_pairs(80)
    crashing = ScriptedBackend(fail_after=65)
    worker, _ = make_worker(server, tmp_path, crashing, batch_size=80)
    with pytest.raises(KeyboardInterrupt):  # a hard stop in the middle of the batch
        worker.run()
    assert len(server.labels) == 50  # the first chunk went out; 15 labels are only in the journal
    [open_batch] = worker.journal.open_batches()
    assert open_batch.labeled == 15 and open_batch.leased == 15
    worker.journal.close()

    backend = ScriptedBackend()
    again, _ = make_worker(server, tmp_path, backend, batch_size=80)
    n_requests = len(server.requests)
    totals = again.run()
    first = server.requests[n_requests]
    assert first.url.path.endswith("/labels")  # pending labels go out before anything else
    assert len(json.loads(first.content)["labels"]) == 15
    assert len(backend.seen) == 15  # only the unlabeled pairs were scored again
    assert len(server.labels) == 80 and totals.duplicates == 0
    assert again.journal.open_batches() == []
    assert not any(r.url.path.endswith("/claim") for r in server.requests[n_requests:])  # --once: done


def test_a_client_error_stops_the_worker_and_keeps_labels(tmp_path: Path) -> None:
    server = FakeKombinat()
    server.add_pairs(60)
    original = server.handle

    def refuse_labels(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/labels"):
            server.requests.append(request)
            return httpx.Response(422, json={"detail": [{"loc": ["body", "labels"], "msg": "bad"}]})
        return original(request)

    server.handle = refuse_labels  # type: ignore[method-assign]
    worker, _ = make_worker(server, tmp_path, batch_size=60)
    with pytest.raises(ApiError) as info:
        worker.run()
    assert info.value.status == 422 and "body.labels: bad" in info.value.detail
    assert worker.journal.total_pending() == 50  # nothing finished is thrown away


def test_only_ids_labels_and_model_metadata_leave_the_machine(tmp_path: Path) -> None:
    server = FakeKombinat()
    pairs = server.add_pairs(60)
    server.fail_next = ["connect", 503]  # retries must not leak anything either
    worker, _ = make_worker(server, tmp_path, batch_size=60, chunk_size=25)
    worker.run()
    assert len(server.labels) == 60
    secrets = {p["query"] for p in pairs} | {p["document"] for p in pairs} | {"secret"}
    allowed_model = {"backend", "model_id", "quantization", "annotator_version", "prompt_version"}
    for request in server.requests:
        raw = request.url.raw_path + request.content + str(request.headers).encode()
        for secret in secrets:
            assert secret.encode() not in raw, f"{secret!r} was sent in {request.method} {request.url}"
        assert set(request.headers) <= {
            "host", "accept", "accept-encoding", "connection", "user-agent", "authorization",
            "content-length", "content-type",
        }  # fmt: skip
        if not request.content:
            continue
        body = json.loads(request.content)
        if request.url.path.endswith("/claim"):
            assert set(body) == {"size", "model"} and set(body["model"]) == allowed_model
        elif request.url.path.endswith("/labels"):
            assert set(body) == {"model", "labels"} and set(body["model"]) == allowed_model
            for label in body["labels"]:
                assert set(label) == set(LABEL_FIELDS)
        elif request.url.path.endswith("/release"):
            assert set(body) == {"pair_ids"}
        else:
            raise AssertionError(f"unexpected request {request.method} {request.url}")


def test_lease_expiry_parsing() -> None:
    from datetime import UTC, datetime

    from annotator.worker import lease_expired

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert lease_expired("2026-01-01T11:59:00Z", now) is True
    assert lease_expired("2026-01-01T12:01:00+00:00", now) is False
    assert lease_expired("2026-01-01T11:00:00", now) is True  # naive timestamps are UTC
    assert lease_expired(None, now) is False and lease_expired("garbage", now) is False


def test_restart_after_the_lease_expired_does_not_label_the_batch(tmp_path: Path) -> None:
    server = FakeKombinat()
    server.add_pairs(20)
    crashing = ScriptedBackend(fail_after=3)
    worker, _ = make_worker(server, tmp_path, crashing, batch_size=20, chunk_size=1)
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    [batch] = worker.journal.open_batches()
    worker.journal.set_lease(batch.batch_id, "2000-01-01T00:00:00Z")
    worker.journal.close()
    server.batches[batch.batch_id]["live"] = False  # kombinat requeued the pairs of the expired lease
    backend = ScriptedBackend()
    again, _ = make_worker(server, tmp_path, backend, batch_size=20)
    n_before = len(server.requests)
    totals = again.run()
    # 3 labels were acknowledged before the crash; the 17 unlabeled pairs of the dead batch were not
    # scored under it (that would earn a 409) but came back through a fresh claim.
    assert totals.lost_batches == 0 and totals.batches == 1
    assert len(backend.seen) == 17 and len(server.labels) == 20
    after_restart = [r.url.path for r in server.requests[n_before:]]
    assert after_restart[0].endswith("/claim") and not any(batch.batch_id in path for path in after_restart)
    assert again.journal.open_batches() == []
