"""Redundancy and trust: verification, dispute, escalation, quarantine, reputation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kombinat_api import trust
from kombinat_api.main import create_app
from kombinat_api.settings import Settings
from tests.kombinat.conftest import Contributor, Kombinat, make_settings
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import TEST_MODEL

STRONG_MODEL = {
    **TEST_MODEL,
    "name": "strong",
    "model_id": "test/Strong-LLM",
    "quantization": "Q8_0",
    "tier": 1,
}


def label_one(kmb: Kombinat, who: Contributor, pair_id: str, verdict: bool, model: dict | None = None) -> None:
    batch = kmb.claim(who, 1, model)
    assert [p["pair_id"] for p in batch["pairs"]] == [pair_id]
    resp = kmb.submit(who, batch["batch_id"], {pair_id: verdict}, model)
    assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text


def test_two_agreeing_labels_verify(kmb: Kombinat) -> None:
    kmb.admit()
    [pid] = kmb.enqueue(1, split="sciency", cycle="c001")
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    label_one(kmb, a, pid, True)
    assert (kmb.pair(pid).status, kmb.pair(pid).state) == ("labeled", "queued")
    label_one(kmb, b, pid, True)
    row = kmb.pair(pid)
    assert (row.status, row.state, row.n_labels, row.n_relevant) == ("verified", "done", 2, 2)
    out = kmb.client.get("/api/v1/admin/verified?split=sciency&cycle=c001", headers=kmb.admin).json()
    [pair] = out["pairs"]
    assert pair["pair_id"] == pid and pair["label"] is True and pair["agreement"] == 1.0
    assert pair["n_labels"] == 2 and pair["models"] == ["llama_cpp/test/Tiny-LLM/Q4_K_M"]
    assert kmb.client.get("/api/v1/admin/verified?split=other", headers=kmb.admin).json()["pairs"] == []
    # Verified pairs leave the queue.
    assert kmb.claim(kmb.contributor(trusted=True), 5)["pairs"] == []


def test_disagreement_asks_for_a_third_label(kmb: Kombinat) -> None:
    kmb.admit()
    [pid] = kmb.enqueue(1)
    a, b, c = (kmb.contributor(trusted=True) for _ in range(3))
    label_one(kmb, a, pid, True)
    label_one(kmb, b, pid, False)
    assert (kmb.pair(pid).status, kmb.pair(pid).state) == ("disputed", "queued")
    label_one(kmb, c, pid, False)
    row = kmb.pair(pid)
    assert (row.status, row.n_labels, row.n_relevant) == ("verified", 3, 1)
    [pair] = kmb.client.get("/api/v1/admin/verified", headers=kmb.admin).json()["pairs"]
    assert pair["label"] is False and pair["agreement"] == pytest.approx(2 / 3)


@pytest.fixture
def strict(database_url: str, github: FakeGitHub, engine: Engine) -> Iterator[Kombinat]:
    """A second app on the same database whose operators demand 3/4 agreement, so a 2:1 split stays disputed."""
    settings = make_settings(database_url, github, verify_min_agreement=0.75, max_tier=1)
    with TestClient(create_app(settings)) as client:
        yield Kombinat(client, engine)


def test_still_disputed_escalates_to_a_stronger_tier(strict: Kombinat) -> None:
    kmb = strict
    kmb.admit()
    kmb.admit(STRONG_MODEL)
    [pid] = kmb.enqueue(1)
    a, b, c = (kmb.contributor(trusted=True) for _ in range(3))
    label_one(kmb, a, pid, True)
    label_one(kmb, b, pid, False)
    assert kmb.pair(pid).status == "disputed"
    label_one(kmb, c, pid, True)
    row = kmb.pair(pid)
    assert (row.status, row.state, row.tier, row.n_labels) == ("escalated", "queued", 1, 0)
    assert kmb.client.get("/api/v1/admin/queue", headers=kmb.admin).json()["escalated"] == 1
    # Only a contributor running a tier-1 model receives it.
    weak = kmb.contributor(trusted=True)
    assert kmb.claim(weak, 5)["pairs"] == []
    s1, s2 = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    label_one(kmb, s1, pid, False, STRONG_MODEL)
    assert kmb.pair(pid).status == "escalated"
    label_one(kmb, s2, pid, False, STRONG_MODEL)
    row = kmb.pair(pid)
    assert (row.status, row.state, row.tier, row.n_labels, row.n_relevant) == ("verified", "done", 1, 2, 0)
    [pair] = kmb.client.get("/api/v1/admin/verified", headers=kmb.admin).json()["pairs"]
    assert pair["models"] == ["llama_cpp/test/Strong-LLM/Q8_0"]  # only labels of the deciding tier


def test_disputed_at_the_top_tier_is_unresolved(strict: Kombinat) -> None:
    kmb = strict
    kmb.admit(STRONG_MODEL)
    [pid] = kmb.enqueue(1)
    kmb.sql("UPDATE pair SET tier = 1 WHERE pair_id = %(p)s", {"p": pid})
    for verdict in (True, False, True):
        label_one(kmb, kmb.contributor(trusted=True), pid, verdict, STRONG_MODEL)
    row = kmb.pair(pid)
    assert (row.status, row.state) == ("unresolved", "done")


def answer(kmb: Kombinat, who: Contributor, batch: dict, gold: dict[str, bool], honest: bool) -> None:
    verdicts = {}
    for p in batch["pairs"]:
        pid = p["pair_id"]
        verdicts[pid] = (gold[pid] if honest else not gold[pid]) if pid in gold else True
    resp = kmb.submit(who, batch["batch_id"], verdicts)
    assert resp.status_code == 200 and resp.json()["accepted"] == len(verdicts), resp.text


def test_failed_honeypots_quarantine_the_batch_and_recount_its_pairs(kmb: Kombinat) -> None:
    kmb.admit()
    ids = kmb.enqueue(7)
    gold = kmb.honeypots(40)
    honest, cheat = kmb.contributor(), kmb.contributor()
    # Untrusted contributors get honeypot-heavy batches: 30 % of 10 is exactly 3 honeypots.
    a = kmb.claim(honest, 10)
    assert sum(p["pair_id"] in gold for p in a["pairs"]) == 3
    answer(kmb, honest, a, gold, honest=True)
    b = kmb.claim(cheat, 10)
    assert {p["pair_id"] for p in b["pairs"]} - set(gold) == set(ids)
    rep_before = kmb.sql("SELECT reputation FROM contributor WHERE id = %(c)s", {"c": cheat.id})[0][0]
    answer(kmb, cheat, b, gold, honest=False)
    # Both said 'relevant' to the 7 ordinary pairs, but the cheater's batch failed its honeypots: its labels
    # are quarantined and the pairs fall back to one counted label.
    assert kmb.sql("SELECT quarantined FROM batch WHERE batch_id = %(b)s", {"b": b["batch_id"]})[0][0] is True
    assert kmb.sql("SELECT quarantined FROM batch WHERE batch_id = %(b)s", {"b": a["batch_id"]})[0][0] is False
    assert kmb.sql("SELECT bool_and(quarantined) FROM label WHERE batch_id = %(b)s", {"b": b["batch_id"]})[0][0]
    for pid in ids:
        row = kmb.pair(pid)
        assert (row.status, row.state, row.n_labels) == ("labeled", "queued", 1)
    rep_after = kmb.sql("SELECT reputation, quarantined_batches FROM contributor WHERE id = %(c)s", {"c": cheat.id})[0]
    assert rep_after[0] < rep_before and rep_after[1] == 1
    honest_rep = kmb.sql("SELECT reputation FROM contributor WHERE id = %(c)s", {"c": honest.id})[0][0]
    assert honest_rep > rep_after[0]
    exported = kmb.client.get("/api/v1/admin/labels", headers=kmb.admin).json()["labels"]
    assert {lab["quarantined"] for lab in exported if lab["contributor_id"] == cheat.id} == {True}
    assert {lab["quarantined"] for lab in exported if lab["contributor_id"] == honest.id} == {False}
    quality = kmb.client.get("/api/v1/admin/model-quality", headers=kmb.admin).json()["models"]
    assert quality[0]["honeypots_answered"] == 6 and quality[0]["honeypot_accuracy"] == 0.5


def test_quarantine_undoes_a_verification(kmb: Kombinat) -> None:
    kmb.admit()
    [pid] = kmb.enqueue(1)
    gold = kmb.honeypots(20)
    honest, cheat = kmb.contributor(trusted=True), kmb.contributor()
    label_one(kmb, honest, pid, True)
    # The cheater labels the ordinary pair first (it counts and verifies the pair), then fails its honeypots.
    b = kmb.claim(cheat, 10)  # 3 honeypots, all answered wrong: evidence enough to quarantine
    ordinary = next(p["pair_id"] for p in b["pairs"] if p["pair_id"] not in gold)
    hps = {p["pair_id"]: not gold[p["pair_id"]] for p in b["pairs"] if p["pair_id"] in gold}
    assert ordinary == pid and hps
    assert kmb.submit(cheat, b["batch_id"], {pid: True}).status_code == 200
    assert kmb.pair(pid).status == "verified"
    assert kmb.submit(cheat, b["batch_id"], hps).status_code == 200
    row = kmb.pair(pid)
    assert (row.status, row.state, row.n_labels) == ("labeled", "queued", 1)


def test_losing_good_standing_recounts_every_pair(kmb: Kombinat, client: TestClient) -> None:
    kmb.admit()
    [pid] = kmb.enqueue(1)
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    label_one(kmb, a, pid, True)
    label_one(kmb, b, pid, True)
    assert kmb.pair(pid).status == "verified"
    kmb.sql("UPDATE contributor SET banned = true WHERE id = %(c)s", {"c": b.id})
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    with kmb.engine.begin() as conn:
        rep = trust.refresh(conn, b.id, settings)
    assert rep is not None and not rep.good_standing
    row = kmb.pair(pid)
    assert (row.status, row.state, row.n_labels) == ("labeled", "queued", 1)
    # A banned contributor's token no longer works.
    assert kmb.claim.__self__.client.post(  # type: ignore[attr-defined]
        "/api/v1/batches/claim", json={"size": 1, "model": {"backend": "llama_cpp", "model_id": "x",
                                                            "quantization": "y"}}, headers=b.headers
    ).status_code == 403  # fmt: skip


def test_reputation_formula_orders_contributors_sensibly() -> None:
    settings = Settings()
    new = trust.score(0, 0, 0, 0, 0, 0, None, 0, False, settings)
    good = trust.score(40, 40, 100, 95, 500, 250, 0.5, 0, False, settings)
    careless = trust.score(40, 24, 100, 60, 500, 250, 0.5, 2, False, settings)
    yes_sayer = trust.score(40, 20, 100, 50, 500, 500, 0.5, 4, False, settings)
    assert good.reputation > new.reputation > careless.reputation > yes_sayer.reputation
    assert good.trusted and not new.trusted and not careless.trusted
    assert new.good_standing and not yes_sayer.good_standing
    assert yes_sayer.divergence > good.divergence


def test_agreement_test_takes_standing_from_a_contributor_whose_honeypots_look_fine() -> None:
    """A perfect honeypot record does not save labels that the others contradict far beyond honest disagreement
    (the sleeper that inverts once the honeypots it may see are spent); honest disagreement does not cost it."""
    settings = Settings()  # agreement_honest 0.75 at alpha 0.001, from 30 comparisons on
    sleeper = trust.score(40, 40, 200, 60, 500, 250, 0.5, 0, False, settings)
    honest_but_different = trust.score(40, 38, 200, 140, 500, 250, 0.5, 0, False, settings)  # 70 % agreement
    too_little_evidence = trust.score(40, 40, 20, 2, 500, 250, 0.5, 0, False, settings)
    assert sleeper.reputation >= settings.min_reputation  # the weighted reputation alone would keep it
    assert sleeper.agreement_implausible and not sleeper.good_standing and not sleeper.trusted
    assert not honest_but_different.agreement_implausible and honest_but_different.good_standing
    assert not too_little_evidence.agreement_implausible
