"""The work queue: claims, leases, expiry, idempotent submission, ownership of pairs, release."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from tests.kombinat.conftest import Kombinat


def test_enqueue_is_idempotent_and_claim_serves_hardest_first(kmb: Kombinat) -> None:
    kmb.admit()
    ids = kmb.enqueue(30)
    again = kmb.client.post(
        "/api/v1/admin/pairs",
        json={"pairs": [{"pair_id": ids[0], "query": "q", "document": "d", "split": "s1", "cycle": "c000"}]},
        headers=kmb.admin,
    )
    assert again.json() == {"inserted": 0, "already_present": 1}
    alice = kmb.contributor(trusted=True)
    batch = kmb.claim(alice, 5)
    # Trusted contributors get ~7 %: size 5 gives no honeypot (none loaded anyway); priorities descend by index.
    assert sorted(p["pair_id"] for p in batch["pairs"]) == sorted(ids[:5])
    assert kmb.client.get("/api/v1/admin/queue", headers=kmb.admin).json()["leased"] == 5


def test_claims_are_disjoint_and_never_repeat_a_labeled_pair(kmb: Kombinat) -> None:
    kmb.admit()
    ids = kmb.enqueue(10)
    alice, bob = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    a = kmb.claim(alice, 6)
    b = kmb.claim(bob, 6)
    got_a = {p["pair_id"] for p in a["pairs"]}
    got_b = {p["pair_id"] for p in b["pairs"]}
    assert len(got_a) == 6 and len(got_b) == 4 and not got_a & got_b
    assert kmb.submit(alice, a["batch_id"], dict.fromkeys(got_a, True)).json()["accepted"] == 6
    # Alice's pairs need a second label, but never from Alice.
    again = kmb.claim(alice, 10)
    assert again["pairs"] == []
    for_bob = kmb.claim(bob, 10)
    assert {p["pair_id"] for p in for_bob["pairs"]} == got_a
    assert set(ids) == got_a | got_b


def test_expired_lease_is_reclaimed_and_old_holder_gets_409(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(4)
    alice, bob = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    a = kmb.claim(alice, 4)
    assert kmb.claim(bob, 4)["pairs"] == []
    kmb.expire(a["batch_id"])
    b = kmb.claim(bob, 4)
    assert {p["pair_id"] for p in b["pairs"]} == {p["pair_id"] for p in a["pairs"]}
    late = kmb.submit(alice, a["batch_id"], {a["pairs"][0]["pair_id"]: True})
    assert late.status_code == 409
    assert "expired" in late.json()["detail"]
    assert kmb.sql("SELECT count(*) FROM label")[0][0] == 0
    ok = kmb.submit(bob, b["batch_id"], {p["pair_id"]: True for p in b["pairs"]})
    assert ok.status_code == 200 and ok.json()["accepted"] == 4


def test_submitting_a_chunk_extends_the_lease(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(4)
    alice, bob = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    a = kmb.claim(alice, 4)
    # Only the pairs' initial expiry passes; the chunk below extends the batch, which is what counts.
    kmb.sql("UPDATE pair SET lease_expires_at = now() - interval '1 second' WHERE lease_batch_id = %(b)s",
            {"b": a["batch_id"]})  # fmt: skip
    kmb.sql(
        "UPDATE batch SET expires_at = now() + interval '1 second' WHERE batch_id = %(b)s",
        {"b": a["batch_id"]},
    )
    resp = kmb.submit(alice, a["batch_id"], {a["pairs"][0]["pair_id"]: True})
    assert resp.status_code == 200
    assert resp.json()["lease_expires_at"] > a["lease_expires_at"][:10]
    # Bob may take the labeled pair (it needs a second label) but none of the three still leased to Alice.
    assert [p["pair_id"] for p in kmb.claim(bob, 4)["pairs"]] == [a["pairs"][0]["pair_id"]]


def test_resubmitted_chunk_changes_nothing(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(6)
    alice = kmb.contributor(trusted=True)
    a = kmb.claim(alice, 6)
    chunk = {p["pair_id"]: True for p in a["pairs"][:3]}
    first = kmb.submit(alice, a["batch_id"], chunk)
    assert first.json()["accepted"] == 3 and first.json()["duplicates"] == 0

    def snapshot() -> tuple:
        return (
            kmb.sql("SELECT pair_id, relevant, p_relevant, quarantined FROM label ORDER BY label_id"),
            kmb.sql("SELECT pair_id, state, status, n_labels, n_relevant, lease_batch_id FROM pair ORDER BY pair_id"),
            kmb.sql("SELECT n_labeled FROM batch"),
        )

    before = snapshot()
    second = kmb.submit(alice, a["batch_id"], chunk)
    assert second.status_code == 200
    assert second.json()["accepted"] == 0 and second.json()["duplicates"] == 3
    assert snapshot() == before
    # A retry that flips a verdict is still a duplicate: the first answer stands.
    flipped = kmb.submit(alice, a["batch_id"], dict.fromkeys(chunk, False))
    assert flipped.json()["accepted"] == 0
    assert snapshot() == before


def test_labels_outside_the_callers_lease_are_refused_whole(kmb: Kombinat) -> None:
    kmb.admit()
    ids = kmb.enqueue(8)
    alice, bob = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    a = kmb.claim(alice, 4)
    b = kmb.claim(bob, 2)
    mine = a["pairs"][0]["pair_id"]
    leased = {p["pair_id"] for p in a["pairs"]} | {p["pair_id"] for p in b["pairs"]}
    never_claimed = next(i for i in ids if i not in leased)
    for foreign in (b["pairs"][0]["pair_id"], never_claimed, str(uuid.uuid4())):
        resp = kmb.submit(alice, a["batch_id"], {mine: True, foreign: True})
        assert resp.status_code == 403, resp.text
        assert "outside this batch's live lease" in resp.json()["detail"]
    assert kmb.sql("SELECT count(*) FROM label")[0][0] == 0
    # Somebody else's batch id is refused as such.
    other = kmb.submit(alice, b["batch_id"], {b["pairs"][0]["pair_id"]: True})
    assert other.status_code == 403 and "another contributor" in other.json()["detail"]
    unknown = kmb.submit(alice, str(uuid.uuid4()), {mine: True})
    assert unknown.status_code == 404


def test_release_returns_pairs_to_the_queue(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(6)
    alice, bob = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    a = kmb.claim(alice, 6)
    ids = [p["pair_id"] for p in a["pairs"]]
    assert kmb.submit(alice, a["batch_id"], {ids[0]: True}).status_code == 200
    part = kmb.client.post(
        f"/api/v1/batches/{a['batch_id']}/release", json={"pair_ids": ids[:2]}, headers=alice.headers
    )
    assert part.json() == {"released": 1}  # ids[0] is labeled already
    assert {p["pair_id"] for p in kmb.claim(bob, 6)["pairs"]} == {ids[0], ids[1]}
    rest = kmb.client.post(f"/api/v1/batches/{a['batch_id']}/release", json={"pair_ids": None}, headers=alice.headers)
    assert rest.json() == {"released": 4}
    late = kmb.submit(alice, a["batch_id"], {ids[2]: True})
    assert late.status_code == 409
    stolen = kmb.client.post(f"/api/v1/batches/{a['batch_id']}/release", json={"pair_ids": None}, headers=bob.headers)
    assert stolen.status_code == 403


def test_empty_queue_gives_an_empty_batch(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.honeypots(20)
    alice = kmb.contributor()
    batch = kmb.claim(alice, 10)
    # Never a batch of honeypots alone.
    assert batch["pairs"] == []
    uuid.UUID(batch["batch_id"])


def test_label_commits_wait_for_the_wal_even_after_the_token_check(database_url: str, kmb: Kombinat) -> None:
    """The token check turns synchronous commit off for its transaction; a label submission in the same
    transaction must turn it back on, because the annotator forgets labels once they are acknowledged."""
    from kombinat_api import auth, queue
    from kombinat_api.db import async_transaction, make_hot_pool

    kmb.admit()
    kmb.enqueue(2)
    alice = kmb.contributor(trusted=True)
    batch = kmb.claim(alice, 2)
    labels = json.dumps([{"pair_id": batch["pairs"][0]["pair_id"], "relevant": True, "p_relevant": 0.9}])
    model = {"backend": "llama_cpp", "model_id": "test/Tiny-LLM", "quantization": "Q4_K_M"}

    async def token_check_then_submit() -> list[Any]:
        pool = make_hot_pool(database_url, 1, 0)
        await pool.open(wait=True)
        try:
            async with async_transaction(pool) as cur:
                await auth.resolve_async(cur, alice.token, 1000, 1000, generic_plans=True)
                seen = [await (await cur.execute("SHOW synchronous_commit")).fetchone()]
                batch_id = uuid.UUID(batch["batch_id"])
                seen.append(await queue.submit(cur, alice.id, batch_id, labels, model, 900, 0.66, 3, 1))
                seen.append(await (await cur.execute("SHOW synchronous_commit")).fetchone())
                return seen
        finally:
            await pool.close()

    before, result, after = asyncio.run(token_check_then_submit())
    assert before == ("off",)
    assert result.outcome == "ok" and result.accepted == 1
    assert after == ("on",)
