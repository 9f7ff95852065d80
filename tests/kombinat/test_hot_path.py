"""The claim and submit endpoints check the caller inside their one statement and render JSON in PostgreSQL:
refused callers change nothing, the response text survives any content, and a batch that fails its
honeypots is quarantined at the chunk that decides it, before the batch is complete."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from kombinat_api.main import create_app
from tests.kombinat.conftest import Kombinat, make_settings
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import bearer, model_info


def _leased(kmb: Kombinat) -> int:
    return int(kmb.sql("SELECT count(*) FROM pair WHERE state = 'leased'")[0][0])


def test_refused_callers_claim_and_write_nothing(database_url: str, github: FakeGitHub, kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(8)
    alice = kmb.contributor()
    claim = {"size": 2, "model": model_info()}
    resp = kmb.client.post("/api/v1/batches/claim", json=claim, headers=bearer("kmb_not-a-real-token"))
    assert resp.status_code == 401 and "Invalid or revoked token" in resp.json()["detail"]
    too_big = kmb.client.post("/api/v1/batches/claim", json={**claim, "size": 1001}, headers=alice.headers)
    assert too_big.status_code == 422 and too_big.json()["detail"][0]["loc"] == ["body", "size"]
    assert kmb.sql("SELECT count(*) FROM batch")[0][0] == 0 and _leased(kmb) == 0

    batch = kmb.claim(alice, 2)
    verdicts = {p["pair_id"]: True for p in batch["pairs"]}
    stranger = kmb.client.post(
        f"/api/v1/batches/{batch['batch_id']}/labels",
        json={"model": model_info(), "labels": [{"pair_id": p, "relevant": True, "p_relevant": 0.9} for p in verdicts]},
        headers=bearer("kmb_not-a-real-token"),
    )
    assert stranger.status_code == 401
    kmb.sql("UPDATE contributor SET banned = true WHERE id = %(c)s", {"c": alice.id})
    banned = kmb.submit(alice, batch["batch_id"], verdicts)
    assert banned.status_code == 403 and "banned" in banned.json()["detail"]
    assert kmb.client.post("/api/v1/batches/claim", json=claim, headers=alice.headers).status_code == 403
    assert kmb.sql("SELECT count(*) FROM label")[0][0] == 0 and _leased(kmb) == 2

    # Over the rate limit: refused with Retry-After, and the claim takes nothing.
    bob = kmb.contributor()
    with TestClient(create_app(make_settings(database_url, github, rate_limit_per_minute=2))) as limited:
        # Stay inside one clock minute so the fixed window does not roll over mid-test.
        kmb.sql("SELECT pg_sleep(greatest(0, 1.5 - (60 - extract(second FROM now()))))")
        codes = [limited.post("/api/v1/batches/claim", json=claim, headers=bob.headers) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429], [r.text for r in codes]
    assert "at most 2 requests per minute" in codes[2].json()["detail"] and "retry-after" in codes[2].headers
    # two claims of 2 pairs; the refused third took none of the 2 still queued
    assert _leased(kmb) == 2 + 4
    assert kmb.sql("SELECT count(*) FROM pair WHERE state = 'queued'")[0][0] == 2


def test_claim_response_carries_any_text_exactly(kmb: Kombinat) -> None:
    kmb.admit()
    texts = {
        "quotes and escapes": 'say "hi" \\ back\\slash / slash',
        "control": "tab\there\nnew line\r\x01\x1f end",
        "unicode": "Zürich – 東京 – 🙂 – \u2028 line separator",
    }
    pairs = [
        {"pair_id": str(uuid.uuid4()), "query": q, "document": d, "split": "s1", "cycle": "c000", "priority": 1.0}
        for q, d in texts.items()
    ]
    assert kmb.client.post("/api/v1/admin/pairs", json={"pairs": pairs}, headers=kmb.admin).status_code == 200
    alice = kmb.contributor(trusted=True)
    before = datetime.now(UTC)
    resp = kmb.client.post("/api/v1/batches/claim", json={"size": 3, "model": model_info()}, headers=alice.headers)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    batch = resp.json()
    assert list(batch) == ["batch_id", "lease_expires_at", "pairs"]
    uuid.UUID(batch["batch_id"])
    expiry = datetime.fromisoformat(batch["lease_expires_at"])
    assert expiry.tzinfo is not None and before + timedelta(seconds=850) < expiry < before + timedelta(seconds=950)
    assert [p["pair_id"] for p in batch["pairs"]] == sorted(p["pair_id"] for p in pairs)
    assert {p["pair_id"]: (p["query"], p["document"]) for p in batch["pairs"]} == {
        p["pair_id"]: (p["query"], p["document"]) for p in pairs
    }
    assert all(set(p) == {"pair_id", "query", "document"} for p in batch["pairs"])
    done = kmb.submit(alice, batch["batch_id"], {p["pair_id"]: True for p in pairs})
    body = done.json()
    assert done.status_code == 200 and body["accepted"] == 3 and body["duplicates"] == 0
    assert datetime.fromisoformat(body["lease_expires_at"]) >= expiry


def test_failed_honeypots_quarantine_before_the_batch_is_complete(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(14)
    gold = kmb.honeypots(40)
    honest, cheat = kmb.contributor(), kmb.contributor()
    # Untrusted: 30 % of 10 is exactly 3 honeypots per batch.
    a = kmb.claim(honest, 10)
    answers = {p["pair_id"]: gold[p["pair_id"]] for p in a["pairs"] if p["pair_id"] in gold}
    first = next(iter(answers))
    answers[first] = not answers[first]
    # One miss out of three is what an honest contributor at 90 % gives one time in four: no quarantine.
    assert len(answers) == 3 and kmb.submit(honest, a["batch_id"], answers).status_code == 200
    assert kmb.sql("SELECT quarantined FROM batch WHERE batch_id = %(b)s", {"b": a["batch_id"]})[0][0] is False

    b = kmb.claim(cheat, 10)
    hps = [p["pair_id"] for p in b["pairs"] if p["pair_id"] in gold]
    ordinary = [p["pair_id"] for p in b["pairs"] if p["pair_id"] not in gold]
    # Three misses out of three (an honest contributor: one time in a thousand): quarantined at once, before the
    # batch is complete.
    assert kmb.submit(cheat, b["batch_id"], {h: not gold[h] for h in hps}).status_code == 200
    assert kmb.sql("SELECT quarantined FROM batch WHERE batch_id = %(b)s", {"b": b["batch_id"]})[0][0] is True
    # The rest of the batch is still accepted, but stored quarantined and never counted.
    resp = kmb.submit(cheat, b["batch_id"], {pid: True for pid in ordinary[:3]})
    assert resp.status_code == 200 and resp.json()["accepted"] == 3
    rows = kmb.sql("SELECT bool_and(quarantined), count(*) FROM label WHERE batch_id = %(b)s", {"b": b["batch_id"]})
    assert rows[0] == (True, 6)  # 3 honeypot answers and 3 ordinary labels
    for pid in ordinary[:3]:
        assert kmb.pair(pid).n_labels == 0
