"""Independence in verification: a label's model configuration is (model_id, quantization, prompt_version).
With KOMBINAT_QUORUM_DISTINCT_MODELS the labels of one configuration on a pair are one vote, so copies of one
model never verify a pair alone; either way a verified pair records how many configurations agreed, and the
recount after a quarantine lands where the incremental path did."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kombinat_api import queue
from kombinat_api.db import alembic_config, make_engine, migrate
from kombinat_api.main import create_app
from kombinat_api.settings import Settings
from tests.kombinat.conftest import Contributor, Kombinat, make_settings
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import TEST_MODEL
from tests.support.postgres import fresh_database

OTHER = {**TEST_MODEL, "name": "other", "model_id": "test/Other-LLM"}
# the same model and quantization on another backend: the same configuration
SAME_ON_VLLM = {**TEST_MODEL, "name": "tiny-vllm", "backend": "vllm"}
STRONG = {**TEST_MODEL, "name": "strong", "model_id": "test/Strong-LLM", "quantization": "Q8_0", "tier": 1}

PAIR_STATE = (
    "SELECT pair_id, status, state, tier, n_labels, n_relevant, n_votes, n_votes_relevant, n_model_configs, p_sum "
    "FROM pair WHERE NOT is_honeypot ORDER BY pair_id"
)


def label_one(kmb: Kombinat, who: Contributor, pair_id: str, verdict: bool, model: Any = None) -> None:
    batch = kmb.claim(who, 1, model)
    assert [p["pair_id"] for p in batch["pairs"]] == [pair_id]
    resp = kmb.submit(who, batch["batch_id"], {pair_id: verdict}, model)
    assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text


def verified(kmb: Kombinat, pair_id: str, status: str = "verified") -> dict[str, Any]:
    pairs = kmb.client.get(f"/api/v1/admin/verified?status={status}", headers=kmb.admin).json()["pairs"]
    return next(p for p in pairs if p["pair_id"] == pair_id)


@contextmanager
def app_with(database_url: str, github: FakeGitHub, engine: Engine, **settings: Any) -> Iterator[Kombinat]:
    with TestClient(create_app(make_settings(database_url, github, **settings))) as client:
        yield Kombinat(client, engine)


@pytest.fixture
def distinct(database_url: str, github: FakeGitHub, engine: Engine) -> Iterator[Kombinat]:
    """An app whose quorum counts model configurations."""
    with app_with(database_url, github, engine, quorum_distinct_models=True) as kmb:
        yield kmb


@pytest.fixture
def distinct_five(database_url: str, github: FakeGitHub, engine: Engine) -> Iterator[Kombinat]:
    """Distinct-model quorum with room for five labels per tier."""
    with app_with(database_url, github, engine, quorum_distinct_models=True, max_labels_per_tier=5) as kmb:
        yield kmb


def test_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().quorum_distinct_models is False
    monkeypatch.setenv("KOMBINAT_QUORUM_DISTINCT_MODELS", "true")
    assert Settings().quorum_distinct_models is True


def test_by_default_two_labels_of_one_configuration_verify(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.admit(SAME_ON_VLLM)
    [pid] = kmb.enqueue(1)
    label_one(kmb, kmb.contributor(trusted=True), pid, True)
    label_one(kmb, kmb.contributor(trusted=True), pid, True, SAME_ON_VLLM)
    row = kmb.pair(pid)
    assert (row.status, row.n_labels, row.n_votes, row.n_votes_relevant, row.n_model_configs) == (
        "verified", 2, 2, 2, 1,
    )  # fmt: skip
    pair = verified(kmb, pid)
    assert pair["label"] is True and pair["n_labels"] == pair["n_votes"] == 2 and pair["n_model_configs"] == 1
    assert pair["models"] == ["llama_cpp/test/Tiny-LLM/Q4_K_M", "vllm/test/Tiny-LLM/Q4_K_M"]


def test_by_default_n_model_configs_counts_the_configurations_that_agree(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.admit(OTHER)
    p_two, p_one = kmb.enqueue(2)
    a, b, c = (kmb.contributor(trusted=True) for _ in range(3))
    label_one(kmb, a, p_two, True)
    label_one(kmb, b, p_two, True, OTHER)
    assert (kmb.pair(p_two).status, kmb.pair(p_two).n_model_configs) == ("verified", 2)
    # 2-1 with the dissent from the other configuration: one configuration agrees with the verdict
    label_one(kmb, a, p_one, False)
    label_one(kmb, b, p_one, True, OTHER)
    assert (kmb.pair(p_one).status, kmb.pair(p_one).n_model_configs) == ("disputed", None)
    label_one(kmb, c, p_one, False)
    row = kmb.pair(p_one)
    assert (row.status, row.n_labels, row.n_relevant, row.n_model_configs) == ("verified", 3, 1, 1)
    assert verified(kmb, p_one)["label"] is False and verified(kmb, p_one)["n_model_configs"] == 1


def test_distinct_models_one_configuration_never_verifies_alone(distinct: Kombinat) -> None:
    kmb = distinct
    kmb.admit()
    kmb.admit(SAME_ON_VLLM)
    kmb.admit(STRONG)
    [pid] = kmb.enqueue(1)
    a, b, c = (kmb.contributor(trusted=True) for _ in range(3))
    label_one(kmb, a, pid, True)
    # another backend of the same model and quantization is the same configuration: still one vote
    label_one(kmb, b, pid, True, SAME_ON_VLLM)
    row = kmb.pair(pid)
    assert (row.status, row.state, row.n_labels, row.n_votes, row.n_votes_relevant) == ("labeled", "queued", 2, 1, 1)
    assert row.n_model_configs is None
    # its labels run out at the tier: the pair escalates to a stronger (other) model instead of circling
    label_one(kmb, c, pid, True)
    row = kmb.pair(pid)
    assert (row.status, row.state, row.tier, row.n_labels, row.n_votes) == ("escalated", "queued", 1, 0, 0)


def test_distinct_models_two_configurations_verify(distinct: Kombinat) -> None:
    kmb = distinct
    kmb.admit()
    kmb.admit(OTHER)
    [pid] = kmb.enqueue(1)
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    label_one(kmb, a, pid, False)
    label_one(kmb, b, pid, False, OTHER)
    row = kmb.pair(pid)
    assert (row.status, row.state, row.n_labels, row.n_votes, row.n_votes_relevant, row.n_model_configs) == (
        "verified", "done", 2, 2, 0, 2,
    )  # fmt: skip
    pair = verified(kmb, pid)
    assert pair["label"] is False and pair["agreement"] == 1.0 and pair["n_model_configs"] == 2


def test_distinct_models_a_new_prompt_version_is_a_new_configuration(distinct: Kombinat) -> None:
    kmb = distinct
    kmb.admit()
    [pid] = kmb.enqueue(1)
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    label_one(kmb, a, pid, True)
    reworded = {**TEST_MODEL, "prompt_version": "g1"}
    kmb.admit(reworded)
    label_one(kmb, b, pid, True, reworded)
    assert (kmb.pair(pid).status, kmb.pair(pid).n_model_configs) == ("verified", 2)


def test_distinct_models_the_configurations_vote_not_the_labels(distinct_five: Kombinat) -> None:
    kmb = distinct_five
    third = {**TEST_MODEL, "name": "third", "model_id": "test/Third-LLM"}
    for entry in (TEST_MODEL, OTHER, third):
        kmb.admit(entry)
    [pid] = kmb.enqueue(1)
    people = [kmb.contributor(trusted=True) for _ in range(4)]
    label_one(kmb, people[0], pid, True)
    label_one(kmb, people[1], pid, True)
    label_one(kmb, people[2], pid, False, OTHER)
    row = kmb.pair(pid)
    assert (row.status, row.n_labels, row.n_relevant, row.n_votes, row.n_votes_relevant) == ("disputed", 3, 2, 2, 1)
    # two labels say relevant, two not; but two configurations of three say not relevant
    label_one(kmb, people[3], pid, False, third)
    row = kmb.pair(pid)
    assert (row.status, row.n_labels, row.n_relevant, row.n_votes, row.n_votes_relevant, row.n_model_configs) == (
        "verified", 4, 2, 3, 1, 2,
    )  # fmt: skip
    pair = verified(kmb, pid)
    assert pair["label"] is False and pair["agreement"] == pytest.approx(2 / 3)
    assert (pair["n_labels"], pair["n_votes"], pair["n_model_configs"]) == (4, 3, 2)


def test_distinct_models_a_quarantined_configuration_stops_counting(distinct: Kombinat) -> None:
    kmb = distinct
    kmb.admit()
    kmb.admit(OTHER)
    [pid] = kmb.enqueue(1)
    gold = kmb.honeypots(20)
    honest, cheat = kmb.contributor(trusted=True), kmb.contributor()
    label_one(kmb, honest, pid, True)
    b = kmb.claim(cheat, 10, OTHER)  # 3 honeypots: all wrong is evidence enough (kombinat_api.queue.implausible_misses)
    assert pid in {p["pair_id"] for p in b["pairs"]}
    assert kmb.submit(cheat, b["batch_id"], {pid: True}, OTHER).status_code == 200
    assert (kmb.pair(pid).status, kmb.pair(pid).n_model_configs) == ("verified", 2)
    wrong = {p["pair_id"]: not gold[p["pair_id"]] for p in b["pairs"] if p["pair_id"] in gold}
    assert kmb.submit(cheat, b["batch_id"], wrong, OTHER).status_code == 200
    row = kmb.pair(pid)
    assert (row.status, row.state, row.n_labels, row.n_votes, row.n_model_configs) == ("labeled", "queued", 1, 1, None)


def _mixed_history(kmb: Kombinat) -> list[Contributor]:
    """Pairs in every state, labeled by two configurations (and two backends of one), calibrated or not."""
    kmb.admit({**TEST_MODEL, "calibration": {"method": "platt", "a": 2.0, "b": -0.5, "threshold": 0.5}})
    kmb.admit(OTHER)
    kmb.admit(SAME_ON_VLLM)
    kmb.admit(STRONG)
    order = {pid: n for n, pid in enumerate(kmb.enqueue(12))}
    people = [kmb.contributor(trusted=True) for _ in range(4)]
    models = [None, OTHER, SAME_ON_VLLM, None]
    for i, (who, model, size) in enumerate(zip(people, models, (12, 9, 4, 2), strict=True)):
        batch = kmb.claim(who, size, model)
        verdicts = {p["pair_id"]: (i * 7 + order[p["pair_id"]] * 3) % 5 < 3 for p in batch["pairs"]}
        if not verdicts:
            continue
        assert kmb.submit(who, batch["batch_id"], verdicts, model).status_code == 200
    return people


@pytest.mark.parametrize("distinct_models", [False, True])
def test_recount_agrees_with_the_incremental_path(
    database_url: str, github: FakeGitHub, engine: Engine, distinct_models: bool
) -> None:
    with app_with(database_url, github, engine, quorum_distinct_models=distinct_models, max_labels_per_tier=4) as kmb:
        _mixed_history(kmb)
        before = kmb.sql(PAIR_STATE)
        statuses = {row.status for row in before}
        assert {"verified", "disputed", "labeled"} <= statuses, statuses
        with engine.begin() as conn:
            ids = [row.pair_id for row in before]
            queue.recompute_pairs(conn, ids, 0.66, 4, 1, distinct_models)
        after = kmb.sql(PAIR_STATE)
        assert [tuple(r[:9]) for r in after] == [tuple(r[:9]) for r in before]
        assert [r.p_sum for r in after] == [pytest.approx(r.p_sum, rel=1e-5) for r in before]


def test_migration_counts_the_configurations_of_pairs_verified_before_it() -> None:
    """Pairs verified under 0003 get their votes and configurations; the downgrade goes back cleanly."""
    with fresh_database(migrate=False) as url:
        migrate(url, "0003_keep_queue_pages")
        eng = make_engine(url, 1, 0)
        try:
            with eng.begin() as conn:
                conn.exec_driver_sql("INSERT INTO contributor (login) VALUES ('a'), ('b'), ('c')")
                conn.exec_driver_sql(
                    "INSERT INTO pair (pair_id, split, cycle, status, state, n_labels, n_relevant) VALUES "
                    "('00000000-0000-0000-0000-000000000001', 's', 'c', 'verified', 'done', 3, 3), "
                    "('00000000-0000-0000-0000-000000000002', 's', 'c', 'disputed', 'queued', 2, 1)"
                )
                for pid, cid, model, rel in (
                    (1, 1, "m1", True), (1, 2, "m2", True), (1, 3, "m1", True), (2, 1, "m1", True), (2, 2, "m2", False),
                ):  # fmt: skip
                    conn.exec_driver_sql(
                        "INSERT INTO label (pair_id, contributor_id, batch_id, relevant, p_relevant, backend, "
                        "model_id, quantization, annotator_version) VALUES (%(p)s, %(c)s, gen_random_uuid(), %(r)s, "
                        "0.5, 'llama_cpp', %(m)s, 'q', 'v')",
                        {"p": f"00000000-0000-0000-0000-00000000000{pid}", "c": cid, "m": model, "r": rel},
                    )
            migrate(url)
            with eng.begin() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT n_votes, n_votes_relevant, n_model_configs FROM pair ORDER BY pair_id"
                ).all()
                assert [tuple(r) for r in rows] == [(3, 3, 2), (2, 1, None)]
                assert conn.exec_driver_sql("SELECT DISTINCT prompt_version FROM label").all() == [("p1",)]
            command.downgrade(alembic_config(url), "0003_keep_queue_pages")
            with eng.begin() as conn:
                old_rule = conn.exec_driver_sql("SELECT status FROM kombinat_next(2, 2, 0, 0.66, 3, 1)")
                assert old_rule.scalar_one() == "verified"
            migrate(url)
        finally:
            eng.dispose()


def test_the_export_credits_only_models_whose_labels_count(kmb: Kombinat) -> None:
    """A contributor out of good standing (or a quarantined label) is not credited in the published ``models``."""
    kmb.admit()
    kmb.admit(OTHER)
    (pid,) = kmb.enqueue(1)
    a, bad = (kmb.contributor(trusted=True) for _ in range(2))
    label_one(kmb, a, pid, True)
    label_one(kmb, bad, pid, True, OTHER)
    assert verified(kmb, pid)["models"] == ["llama_cpp/test/Other-LLM/Q4_K_M", "llama_cpp/test/Tiny-LLM/Q4_K_M"]
    # (losing standing also recounts the pair — trust's job, tested in test_verification — the column is read live)
    kmb.sql("UPDATE contributor SET good_standing = false WHERE id = %(c)s", {"c": bad.id})
    assert verified(kmb, pid)["models"] == ["llama_cpp/test/Tiny-LLM/Q4_K_M"]
    kmb.sql("UPDATE contributor SET good_standing = true WHERE id = %(c)s", {"c": bad.id})
    kmb.sql("UPDATE label SET quarantined = true WHERE contributor_id = %(c)s", {"c": bad.id})
    assert verified(kmb, pid)["models"] == ["llama_cpp/test/Tiny-LLM/Q4_K_M"]
