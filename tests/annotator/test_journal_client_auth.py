"""Journal durability and locking, the client's retry policy, and the token file."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from annotator import auth
from annotator.backends.base import Pair
from annotator.client import ApiError, KombinatClient, LeaseLost, Unavailable, UnexpectedResponse
from annotator.journal import Journal, JournalBusy, journal_path, peek

MODEL = {"backend": "llama_cpp", "model_id": "m", "quantization": "q", "annotator_version": "v"}


def label(pid: str) -> dict[str, Any]:
    return {
        "pair_id": pid,
        "relevant": True,
        "p_relevant": 0.9,
        "grade": None,
        "truncated": False,
        "seconds": 0.1,
    }


# --- journal --------------------------------------------------------------------------------------------


def test_journal_tracks_each_pair_through_its_states(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    pairs = [Pair(f"p{i}", "q", f"d{i}") for i in range(4)]
    j.add_batch("b1", MODEL, "2030-01-01T00:00:00Z", pairs)
    j.add_batch("b1", MODEL, None, pairs)  # idempotent
    j.record_label("b1", label("p0"))
    j.record_label("b1", label("p2"))
    with pytest.raises(RuntimeError):
        j.record_label("b1", label("p0"))  # a pair is labeled once
    assert [x["pair_id"] for x in j.pending("b1")] == ["p0", "p2"]
    assert [p.pair_id for p in j.unlabeled("b1")] == ["p1", "p3"]
    j.mark("b1", ["p0"], "acked")
    [b] = j.open_batches()
    assert (b.batch_id, b.model, b.labeled, b.leased) == ("b1", MODEL, 1, 2)
    j.close_batch("b1")
    assert j.open_batches() == [] and j.unlabeled("b1") == []  # texts are gone with the batch
    j.close()


@pytest.mark.subprocess
def test_journal_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    code = f"""
import os, signal
from annotator.journal import Journal
from annotator.backends.base import Pair
j = Journal({str(path)!r})
j.add_batch("b", {MODEL!r}, None, [Pair("p1", "q", "d"), Pair("p2", "q", "d")])
j.record_label("b", {label("p1")!r})
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    j = Journal(path)  # the OS released the lock of the killed process
    assert [x["pair_id"] for x in j.pending("b")] == ["p1"]
    assert [p.pair_id for p in j.unlabeled("b")] == ["p2"]
    assert peek(path) == {"path": str(path), "exists": True, "open_batches": 1, "pending_labels": 1}
    j.close()


def test_two_workers_cannot_share_a_journal(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    with pytest.raises(JournalBusy):
        Journal(tmp_path / "j.sqlite3")
    j.close()
    Journal(tmp_path / "j.sqlite3").close()


def test_journal_is_per_server_and_contributor(tmp_path: Path) -> None:
    a = journal_path(tmp_path, "http://k:8000/", "1")
    assert a == journal_path(tmp_path, "http://k:8000", "1")
    assert a != journal_path(tmp_path, "http://k:8000", "2")
    assert a != journal_path(tmp_path, "http://other:8000", "1")
    assert peek(tmp_path / "none.sqlite3")["exists"] is False


# --- client ---------------------------------------------------------------------------------------------


def client_for(handler: Any, **kw: Any) -> tuple[KombinatClient, list[float], list[str]]:
    sleeps: list[float] = []
    retries: list[str] = []
    client = KombinatClient(
        "http://k.test",
        "tok",
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
        rng=random.Random(1),
        on_retry=lambda attempt, delay, problem: retries.append(problem),
        **kw,
    )
    return client, sleeps, retries


def test_network_errors_and_5xx_are_retried_with_backoff() -> None:
    answers: list[Any] = ["connect", 502, 503, "timeout", 200]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if answer == "connect":
            raise httpx.ConnectError("refused", request=request)
        if answer == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(answer, json={"models": [], "detail": "down"})

    client, sleeps, retries = client_for(handler, backoff_base=1.0, backoff_cap=100)
    assert client.models() == []
    assert len(sleeps) == 4 and len(retries) == 4
    # full jitter: each wait is within [0, base * 2^attempt]
    assert all(0 <= s <= 2**i for i, s in enumerate(sleeps))
    assert "ConnectError" in retries[0] and "HTTP 502" in retries[1]


def test_backoff_is_capped_and_jittered() -> None:
    client = KombinatClient("http://k.test", rng=random.Random(0), backoff_base=0.5, backoff_cap=30)
    delays = [client.backoff(a) for a in range(20)]
    assert max(delays) <= 30 and len(set(delays)) == 20


def test_gives_up_after_the_retry_budget() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client, sleeps, _ = client_for(handler, max_elapsed=0.0)
    with pytest.raises(Unavailable, match="unavailable"):
        client.models()
    assert sleeps == []


def test_4xx_is_not_retried_and_carries_the_detail() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(403, json={"detail": "Model llama_cpp/x/q is not admitted"})

    client, sleeps, _ = client_for(handler)
    with pytest.raises(ApiError) as info:
        client.claim(10, MODEL)
    assert info.value.status == 403 and "not admitted" in str(info.value)
    assert len(calls) == 1 and sleeps == []


def test_409_is_a_lost_lease() -> None:
    client, _, _ = client_for(lambda r: httpx.Response(409, json={"detail": "expired"}))
    with pytest.raises(LeaseLost):
        client.submit("b", MODEL, [label("p")])


def test_requests_carry_the_token_only_where_needed() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"models": [], "contributor_id": 1})

    client, _, _ = client_for(handler)
    client.models()
    client.me()
    assert "authorization" not in seen[0].headers
    assert seen[1].headers["authorization"] == "Bearer tok"
    assert seen[0].headers["user-agent"].startswith("embedkomb-annotator/")


def test_a_2xx_body_that_is_not_an_object_is_refused_by_name() -> None:
    client, sleeps, _ = client_for(lambda r: httpx.Response(200, json=["not", "a", "batch"]))
    with pytest.raises(UnexpectedResponse, match=r"POST /batches/claim with list"):
        client.claim(10, MODEL)
    assert sleeps == []  # the server answered: retrying would get the same body


# --- token file and device flow -------------------------------------------------------------------------


def test_a_credentials_file_that_is_not_an_object_is_explained(isolated_dirs: Path) -> None:
    auth.token_path().parent.mkdir(parents=True)
    auth.token_path().write_text("[]")
    with pytest.raises(RuntimeError, match="not a credentials file; delete it"):
        auth.load()


def test_token_file_is_created_with_mode_0600(isolated_dirs: Path) -> None:
    creds = auth.Credentials("http://k:8000/", "secret-token", "alice", "7")
    path = auth.save(creds)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert auth.load("http://k:8000") == auth.Credentials("http://k:8000/", "secret-token", "alice", "7")
    assert auth.load() is not None and auth.default_server() == "http://k:8000"
    auth.save(auth.Credentials("http://other", "t2", "bob", "8"))
    assert auth.load().login == "bob"  # type: ignore[union-attr]
    assert auth.load("http://k:8000").login == "alice"  # type: ignore[union-attr]
    assert auth.forget("http://other") is True
    assert auth.load("http://other") is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not list(path.parent.glob("*.tmp"))


def test_device_flow_polls_patiently_and_backs_off_on_slow_down() -> None:
    answers = ["authorization_pending", "slow_down", "authorization_pending", "ok"]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/start"):
            start = {"device_code": "dc", "user_code": "AB-CD", "verification_uri": "u", "interval": 5}
            return httpx.Response(200, json={**start, "expires_in": 900})
        answer = answers.pop(0)
        if answer != "ok":
            return httpx.Response(400, json={"detail": answer})
        return httpx.Response(200, json={"token": "kt", "login": "alice", "contributor_id": 3})

    client, _, _ = client_for(handler)
    waits: list[float] = []
    shown: list[str] = []
    creds = auth.device_login(client, lambda uri, code, exp: shown.append(code), sleep=waits.append)
    assert creds == auth.Credentials("http://k.test", "kt", "alice", "3")
    assert shown == ["AB-CD"] and waits == [5, 5, 10, 10]


@pytest.mark.parametrize(("detail", "message"), [("expired_token", "expired"), ("access_denied", "denied")])
def test_device_flow_failures_are_explained(detail: str, message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/start"):
            return httpx.Response(200, json={"device_code": "dc", "user_code": "X", "verification_uri": "u",
                                             "interval": 1, "expires_in": 60})  # fmt: skip
        return httpx.Response(400, json={"detail": detail})

    client, _, _ = client_for(handler)
    with pytest.raises(auth.LoginFailed, match=message):
        auth.device_login(client, lambda *a: None, sleep=lambda s: None)
