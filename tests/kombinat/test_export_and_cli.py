"""Exports for the pipeline, the model registry, public statistics, and the `kombinat` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from kombinat_api.cli import app as cli
from kombinat_api.db import current_revision
from tests.kombinat.conftest import Kombinat
from tests.support.kombinat_server import TEST_MODEL, bearer, model_info
from tests.support.postgres import fresh_database

DATA_DIR = Path(os.environ.get("EMBEDKOMB_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))


def label_all(kmb: Kombinat, who, n: int) -> None:  # type: ignore[no-untyped-def]
    batch = kmb.claim(who, n)
    resp = kmb.submit(who, batch["batch_id"], {p["pair_id"]: True for p in batch["pairs"]})
    assert resp.status_code == 200


def test_label_export_pages_in_stable_order_and_resumes(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(12, split="a", cycle="c000")
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    label_all(kmb, a, 7)
    seen: list[int] = []
    cursor = None
    while True:
        page = kmb.client.get("/api/v1/admin/labels", params={"limit": 3, **({"after": cursor} if cursor else {})},
                              headers=kmb.admin).json()  # fmt: skip
        seen += [lab["label_id"] for lab in page["labels"]]
        cursor = page["next_cursor"]
        if not page["labels"]:
            break
    assert sorted(seen) == seen and len(seen) == len(set(seen)) == 7
    first = kmb.client.get("/api/v1/admin/labels", params={"limit": 100}, headers=kmb.admin).json()["labels"][0]
    assert set(first) == {
        "label_id", "pair_id", "contributor_id", "relevant", "p_relevant", "p_calibrated", "grade", "truncated",
        "backend", "model_id", "quantization", "prompt_version", "annotator_version", "created_at", "quarantined",
        "split", "cycle",
    }  # fmt: skip
    assert (first["backend"], first["model_id"], first["quantization"], first["annotator_version"]) == (
        "llama_cpp", "test/Tiny-LLM", "Q4_K_M", "test-0.1"
    )  # fmt: skip
    # Polling from the last cursor picks up exactly the labels that arrived since.
    label_all(kmb, b, 5)
    later = kmb.client.get("/api/v1/admin/labels", params={"after": cursor}, headers=kmb.admin).json()
    assert len(later["labels"]) == 5 and not {lab["label_id"] for lab in later["labels"]} & set(seen)
    only_other = kmb.client.get("/api/v1/admin/labels", params={"split": "zzz"}, headers=kmb.admin).json()
    assert only_other["labels"] == []
    bad = kmb.client.get("/api/v1/admin/labels", params={"after": "garbage"}, headers=kmb.admin)
    assert bad.status_code == 422 and "cursor" in bad.json()["detail"][0]["msg"]


def test_verified_export_per_split_and_cycle(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(4, split="a", cycle="c000")
    kmb.enqueue(3, split="b", cycle="c001", start_priority=-100)
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    label_all(kmb, a, 7)
    label_all(kmb, b, 7)
    out_a = kmb.client.get("/api/v1/admin/verified", params={"split": "a", "cycle": "c000", "limit": 3},
                           headers=kmb.admin).json()  # fmt: skip
    assert len(out_a["pairs"]) == 3
    params = {"split": "a", "cycle": "c000", "after": out_a["next_cursor"]}
    rest = kmb.client.get("/api/v1/admin/verified", params=params, headers=kmb.admin).json()
    assert len(rest["pairs"]) == 1
    assert kmb.client.get("/api/v1/admin/verified", params={"split": "b"}, headers=kmb.admin).json()["pairs"][0][
        "cycle"
    ] == "c001"  # fmt: skip
    q = kmb.client.get("/api/v1/admin/queue", params={"split": "a"}, headers=kmb.admin).json()
    assert q == {"queued": 0, "leased": 0, "labeled": 4, "verified": 4, "disputed": 0, "escalated": 0,
                 "unresolved": 0}  # fmt: skip


def test_model_registry_and_quality_report(kmb: Kombinat) -> None:
    assert kmb.client.get("/api/v1/models").json() == {"models": []}
    kmb.admit()
    listed = kmb.client.get("/api/v1/models").json()["models"]
    assert listed == [TEST_MODEL]
    changed = {**TEST_MODEL, "admitted": False}
    kmb.admit(changed)
    assert kmb.client.get("/api/v1/models").json()["models"][0]["admitted"] is False
    kmb.admit()
    kmb.enqueue(4)
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    label_all(kmb, a, 4)
    batch = kmb.claim(b, 4)
    kmb.submit(b, batch["batch_id"], {p["pair_id"]: i % 2 == 0 for i, p in enumerate(batch["pairs"])})
    [row] = kmb.client.get("/api/v1/admin/model-quality", headers=kmb.admin).json()["models"]
    assert (row["backend"], row["model_id"], row["quantization"]) == ("llama_cpp", "test/Tiny-LLM", "Q4_K_M")
    assert row["labels"] == 8 and row["compared"] == 8 and row["agreement"] == pytest.approx(0.5)
    contributors = kmb.client.get("/api/v1/admin/contributors", headers=kmb.admin).json()["contributors"]
    assert {c["login"] for c in contributors} == {a.login, b.login}


def test_public_stats_json_and_page(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(5, split="reddit_title_body", cycle="c000")
    a = kmb.contributor(login="ada", trusted=True)
    label_all(kmb, a, 3)
    stats = kmb.client.get("/api/v1/stats").json()
    [split] = stats["splits"]
    assert (split["split"], split["queued"], split["labeled"], split["verified"]) == (
        "reddit_title_body",
        5,
        3,
        0,
    )
    assert stats["active_contributors"] == 1 and stats["labels_per_hour"] == 3
    assert stats["leaderboard"] == [{"login": "ada", "labels": 3}]
    # out of good standing: off the public leaderboard (its labels no longer count)
    kmb.sql("UPDATE contributor SET good_standing = false WHERE id = %(c)s", {"c": a.id})
    assert kmb.client.get("/api/v1/stats").json()["leaderboard"] == []
    kmb.sql("UPDATE contributor SET good_standing = true WHERE id = %(c)s", {"c": a.id})
    page = kmb.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "reddit_title_body" in page.text and "ada" in page.text and "labels / hour" in page.text


def test_cli_migrate_admin_token_honeypots_stats() -> None:
    runner = CliRunner()
    with fresh_database(migrate=False) as url:
        assert current_revision(url) is None
        result = runner.invoke(cli, ["migrate", "--database-url", url])
        assert result.exit_code == 0, result.output
        assert current_revision(url) == "0005_honeypot_exposure"
        # Migrating again is a no-op.
        assert runner.invoke(cli, ["migrate", "--database-url", url]).exit_code == 0
        token = runner.invoke(cli, ["create-admin-token", "--name", "pipeline", "--database-url", url])
        assert token.exit_code == 0 and token.output.strip().startswith("kmb_")
        scifact = DATA_DIR / "scifact"
        if scifact.exists():
            loaded = runner.invoke(cli, ["load-honeypots", str(scifact), "--limit", "200", "--database-url", url])
            assert loaded.exit_code == 0, loaded.output
            assert loaded.output.startswith("200 honeypots inserted")
            again = runner.invoke(cli, ["load-honeypots", str(scifact), "--limit", "200", "--database-url", url])
            assert "0 honeypots inserted, 200 already present" in again.output
        stats = runner.invoke(cli, ["stats", "--database-url", url])
        assert stats.exit_code == 0 and "labels stored: 0" in stats.output
        # the queue's working set against the server's cache: a tiny database fits any server's
        assert "fits in shared_buffers" in stats.output, stats.output
        as_json = json.loads(runner.invoke(cli, ["stats", "--json", "--database-url", url]).output)
        assert as_json["cache"]["fits"] is True and as_json["cache"]["working_set_bytes"] > 0


@pytest.mark.subprocess
def test_served_by_uvicorn_with_cli_token(tmp_path: Path) -> None:
    """`kombinat serve` wiring: the ASGI entry point reads its settings from the environment."""
    from tests.support.kombinat_server import running_kombinat

    with running_kombinat() as server:
        resp = httpx.get(f"{server.url}/api/v1/admin/queue", headers=bearer(server.admin_token))
        assert resp.status_code == 200
        assert (
            httpx.post(f"{server.url}/api/v1/batches/claim", json={"size": 1, "model": model_info()}).status_code == 401
        )


def test_label_export_never_skips_a_label_that_commits_late(kmb: Kombinat, database_url: str) -> None:
    import psycopg

    from tests.support.postgres import create_database, drop_database

    kmb.admit()
    [p1, p2] = kmb.enqueue(2)
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    insert = (
        "INSERT INTO label (pair_id, contributor_id, batch_id, relevant, p_relevant, backend, model_id,"
        " quantization, annotator_version) VALUES (%s, 1, gen_random_uuid(), true, 0.9, 'llama_cpp', 'm', 'q', 'v')"
    )
    other_db = create_database("kombinat_other")
    try:
        with (
            psycopg.connect(dsn) as slow,
            psycopg.connect(dsn, autocommit=True) as fast,
            psycopg.connect(dsn.rsplit("/", 1)[0] + "/" + other_db) as elsewhere,
        ):
            elsewhere.execute("SELECT pg_current_xact_id()")  # a long transaction in another database
            slow.execute(insert, (p1,))  # takes the lower transaction id, commits late
            fast.execute(insert, (p2,))
            page = kmb.client.get("/api/v1/admin/labels", headers=kmb.admin).json()
            assert page["labels"] == []  # p2 must wait: p1's transaction could still commit below it
            slow.commit()
            page = kmb.client.get("/api/v1/admin/labels", headers=kmb.admin).json()
            # The transaction in the other database does not hold exports back.
            assert [lab["pair_id"] for lab in page["labels"]] == [p1, p2]
            elsewhere.rollback()
    finally:
        drop_database(other_db)
