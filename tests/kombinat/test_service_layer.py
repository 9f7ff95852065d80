"""kombinat's functions that its CLI and the demo call directly on the database: local contributor tokens,
token revocation, per-split counts, and the one-connection transaction they run in."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from kombinat_api import queue
from kombinat_api.auth import create_local_contributor_token, issue_token, revoke_tokens
from kombinat_api.cli import app as cli
from kombinat_api.db import standalone_transaction
from tests.kombinat.conftest import Contributor, Kombinat
from tests.support.kombinat_server import bearer


def test_local_contributor_token_makes_one_contributor_per_name(kmb: Kombinat, engine: Engine) -> None:
    with engine.begin() as conn:
        contributor_id, token = create_local_contributor_token(conn, "demo-alice")
        again_id, again_token = create_local_contributor_token(conn, "demo-alice")
        other_id, _ = create_local_contributor_token(conn, "demo-bob")
    assert again_id == contributor_id != other_id
    assert token.startswith("kmb_") and again_token != token
    assert kmb.sql("SELECT login, github_id, is_admin FROM contributor WHERE id = %(c)s", {"c": contributor_id}) == [
        ("local:demo-alice", None, False)
    ]
    for minted in (token, again_token):
        me = kmb.client.get("/api/v1/me", headers=bearer(minted))
        assert me.status_code == 200, me.text
        assert me.json()["contributor_id"] == contributor_id and me.json()["is_admin"] is False
    assert kmb.client.get("/api/v1/admin/queue", headers=bearer(token)).status_code == 403


@pytest.mark.parametrize("name", ["Alice", "a:b", "", "a_b", "-leading-dash", "x" * 40])
def test_local_contributor_name_is_checked_before_anything_is_written(kmb: Kombinat, engine: Engine, name: str) -> None:
    with engine.begin() as conn, pytest.raises(ValueError, match="invalid local contributor name"):
        create_local_contributor_token(conn, name)
    assert kmb.sql("SELECT count(*) FROM contributor WHERE NOT is_admin") == [(0,)]


def test_banned_local_contributor_gets_no_token(kmb: Kombinat, engine: Engine, database_url: str) -> None:
    with engine.begin() as conn:
        contributor_id, token = create_local_contributor_token(conn, "mallory")
    kmb.sql("UPDATE contributor SET banned = true WHERE id = %(c)s", {"c": contributor_id})
    with engine.begin() as conn, pytest.raises(ValueError, match="contributor local:mallory is banned"):
        create_local_contributor_token(conn, "mallory")
    assert kmb.sql("SELECT count(*) FROM api_token WHERE contributor_id = %(c)s", {"c": contributor_id}) == [(1,)]
    assert kmb.client.get("/api/v1/me", headers=bearer(token)).status_code == 403
    # the CLI reports it as a bad NAME, like an invalid one
    result = CliRunner().invoke(cli, ["create-local-contributor", "mallory", "--database-url", database_url])
    assert result.exit_code == 2 and "banned" in result.output, result.output


def test_revoked_tokens_are_refused_and_others_keep_working(kmb: Kombinat, engine: Engine) -> None:
    ada = kmb.contributor("ada")
    with engine.begin() as conn:
        second = issue_token(conn, ada.id, False, "second")
        assert revoke_tokens(conn, [ada.token, "kmb_never-issued"]) == 1
    refused = kmb.client.get("/api/v1/me", headers=ada.headers)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert kmb.client.get("/api/v1/me", headers=bearer(second)).status_code == 200
    assert kmb.client.get("/api/v1/admin/queue", headers=kmb.admin).status_code == 200
    with engine.begin() as conn:
        # revoking again, or nothing, changes nothing
        assert revoke_tokens(conn, [ada.token]) == 0
        assert revoke_tokens(conn, []) == 0
        assert revoke_tokens(conn, [second, kmb.admin_token]) == 2
    assert kmb.client.get("/api/v1/me", headers=bearer(second)).status_code == 401
    assert kmb.client.get("/api/v1/admin/queue", headers=kmb.admin).status_code == 401


def test_split_counts_count_one_split_and_cycle(kmb: Kombinat, engine: Engine) -> None:
    kmb.admit()
    # s1/c000 is the hardest work, so the claims below take their ordinary pairs from it
    counted = kmb.enqueue(6, split="s1", cycle="c000", start_priority=100)
    kmb.enqueue(2, split="s1", cycle="c001")
    kmb.enqueue(3, split="s2", cycle="c000")
    gold = kmb.honeypots(4)

    def label(who: Contributor, size: int) -> tuple[list[str], int]:
        """Claim and answer everything (honeypots correctly): the batch's ordinary pairs and its size."""
        batch = kmb.claim(who, size)
        verdicts = {p["pair_id"]: gold.get(p["pair_id"], True) for p in batch["pairs"]}
        assert kmb.submit(who, batch["batch_id"], verdicts).status_code == 200
        return [pid for pid in verdicts if pid not in gold], len(verdicts)

    # Ada labels up to four pairs of s1/c000; Bob agrees on up to two of them, which makes those verified.
    ada_pairs, ada_labels = label(kmb.contributor("ada", trusted=True), 4)
    bob_pairs, bob_labels = label(kmb.contributor("bob", trusted=True), 2)
    assert ada_pairs and set(ada_pairs) <= set(counted) and bob_pairs and set(bob_pairs) <= set(ada_pairs)
    honeypot_answers = ada_labels - len(ada_pairs) + bob_labels - len(bob_pairs)

    with engine.begin() as conn:
        counts = queue.split_counts(conn, "s1", "c000")
        summaries = {(s["split"], s["cycle"]): s for s in queue.split_summaries(conn)}
        per_contributor = queue.labels_per_contributor(conn)
        untouched = queue.split_counts(conn, "nowhere", "c999")
        stored = queue.labels_stored(conn)
    verified = len(bob_pairs)
    assert counts == {
        "pairs": 6,
        "queued": 6 - verified,  # a pair labeled once is back in the queue for its second label
        "leased": 0,
        "labeled": len(ada_pairs),
        "verified": verified,
        "disputed": 0,
        "escalated": 0,
        "unresolved": 0,
        "labels": len(ada_pairs) + verified,
        "honeypots": 4,
        "honeypot_labels": honeypot_answers,
    }
    # the public statistics count the same pairs the same way
    summary = summaries[("s1", "c000")]
    assert {key: summary[key] for key in queue.PairCounts.__annotations__} == {
        key: counts[key] for key in queue.PairCounts.__annotations__
    }
    assert set(summaries) == {("s1", "c000"), ("s1", "c001"), ("s2", "c000")}
    assert summaries[("s2", "c000")]["pairs"] == 3 and summaries[("s2", "c000")]["labeled"] == 0
    assert per_contributor == {"ada": ada_labels, "bob": bob_labels}
    assert stored == ada_labels + bob_labels
    assert untouched == {**{key: 0 for key in counts}, "honeypots": 4, "honeypot_labels": honeypot_answers}


def test_standalone_transaction_commits_or_rolls_back(kmb: Kombinat, database_url: str) -> None:
    insert = "INSERT INTO contributor (login) VALUES (%(l)s)"
    with standalone_transaction(database_url) as conn:
        conn.exec_driver_sql(insert, {"l": "kept"})
    with pytest.raises(RuntimeError), standalone_transaction(database_url) as conn:
        conn.exec_driver_sql(insert, {"l": "rolled-back"})
        raise RuntimeError("boom")
    assert kmb.sql("SELECT login FROM contributor WHERE NOT is_admin") == [("kept",)]
