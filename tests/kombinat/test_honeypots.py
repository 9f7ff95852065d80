"""Honeypots must be invisible: same ID format, same fields in the same order, same answers."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.kombinat.conftest import Kombinat


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
