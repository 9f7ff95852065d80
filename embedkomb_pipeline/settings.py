"""Where the pipeline reads and writes, from the environment (EMBEDKOMB_*), with defaults that work here."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

REPO_ROOT = Path(__file__).resolve().parents[1]

# Hub twins of the local BEIR folders: used when no local data folder is configured or present.
BEIR_HUB_IDS = {"scifact": "mteb/scifact", "nfcorpus": "mteb/nfcorpus", "arguana": "mteb/arguana"}


def default_data_dir() -> str | None:
    """EMBEDKOMB_DATA_DIR, else ../shared/data beside the checkout when it exists, else None (use the Hub)."""
    configured = os.environ.get("EMBEDKOMB_DATA_DIR")
    if configured:
        return configured
    beside = REPO_ROOT.parent / "shared" / "data"
    return str(beside) if beside.is_dir() else None


def default_storage_dir() -> str:
    """EMBEDKOMB_STORAGE_DIR, else the user's data directory (shards, snapshots, caches, checkpoints)."""
    return os.environ.get("EMBEDKOMB_STORAGE_DIR") or str(Path(platformdirs.user_data_dir("embedkomb")) / "lake")


def hub_splits() -> list[str]:
    """Domain splits of the Hub source to offer as partitions (comma-separated EMBEDKOMB_HUB_SPLITS)."""
    raw = os.environ.get("EMBEDKOMB_HUB_SPLITS", "")
    return [s.strip() for s in raw.split(",") if s.strip()]
