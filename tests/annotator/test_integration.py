"""Acceptance: the real `annotator` command against a real kombinat (uvicorn on loopback, real PostgreSQL on
127.0.0.1:5432) with the real llama.cpp backend on the tiny offline model. The only fake is GitHub.

Each test gets a fresh database and server (tests.support.kombinat_server). The annotator runs as a
subprocess exactly as a volunteer runs it, with its config/data/cache directories in the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from annotator import auth
from annotator.journal import journal_path, peek
from annotator.samples import sample_pairs
from tests.annotator.conftest import TINY_ENTRY
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import (
    KombinatServer,
    admit_model,
    bearer,
    running_kombinat,
    sign_in,
    start_server,
    stop_server,
)


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with FakeGitHub() as gh:
        yield gh


@pytest.fixture
def kombinat(github: FakeGitHub, tmp_path: Path) -> Iterator[KombinatServer]:
    with running_kombinat(github=github, log_path=tmp_path / "kombinat.log") as server:
        admit_model(server, TINY_ENTRY)
        yield server


def enqueue(server: KombinatServer, n: int) -> list[str]:
    samples = [pair for pair, _ in sample_pairs()]
    pairs = [
        {
            "pair_id": str(uuid.uuid4()),
            "query": samples[i % len(samples)].query,
            "document": samples[i % len(samples)].document,
            "split": "sample",
            "cycle": "c000",
            "priority": float(n - i),
        }
        for i in range(n)
    ]
    resp = httpx.post(f"{server.url}/api/v1/admin/pairs", json={"pairs": pairs}, headers=bearer(server.admin_token))
    resp.raise_for_status()
    return [p["pair_id"] for p in pairs]


def exported_labels(server: KombinatServer) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"limit": 1000, **({"after": after} if after else {})}
        resp = httpx.get(f"{server.url}/api/v1/admin/labels", params=params, headers=bearer(server.admin_token))
        resp.raise_for_status()
        body = resp.json()
        out += body["labels"]
        if not body.get("next_cursor") or not body["labels"]:
            return out
        after = body["next_cursor"]


def login_as(server: KombinatServer, github: FakeGitHub, login: str, user_id: int) -> auth.Credentials:
    token = sign_in(server, github, login, user_id)
    me = httpx.get(f"{server.url}/api/v1/me", headers=bearer(token)).json()
    creds = auth.Credentials(server.url, token, login, str(me["contributor_id"]))
    auth.save(creds)
    return creds


def annotator(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "annotator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kw,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, list[dict[str, Any]], str]:
    out, err = proc.communicate(timeout=timeout)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, events, err


def run_args(server: KombinatServer, model: Path, *extra: str) -> list[str]:
    return ["run", "--server", server.url, "--model-path", str(model), "--json", *extra]


@pytest.mark.subprocess
def test_run_once_labels_a_batch_and_the_labels_land_in_kombinat(
    kombinat: KombinatServer, github: FakeGitHub, tiny_model_path: Path
) -> None:
    pair_ids = enqueue(kombinat, 12)
    creds = login_as(kombinat, github, "alice", 1001)
    code, events, err = finish(annotator(*run_args(kombinat, tiny_model_path, "--once", "--batch-size", "12")))
    assert code == 0, err
    start = next(e for e in events if e["event"] == "start")
    assert (start["backend"], start["model_id"], start["quantization"]) == (
        "llama_cpp",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Q4_1",
    )
    done = events[-1]
    assert done["event"] == "finish" and done["labeled"] == 12 and done["accepted"] == 12

    labels = exported_labels(kombinat)
    assert sorted(label["pair_id"] for label in labels) == sorted(pair_ids)
    for label in labels:
        assert str(label["contributor_id"]) == creds.contributor_id
        assert (label["backend"], label["model_id"], label["quantization"]) == (
            "llama_cpp",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "Q4_1",
        )
        assert label["annotator_version"] == "0.1.0+p1"
        assert 0.0 <= label["p_relevant"] <= 1.0
        assert label["relevant"] == (label["p_relevant"] >= 0.5)
    # the journal is empty again
    assert peek(journal_path(auth.data_dir(), kombinat.url, creds.contributor_id))["open_batches"] == 0


@pytest.mark.subprocess
def test_sigkill_mid_batch_then_restart_loses_and_duplicates_nothing(
    kombinat: KombinatServer, github: FakeGitHub, tiny_model_path: Path
) -> None:
    pair_ids = enqueue(kombinat, 24)
    creds = login_as(kombinat, github, "bob", 1002)
    jpath = journal_path(auth.data_dir(), kombinat.url, creds.contributor_id)
    proc = annotator(*run_args(kombinat, tiny_model_path, "--once", "--batch-size", "24", "--chunk-size", "5"))
    # Kill it when at least one chunk was acknowledged AND some finished labels are still only local: the
    # worst moment, with work in every state (acked, journaled-not-sent, unlabeled). SIGSTOP freezes it
    # while we look, so what we saw is what it dies with.
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if not jpath.exists():
            continue
        proc.send_signal(signal.SIGSTOP)
        state = peek(jpath)
        if state["open_batches"] == 1 and state["pending_labels"] >= 1 and len(exported_labels(kombinat)) >= 5:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        proc.send_signal(signal.SIGCONT)
    assert killed, "the annotator finished before it could be killed mid-batch"
    proc.communicate(timeout=30)
    before = {label["pair_id"] for label in exported_labels(kombinat)}
    after_kill = peek(jpath)
    assert after_kill["open_batches"] == 1 and after_kill["pending_labels"] >= 1
    assert 5 <= len(before) < 24

    code, events, err = finish(annotator(*run_args(kombinat, tiny_model_path, "--once", "--chunk-size", "5")))
    assert code == 0, err
    labels = exported_labels(kombinat)
    ids = [label["pair_id"] for label in labels]
    assert len(ids) == len(set(ids)) == 24  # nothing lost, nothing counted twice
    assert set(ids) == set(pair_ids)
    done = events[-1]
    assert done["accepted"] == 24 - len(before)
    assert done["batches"] == 1  # the interrupted batch was resumed, not re-claimed
    assert not any(e["event"] == "batch" and not e["resumed"] for e in events)
    assert peek(jpath)["open_batches"] == 0


@pytest.mark.subprocess
def test_kombinat_down_for_a_while_is_retried_then_completes(
    kombinat: KombinatServer, github: FakeGitHub, tiny_model_path: Path
) -> None:
    pair_ids = enqueue(kombinat, 15)
    creds = login_as(kombinat, github, "carol", 1003)
    jpath = journal_path(auth.data_dir(), kombinat.url, creds.contributor_id)
    proc = annotator(*run_args(kombinat, tiny_model_path, "--once", "--batch-size", "15", "--chunk-size", "5"))
    # Wait for the first chunk to land, then take kombinat down for a few seconds.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not exported_labels(kombinat):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    # Freeze the annotator while kombinat goes down, so its next request surely meets the outage.
    proc.send_signal(signal.SIGSTOP)
    port = int(kombinat.url.rsplit(":", 1)[1])
    stop_server(kombinat.process)
    down_since = time.time()
    proc.send_signal(signal.SIGCONT)
    # Stay down until the annotator holds a full chunk it cannot deliver, and a little longer.
    while time.monotonic() < deadline and peek(jpath)["pending_labels"] < 5:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(3)
    restarted, _ = start_server(kombinat.database_url, port=port)
    try:
        code, events, err = finish(proc)
        labels = exported_labels(kombinat)  # same URL: the restarted server
    finally:
        stop_server(restarted)
    assert code == 0, err
    retries = [e for e in events if e["event"] == "retry"]
    assert retries, "the outage was not noticed"
    assert all(e["time"] >= down_since - 1 for e in retries)
    assert events[-1]["event"] == "finish" and events[-1]["labeled"] == 15
    assert sorted(label["pair_id"] for label in labels) == sorted(pair_ids)


@pytest.mark.subprocess
def test_login_through_fake_github_whoami_and_logout(kombinat: KombinatServer, github: FakeGitHub) -> None:
    proc = annotator("login", "--server", kombinat.url, "--json")
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    assert first["event"] == "device_code" and first["verification_uri"].startswith(github.url)
    github.authorize(first["user_code"], "dora", 1004)
    code, events, err = finish(proc, timeout=60)
    assert code == 0, err
    assert events[-1]["event"] == "logged_in" and events[-1]["login"] == "dora"
    token_file = auth.token_path()
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    creds = auth.load(kombinat.url)
    assert creds is not None and creds.login == "dora"
    assert "POST /login/oauth/access_token" in github.requests  # the grant went through (fake) GitHub

    who = subprocess.run(
        [sys.executable, "-m", "annotator", "whoami", "--server", kombinat.url, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    me = json.loads(who.stdout)
    assert me["login"] == "dora" and me["labels_submitted"] == 0

    out = subprocess.run(
        [sys.executable, "-m", "annotator", "logout", "--server", kombinat.url, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["revoked_on_server"] is True
    assert auth.load(kombinat.url) is None
    assert httpx.get(f"{kombinat.url}/api/v1/me", headers=bearer(creds.token)).status_code == 401


@pytest.mark.subprocess
def test_doctor_reports_this_machine_and_the_choice(kombinat: KombinatServer) -> None:
    cpu_3b = {
        **TINY_ENTRY,
        "name": "qwen2.5-3b-q4km",
        "model_id": "Qwen/Qwen2.5-3B-Instruct-GGUF",
        "quantization": "Q4_K_M",
        "hub_repo": "Qwen/Qwen2.5-3B-Instruct-GGUF",
        "hub_file": "qwen2.5-3b-instruct-q4_k_m.gguf",
        "sha256": "ab" * 32,
        "min_memory_gb": 8,
    }
    gpu_7b = {**cpu_3b, "name": "qwen2.5-7b", "backend": "vllm", "model_id": "Qwen/Qwen2.5-7B-Instruct",
              "quantization": "bf16", "hub_repo": "Qwen/Qwen2.5-7B-Instruct", "hub_file": ""}  # fmt: skip
    admit_model(kombinat, cpu_3b)
    admit_model(kombinat, gpu_7b)
    out = subprocess.run(
        [sys.executable, "-m", "annotator", "doctor", "--server", kombinat.url, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    hw = report["hardware"]
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert hw["ram_total_gb"] == pytest.approx(int(meminfo["MemTotal"].split()[0]) / 1024**2, abs=0.1)
    assert hw["cpu_count"] == len(os.sched_getaffinity(0))
    assert hw["system"] == "Linux" and hw["apple_silicon"] is False
    if shutil.which("nvidia-smi") is None:
        assert hw["gpus"] == [] and hw["gpu_memory_gb"] == 0
    import importlib.util

    for backend, module in {"llama_cpp": "llama_cpp", "vllm": "vllm", "mlx": "mlx_lm"}.items():
        assert hw["backends_installed"][backend] == (importlib.util.find_spec(module) is not None)
    assert report["registry_error"] is None
    assert {e["name"] for e in report["registry"]} == {"smollm2-135m-q4_1", "qwen2.5-3b-q4km", "qwen2.5-7b"}
    choice = report["choice"]
    if hw["ram_total_gb"] >= 8 and not hw["gpus"]:
        assert choice["name"] == "qwen2.5-3b-q4km" and choice["backend"] == "llama_cpp"
        assert any("Qwen/Qwen2.5-3B-Instruct-GGUF" in r for r in choice["reasons"])
    assert report["logged_in_as"] is None

    human = subprocess.run(
        [sys.executable, "-m", "annotator", "doctor", "--server", kombinat.url],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "would use" in human and "llama_cpp" in human and "qwen2.5-3b-q4km" in human
    assert "embedkomb[gpu]" in human or hw["backends_installed"]["vllm"]  # install hints survive rich markup


@pytest.mark.subprocess
def test_doctor_without_a_server_still_reports_the_hardware(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "annotator", "doctor", "--server", "http://127.0.0.1:9", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(out.stdout)
    assert report["registry"] is None and "unavailable" in report["registry_error"]
    assert report["hardware"]["cpu_count"] >= 1


@pytest.mark.subprocess
def test_ctrl_c_finishes_the_pair_flushes_and_releases_the_rest(
    kombinat: KombinatServer, github: FakeGitHub, tiny_model_path: Path
) -> None:
    pair_ids = enqueue(kombinat, 20)
    creds = login_as(kombinat, github, "frank", 1006)
    jpath = journal_path(auth.data_dir(), kombinat.url, creds.contributor_id)
    proc = annotator(*run_args(kombinat, tiny_model_path, "--batch-size", "20", "--chunk-size", "50"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (jpath.exists() and peek(jpath)["pending_labels"] >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    code, events, err = finish(proc, timeout=120)
    assert code == 0, err
    done = events[-1]
    assert done["event"] == "finish" and done["reason"] == "stopped on request"
    labeled = done["labeled"]
    assert 2 <= labeled < 20 and done["accepted"] == labeled and done["released"] == 20 - labeled
    assert len(exported_labels(kombinat)) == labeled  # every finished label was sent before exiting
    queue = httpx.get(f"{kombinat.url}/api/v1/admin/queue", headers=bearer(kombinat.admin_token)).json()
    assert queue["leased"] == 0  # nothing is held any more
    assert peek(jpath)["open_batches"] == 0
    # The unlabeled rest is back in the queue at once: another volunteer can claim it now.
    labeled_ids = {label["pair_id"] for label in exported_labels(kombinat)}
    other = sign_in(kombinat, github, "grace", 1007)
    model = {k: TINY_ENTRY[k] for k in ("backend", "model_id", "quantization")}
    claim = httpx.post(f"{kombinat.url}/api/v1/batches/claim", headers=bearer(other),
                       json={"size": 20, "model": {**model, "annotator_version": "test"}})  # fmt: skip
    claim.raise_for_status()
    assert set(pair_ids) - labeled_ids <= {p["pair_id"] for p in claim.json()["pairs"]}
