"""Run a real kombinat server (uvicorn subprocess on a free loopback port) for integration tests.

Usage::

    from tests.support.kombinat_server import running_kombinat, admit_model, sign_in
    from tests.support.fake_github import FakeGitHub

    with FakeGitHub() as gh, running_kombinat(github=gh) as server:
        admit_model(server)                        # registers and admits TEST_MODEL
        token = sign_in(server, gh, "alice", 1001)  # full device flow through kombinat
        httpx.post(f"{server.url}/api/v1/batches/claim", headers=bearer(token), json={...})

``running_kombinat()`` makes a fresh database (unless ``database_url`` is given), migrates it, starts
``kombinat serve`` (uvicorn) and yields a ``KombinatServer`` with ``url``, ``admin_token`` and
``database_url``. The process and the database are removed at exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.postgres import fresh_database

REPO_ROOT = Path(__file__).resolve().parents[2]

TEST_MODEL: dict[str, Any] = {
    "name": "test-llama-q4",
    "backend": "llama_cpp",
    "model_id": "test/Tiny-LLM",
    "quantization": "Q4_K_M",
    "tier": 0,
    "hub_repo": "test/tiny-llm-gguf",
    "hub_file": "tiny.Q4_K_M.gguf",
    "sha256": "0" * 64,
    "size_bytes": 1000,
    "min_memory_gb": 1.0,
    "admitted": True,
    "qualification": {"kappa": 0.9, "n": 200},
    "prompt_version": "p1",
    "calibration": None,
}


def model_info(entry: dict[str, Any] | None = None, annotator_version: str = "test-0.1") -> dict[str, str]:
    """The ``model`` object of claim and label bodies for a registry entry (its prompt version included)."""
    entry = entry or TEST_MODEL
    return {
        "backend": entry["backend"],
        "model_id": entry["model_id"],
        "quantization": entry["quantization"],
        "annotator_version": annotator_version,
        "prompt_version": entry.get("prompt_version", "p1"),
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class KombinatServer:
    url: str
    admin_token: str
    database_url: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""


def make_admin_token(database_url: str, name: str = "tests") -> str:
    from kombinat_api.auth import create_admin_token
    from kombinat_api.db import make_engine

    engine = make_engine(database_url, 1, 0)
    try:
        with engine.begin() as conn:
            return create_admin_token(conn, name)
    finally:
        engine.dispose()


def start_server(
    database_url: str,
    port: int | None = None,
    workers: int = 1,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    port = port or free_port()
    full_env = {**os.environ, "KOMBINAT_DATABASE_URL": database_url, **(env or {})}
    # The repository root must be importable even when the package is not installed in editable mode.
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the process
    # Exactly what an operator runs: `kombinat serve` (uvicorn underneath).
    cmd = [
        sys.executable, "-m", "kombinat_api.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, proc)
    return proc, url


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kombinat exited with code {proc.returncode} before answering on {url}")
        try:
            if httpx.get(f"{url}/api/v1/models", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"kombinat did not answer on {url} within {timeout} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def github_env(github: Any) -> dict[str, str]:
    """Settings that point kombinat at a ``FakeGitHub``."""
    return {
        "KOMBINAT_GITHUB_CLIENT_ID": github.client_id,
        "KOMBINAT_GITHUB_OAUTH_URL": github.url,
        "KOMBINAT_GITHUB_API_URL": github.url,
    }


@contextmanager
def running_kombinat(
    database_url: str | None = None,
    workers: int = 1,
    github: Any = None,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> Iterator[KombinatServer]:
    """A kombinat server on a free loopback port, with a fresh migrated database unless one is given."""
    with ExitStack() as stack:
        if database_url is None:
            database_url = stack.enter_context(fresh_database())
        full_env = {**(github_env(github) if github is not None else {}), **(env or {})}
        proc, url = start_server(database_url, workers=workers, env=full_env, log_path=log_path)
        stack.callback(stop_server, proc)
        yield KombinatServer(
            url=url,
            admin_token=make_admin_token(database_url),
            database_url=database_url,
            process=proc,
            log_path=log_path,
        )


def admit_model(server: KombinatServer, entry: dict[str, Any] | None = None) -> dict[str, Any]:
    entry = entry or TEST_MODEL
    resp = httpx.put(f"{server.url}/api/v1/admin/models", json={"models": [entry]}, headers=bearer(server.admin_token))
    resp.raise_for_status()
    return entry


def sign_in(server: KombinatServer, github: Any, login: str, user_id: int) -> str:
    """The whole device flow through kombinat against a FakeGitHub; returns kombinat's token."""
    start = httpx.post(f"{server.url}/api/v1/auth/device/start", json={})
    start.raise_for_status()
    github.authorize(start.json()["user_code"], login, user_id)
    poll = httpx.post(f"{server.url}/api/v1/auth/device/poll", json={"device_code": start.json()["device_code"]})
    poll.raise_for_status()
    return str(poll.json()["token"])
