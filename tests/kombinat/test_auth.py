"""Sign-in through the GitHub device flow (fake GitHub on loopback), tokens, and the 401/403/413/422/429
paths with their messages."""

from __future__ import annotations

import hashlib

from fastapi.testclient import TestClient

from kombinat_api.main import create_app
from tests.kombinat.conftest import Kombinat, make_settings
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import bearer, model_info


def test_device_flow_issues_a_revocable_hashed_token(kmb: Kombinat, github: FakeGitHub) -> None:
    c = kmb.client
    start = c.post("/api/v1/auth/device/start", json={})
    assert start.status_code == 200, start.text
    body = start.json()
    assert set(body) == {"device_code", "user_code", "verification_uri", "interval", "expires_in"}
    pending = c.post("/api/v1/auth/device/poll", json={"device_code": body["device_code"]})
    assert pending.status_code == 400 and pending.json() == {"detail": "authorization_pending"}
    github.authorize(body["user_code"], "octocat", 583231)
    done = c.post("/api/v1/auth/device/poll", json={"device_code": body["device_code"]})
    assert done.status_code == 200, done.text
    token, cid = done.json()["token"], done.json()["contributor_id"]
    assert done.json()["login"] == "octocat"
    # Stored only as a hash.
    stored = kmb.sql("SELECT token_hash FROM api_token WHERE contributor_id = %(c)s", {"c": cid})
    assert stored == [(hashlib.sha256(token.encode()).hexdigest(),)]
    assert token not in str(kmb.sql("SELECT * FROM api_token"))
    me = c.get("/api/v1/me", headers=bearer(token)).json()
    assert me["contributor_id"] == cid and me["login"] == "octocat" and me["is_admin"] is False
    assert me["trusted"] is False and me["labels_submitted"] == 0
    # Used device codes are spent.
    again = c.post("/api/v1/auth/device/poll", json={"device_code": body["device_code"]})
    assert again.status_code == 400 and again.json()["detail"] == "expired_token"
    # Signing in again maps to the same contributor, with a second token.
    second = c.post("/api/v1/auth/device/start", json={}).json()
    github.authorize(second["user_code"], "octocat", 583231)
    token2 = c.post("/api/v1/auth/device/poll", json={"device_code": second["device_code"]}).json()
    assert token2["contributor_id"] == cid and token2["token"] != token
    # Revocation: the token stops working at once, the other one keeps working.
    assert c.delete("/api/v1/auth/token", headers=bearer(token)).status_code == 204
    revoked = c.get("/api/v1/me", headers=bearer(token))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    assert c.get("/api/v1/me", headers=bearer(token2["token"])).status_code == 200


def test_device_flow_denied_and_expired(kmb: Kombinat, github: FakeGitHub) -> None:
    for action, expected in ((github.deny, "access_denied"), (github.expire, "expired_token")):
        start = kmb.client.post("/api/v1/auth/device/start", json={}).json()
        action(start["user_code"])
        resp = kmb.client.post("/api/v1/auth/device/poll", json={"device_code": start["device_code"]})
        assert resp.status_code == 400 and resp.json() == {"detail": expected}
    unknown = kmb.client.post("/api/v1/auth/device/poll", json={"device_code": "nope"})
    assert unknown.status_code == 400 and unknown.json() == {"detail": "expired_token"}


def test_401_paths_say_what_is_wrong(kmb: Kombinat) -> None:
    c = kmb.client
    missing = c.post("/api/v1/batches/claim", json={"size": 1, "model": model_info()})
    assert missing.status_code == 401 and "Missing credentials" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    malformed = c.get("/api/v1/me", headers={"Authorization": "Token abc"})
    assert malformed.status_code == 401 and "Bearer <token>" in malformed.json()["detail"]
    wrong = c.get("/api/v1/admin/queue", headers=bearer("kmb_not-a-real-token"))
    assert wrong.status_code == 401 and "Invalid or revoked token" in wrong.json()["detail"]


def test_403_paths(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(3)
    alice = kmb.contributor()
    for method, path in (("get", "/api/v1/admin/queue"), ("get", "/api/v1/admin/labels"),
                         ("post", "/api/v1/admin/pairs"), ("put", "/api/v1/admin/models")):  # fmt: skip
        resp = getattr(kmb.client, method)(path, headers=alice.headers, **({"json": {}} if method != "get" else {}))
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json() == {"detail": "This endpoint needs an admin token."}
    unadmitted = {**model_info(), "model_id": "someone/Unknown-LLM"}
    resp = kmb.client.post("/api/v1/batches/claim", json={"size": 2, "model": unadmitted}, headers=alice.headers)
    assert resp.status_code == 403
    assert "llama_cpp/someone/Unknown-LLM/Q4_K_M is not admitted" in resp.json()["detail"]
    assert kmb.sql("SELECT count(*) FROM batch")[0][0] == 0
    # A registered but not admitted model is refused the same way.
    kmb.admit({"name": "pending", "backend": "mlx", "model_id": "x/Y", "quantization": "4bit", "admitted": False})
    resp = kmb.client.post(
        "/api/v1/batches/claim", json={"size": 2, "model": {**model_info(), "backend": "mlx", "model_id": "x/Y",
                                                            "quantization": "4bit"}}, headers=alice.headers
    )  # fmt: skip
    assert resp.status_code == 403


def test_422_paths_keep_fastapis_error_list(kmb: Kombinat) -> None:
    kmb.admit()
    alice = kmb.contributor()
    c = kmb.client

    def claim(body: dict) -> dict:
        resp = c.post("/api/v1/batches/claim", json=body, headers=alice.headers)
        assert resp.status_code == 422, resp.text
        return resp.json()

    assert claim({"size": 0, "model": model_info()})["detail"][0]["loc"] == ["body", "size"]
    too_big = claim({"size": 5000, "model": model_info()})["detail"][0]
    assert too_big["loc"] == ["body", "size"] and "limit of 1000" in too_big["msg"]
    assert claim({"size": 5, "model": {**model_info(), "backend": "onnx"}})["detail"][0]["loc"] == [
        "body", "model", "backend"
    ]  # fmt: skip
    assert claim({"size": 5, "model": model_info(), "extra": 1})["detail"][0]["type"] == "extra_forbidden"

    def labels(lab: list[dict]) -> dict:
        resp = c.post(
            "/api/v1/batches/00000000-0000-0000-0000-000000000001/labels",
            json={"model": model_info(), "labels": lab},
            headers=alice.headers,
        )
        assert resp.status_code == 422, resp.text
        return resp.json()

    pid = "7d1f8c1e-0000-4000-8000-000000000001"
    assert labels([{"pair_id": pid, "relevant": True, "p_relevant": 1.5}])["detail"][0]["loc"][-1] == "p_relevant"
    assert labels([{"pair_id": "not-a-uuid", "relevant": True, "p_relevant": 0.5}])["detail"][0]["loc"][-1] == "pair_id"
    dup = labels([{"pair_id": pid, "relevant": True, "p_relevant": 0.5}] * 2)["detail"][0]
    assert "appears more than once" in dup["msg"]
    assert labels([])["detail"][0]["loc"] == ["body", "labels"]
    many = [{"pair_id": f"7d1f8c1e-0000-4000-8000-{i:012d}", "relevant": True, "p_relevant": 0.5} for i in range(501)]
    assert labels(many)["detail"][0]["loc"] == ["body", "labels"]
    bad_page = c.get("/api/v1/admin/labels?limit=100000", headers=kmb.admin)
    assert bad_page.status_code == 422 and "limit of 10000" in bad_page.json()["detail"][0]["msg"]
    honeypot_split = c.post(
        "/api/v1/admin/pairs",
        json={"pairs": [{"pair_id": pid, "query": "q", "document": "d", "split": "honeypot", "cycle": "c000"}]},
        headers=kmb.admin,
    )
    assert honeypot_split.status_code == 422 and "reserved" in honeypot_split.json()["detail"][0]["msg"]


def test_oversized_body_is_refused_before_parsing(kmb: Kombinat) -> None:
    alice = kmb.contributor()
    big = b'{"size": 1, "model": {"backend": "llama_cpp", "model_id": "' + b"x" * (3 * 1024 * 1024) + b'"}}'
    resp = kmb.client.post(
        "/api/v1/batches/claim", content=big, headers={**alice.headers, "Content-Type": "application/json"}
    )
    assert resp.status_code == 413
    assert "at most 2097152 bytes" in resp.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield big[: 1024 * 1024]
        yield big[1024 * 1024 :]

    streamed = kmb.client.post(
        "/api/v1/batches/claim",
        content=chunks(),
        headers={**alice.headers, "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413


def test_rate_limit_is_shared_by_replicas(database_url: str, github: FakeGitHub, kmb: Kombinat) -> None:
    """Two app instances (two 'replicas') on one database count one token's requests together."""
    settings = make_settings(database_url, github, rate_limit_per_minute=5)
    alice = kmb.contributor()
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        # Stay inside one clock minute so the fixed window does not roll over mid-test.
        kmb.sql("SELECT pg_sleep(greatest(0, 1.5 - (60 - extract(second FROM now()))))")
        codes = [(one if i % 2 else two).get("/api/v1/me", headers=alice.headers).status_code for i in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429], codes
        limited = one.get("/api/v1/me", headers=alice.headers)
        assert "at most 5 requests per minute" in limited.json()["detail"]
        assert int(limited.headers["retry-after"]) >= 0
        # Another contributor has its own budget.
        assert two.get("/api/v1/me", headers=kmb.contributor().headers).status_code == 200


def test_admin_tokens_cannot_claim_or_label(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(3)
    resp = kmb.client.post("/api/v1/batches/claim", json={"size": 2, "model": model_info()}, headers=kmb.admin)
    assert resp.status_code == 403 and "contributor token" in resp.json()["detail"]
    batch = kmb.claim(kmb.contributor(), 2)
    pid = batch["pairs"][0]["pair_id"]
    body = {"model": model_info(), "labels": [{"pair_id": pid, "relevant": True, "p_relevant": 0.9}]}
    resp = kmb.client.post(f"/api/v1/batches/{batch['batch_id']}/labels", json=body, headers=kmb.admin)
    assert resp.status_code == 403 and "contributor token" in resp.json()["detail"]
    assert kmb.sql("SELECT count(*) FROM label") == [(0,)]
