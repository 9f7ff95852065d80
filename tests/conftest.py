"""Suite-wide settings: the real data folder, and a private storage folder per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBEDKOMB_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")

# nothing in the suite may reach the Hub: the real loading code is exercised on local files
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a Hub-style split served by tests from a local mirror (LocalSourceData); set before the defs are imported
MIRROR_SPLIT = "scifact_mirror_title_abstract"
os.environ.setdefault("EMBEDKOMB_HUB_SPLITS", MIRROR_SPLIT)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "scifact" / "corpus.jsonl").exists():
        pytest.fail(f"the real BEIR data is missing at {SHARED_DATA}; set EMBEDKOMB_DATA_DIR")
    return SHARED_DATA


@pytest.fixture()
def hub_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs with HF_HUB_OFFLINE=1; tests that use it talk to a fake Hub on loopback instead."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
