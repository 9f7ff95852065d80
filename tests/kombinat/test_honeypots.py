"""Honeypots must be invisible: same ID format, same fields in the same order, same answers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kombinat_api.main import create_app
from tests.kombinat.conftest import Kombinat, make_settings
from tests.support.fake_github import FakeGitHub


def test_honeypots_cannot_be_told_apart_in_any_response(kmb: Kombinat) -> None:
    kmb.admit()
    ordinary = set(kmb.enqueue(300))
    gold = kmb.honeypots(200)
    # Make the ordinary IDs look like what the pipeline sends (uuid5) is not needed: both are UUID strings
    # of the same shape; what matters is that nothing in a response differs by kind.
    seen_hp: list[dict] = []
    seen_ord: list[dict] = []
    for i in range(6):
        who = kmb.contributor()
        raw = kmb.client.post(
            "/api/v1/batches/claim",
            json={"size": 40, "model": {"backend": "llama_cpp", "model_id": "test/Tiny-LLM",
                                        "quantization": "Q4_K_M", "annotator_version": "t"}},
            headers=who.headers,
        )  # fmt: skip
        batch = json.loads(raw.text)
        assert list(batch) == ["batch_id", "lease_expires_at", "pairs"]
        pairs = batch["pairs"]
        # Sorted by pair_id: position says nothing about kind.
        assert [p["pair_id"] for p in pairs] == sorted(p["pair_id"] for p in pairs)
        for p in pairs:
            assert list(p) == ["pair_id", "query", "document"]
            assert str(uuid.UUID(p["pair_id"])) == p["pair_id"]
            (seen_hp if p["pair_id"] in gold else seen_ord).append(p)
        hps = {p["pair_id"]: True for p in pairs if p["pair_id"] in gold}
        ords = {p["pair_id"]: True for p in pairs if p["pair_id"] in ordinary}
        assert hps and ords, i
        # The answers to a chunk of honeypots and a chunk of ordinary pairs have the same shape and values.
        r_h = kmb.submit(who, batch["batch_id"], hps)
        r_o = kmb.submit(who, batch["batch_id"], ords)
        assert r_h.status_code == r_o.status_code == 200
        assert list(r_h.json()) == list(r_o.json()) == ["accepted", "duplicates", "lease_expires_at"]
        assert r_h.json()["accepted"] == len(hps) and r_o.json()["accepted"] == len(ords)
        # Retries and refusals look alike too.
        assert kmb.submit(who, batch["batch_id"], hps).json()["duplicates"] == len(hps)
    # Untrusted contributors get honeypot-heavy batches (30 % of 40 = 12 each).
    assert len(seen_hp) == 6 * 12 and len(seen_ord) == 6 * 28
    # A honeypot handed to a contributor never comes back to it; the honeypot count never shows in stats.
    stats = kmb.client.get("/api/v1/stats").json()
    assert [s["split"] for s in stats["splits"]] == ["s1"]
    assert stats["totals"]["pairs"] == 300


def test_trusted_contributors_get_the_configured_share(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(1000)
    gold = kmb.honeypots(500)
    who = kmb.contributor(trusted=True)
    shown: set[str] = set()
    total_hp = total = 0
    for _ in range(5):
        batch = kmb.claim(who, 100)
        ids = [p["pair_id"] for p in batch["pairs"]]
        hp = [i for i in ids if i in gold]
        assert not shown & set(hp), "a honeypot was shown twice to one contributor"
        shown |= set(hp)
        total_hp += len(hp)
        total += len(ids)
        assert len(ids) == 100
    assert 0.05 <= total_hp / total <= 0.10


def test_release_counts_honeypots_like_pairs(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(20)
    gold = kmb.honeypots(20)
    who = kmb.contributor()
    batch = kmb.claim(who, 10)
    assert any(p["pair_id"] in gold for p in batch["pairs"])
    resp = kmb.client.post(f"/api/v1/batches/{batch['batch_id']}/release", json={"pair_ids": None}, headers=who.headers)
    assert resp.json() == {"released": 10}


def test_honeypot_ids_are_derived_like_pipeline_pair_ids() -> None:
    """kombinat cannot import the pipeline (server-only installs), so it mirrors its ID formula."""
    ids = pytest.importorskip("embedkomb_pipeline.ids")
    from kombinat_api.cli import honeypot_pair_id

    query, document, source = "What  causes\tscurvy?", "Vitamin C deficiency causes scurvy.\u0301", "honeypot:x"
    expected = ids.pair_id(ids.normalize_text(query), ids.text_hash(ids.normalize_text(document)), source)
    assert str(honeypot_pair_id(query, document, source)) == expected
    assert uuid.UUID(expected).version == 5


@pytest.fixture
def kmb_capped(database_url: str, github: FakeGitHub, engine: Engine) -> Iterator[Kombinat]:
    """Half of each batch honeypots, each shown to at most two contributors."""
    settings = make_settings(database_url, github, honeypot_fraction_untrusted=0.5, honeypot_max_exposure=2)
    with TestClient(create_app(settings)) as client:
        yield Kombinat(client, engine)


def _gold_in(batch: dict[str, Any], gold: dict[str, bool]) -> set[str]:
    return {p["pair_id"] for p in batch["pairs"] if p["pair_id"] in gold}


def test_a_honeypot_is_out_with_one_batch_at_a_time(kmb_capped: Kombinat) -> None:
    """Two accounts claiming at once never share a honeypot (nor, by their leases, an ordinary pair): comparing
    open batches identifies nothing. Answering or releasing it frees it for the next claim."""
    kmb = kmb_capped
    kmb.admit()
    kmb.enqueue(60)
    gold = kmb.honeypots(12)
    alice, bob, carol = kmb.contributor(), kmb.contributor(), kmb.contributor()
    a = kmb.claim(alice, 20)
    b = kmb.claim(bob, 20)
    assert len(_gold_in(a, gold)) == 10 and len(_gold_in(b, gold)) == 2  # the pool held 12
    assert not _gold_in(a, gold) & _gold_in(b, gold)
    assert not {p["pair_id"] for p in a["pairs"]} & {p["pair_id"] for p in b["pairs"]}
    assert not _gold_in(kmb.claim(carol, 20), gold)  # all 12 are out
    # alice answers half of hers and releases the rest: all ten are free again, bob gets those he never saw
    answered = sorted(_gold_in(a, gold))[:5]
    assert kmb.submit(alice, a["batch_id"], {pid: gold[pid] for pid in answered}).status_code == 200
    released = kmb.client.post(f"/api/v1/batches/{a['batch_id']}/release", json={"pair_ids": None},
                               headers=alice.headers)  # fmt: skip
    assert released.status_code == 200
    assert kmb.sql("SELECT count(*) FROM honeypot WHERE held_by = %(b)s", {"b": a["batch_id"]}) == [(0,)]
    assert _gold_in(kmb.claim(bob, 20), gold) == _gold_in(a, gold)


def test_a_honeypot_goes_to_at_most_max_exposure_contributors(kmb_capped: Kombinat) -> None:
    kmb = kmb_capped
    kmb.admit()
    kmb.enqueue(200)
    gold = kmb.honeypots(10)
    shown: dict[str, int] = {}
    for _ in range(5):
        who = kmb.contributor()
        batch = kmb.claim(who, 20)
        for pid in _gold_in(batch, gold):
            shown[pid] = shown.get(pid, 0) + 1
        assert kmb.submit(who, batch["batch_id"], {p["pair_id"]: True for p in batch["pairs"]}).status_code == 200
    assert shown and max(shown.values()) == 2 and sum(shown.values()) == 20  # 10 honeypots x 2, then none
    report = kmb.client.get("/api/v1/admin/honeypots", headers=kmb.admin)
    assert report.status_code == 200, report.text
    exposure = report.json()
    assert exposure["pool"] == 10 and exposure["max_exposure"] == 2
    assert exposure["retired"] == 10 and exposure["servings"] == 20 and exposure["servings_left"] == 0
    assert exposure["by_exposure"] == {"2": 10} and exposure["out_now"] == 0
    assert exposure["contributors"] == 5 and exposure["contributors_without_servable"] == 5
    assert kmb.client.get("/api/v1/admin/honeypots", headers=kmb.contributor().headers).status_code == 403


def test_a_hold_follows_its_batch_lease_and_a_changed_cap_applies_at_start(
    kmb_capped: Kombinat, database_url: str, github: FakeGitHub, engine: Engine
) -> None:
    kmb = kmb_capped
    kmb.admit()
    kmb.enqueue(60)
    gold = kmb.honeypots(10)
    alice, bob = kmb.contributor(), kmb.contributor()
    a = kmb.claim(alice, 20)
    held = _gold_in(a, gold)
    assert len(held) == 10
    # alice's batch outlives the lease it was claimed with: each chunk she sends extends it, and its holds
    kmb.sql("UPDATE honeypot SET held_until = now() - interval '1 second' WHERE held_by = %(b)s", {"b": a["batch_id"]})
    first = next(p["pair_id"] for p in a["pairs"] if p["pair_id"] not in gold)
    assert kmb.submit(alice, a["batch_id"], {first: True}).status_code == 200
    assert not _gold_in(kmb.claim(bob, 20), gold)
    # every honeypot has been served once; with the cap lowered to 1 they are all retired at the next start
    assert kmb.sql("SELECT count(*) FROM honeypot WHERE retired") == [(0,)]
    with TestClient(create_app(make_settings(database_url, github, honeypot_max_exposure=1))):
        assert kmb.sql("SELECT count(*) FROM honeypot WHERE retired") == [(10,)]
    with TestClient(create_app(make_settings(database_url, github, honeypot_max_exposure=2))):
        assert kmb.sql("SELECT count(*) FROM honeypot WHERE retired") == [(0,)]
