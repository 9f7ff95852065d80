"""Small corpora cut from the real SciFact data, and the real all-MiniLM-L6-v2 encoder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkomb_pipeline.mining.embedding import DenseEncoder, default_base_model_path
from embedkomb_pipeline.sources.pairs import write_source_pairs
from tests.conftest import REPO_ROOT
from tests.support.postgres import create_database, drop_database


def scifact_rows(shared_data: Path, n: int, max_chars: int = 280) -> dict[str, list[str]]:
    """The first n SciFact (title, abstract) pairs, abstracts cut to their opening characters for speed."""
    rows: dict[str, list[str]] = {"query": [], "document": [], "dataset": []}
    with open(shared_data / "scifact" / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            obj = json.loads(line)
            rows["query"].append(obj["title"])
            rows["document"].append(obj["text"][:max_chars])
            rows["dataset"].append("scifact")
            if len(rows["query"]) == n:
                break
    return rows


@pytest.fixture(scope="session")
def encoder() -> DenseEncoder:
    return DenseEncoder(default_base_model_path(), name="sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def small_source(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source pairs of 240 real SciFact titles → abstract openings."""
    out = tmp_path_factory.mktemp("source") / "small.parquet"
    write_source_pairs([scifact_rows(shared_data, 240)], "small", out)
    return out


def write_hub_mirror(root: Path, split: str, rows: dict[str, list[str]], files: int = 2) -> Path:
    """A directory laid out like nomic-ai/nomic-embed-unsupervised-data: data/<split>-NNNNN-of-NNNNN.parquet."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    n = len(rows["query"])
    step = -(-n // files)
    for i in range(files):
        part = slice(i * step, min(n, (i + 1) * step))
        table = pa.table(
            {
                "query": rows["query"][part],
                "document": rows["document"][part],
                "dataset": rows["dataset"][part],
                "shard": [i] * len(rows["query"][part]),
            }
        )
        pq.write_table(table, data / f"{split}-{i:05d}-of-{files:05d}.parquet")
    return root


@pytest.fixture()
def postgres_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance configured by the project's own dagster.yaml, on a throwaway PostgreSQL database."""
    name = create_database("dagster_test")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}")
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        yield instance
    finally:
        instance.dispose()
        drop_database(name)
