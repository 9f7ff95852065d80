"""The Dagster instance the demo and `make ui` use: dagster.yaml from the repository, state in PostgreSQL."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg

from embedkomb_pipeline.demo.services import ensure_database  # TCP and Unix-socket URLs (the embedded server)
from embedkomb_pipeline.settings import REPO_ROOT

DEFAULT_DAGSTER_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/embedkomb_dagster"


def project_instance() -> dg.DagsterInstance:
    """DAGSTER_HOME (default .dagster_home) with the project's dagster.yaml, on DAGSTER_POSTGRES_URL."""
    home = Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / ".dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ.setdefault("DAGSTER_POSTGRES_URL", DEFAULT_DAGSTER_POSTGRES_URL)
    ensure_database(os.environ["DAGSTER_POSTGRES_URL"])
    return dg.DagsterInstance.from_config(str(home))
