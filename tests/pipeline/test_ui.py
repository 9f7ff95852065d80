"""`make ui` serves the code location: the webserver loads workspace.yaml on the PostgreSQL instance."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.support.kombinat_server import free_port
from tests.support.postgres import create_database, drop_database

QUERY = "{ assetNodes { assetKey { path } groupName hasAssetChecks } }"


@pytest.mark.subprocess
def test_webserver_shows_every_asset_of_the_cycle(tmp_path: Path) -> None:
    name = create_database("dagster_ui_test")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_POSTGRES_URL": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml", "-p", str(port), "-h", "127.0.0.1"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        nodes = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": QUERY}, timeout=10).json()
                nodes = answer["data"]["assetNodes"]
                if nodes:
                    break
            except (httpx.HTTPError, KeyError, TypeError):
                pass
            time.sleep(1)
        assert nodes, (
            f"webserver did not serve the assets: {proc.stderr.read().decode()[-2000:] if proc.poll() else ''}"
        )
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        assert {"source_pairs", "mining_shard", "work_queue", "honeypots", "labeled_pairs", "verified_pairs"} <= set(
            by_key
        )
        assert by_key["labeled_pairs"]["hasAssetChecks"] and by_key["verified_pairs"]["hasAssetChecks"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        drop_database(name)
