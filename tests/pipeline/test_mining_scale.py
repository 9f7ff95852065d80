"""The index choice by corpus size, chunked vector input, and mining from precomputed vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache
from embedkomb_pipeline.mining.retrieval import (
    MiningConfig,
    MiningReport,
    choose_index,
    mine_split,
    mine_split_with_vectors,
)
from embedkomb_pipeline.sources.pairs import write_source_pairs

GIB = 1 << 30


def test_the_index_follows_the_corpus_size_and_the_memory_budget() -> None:
    config = MiningConfig()  # 8 GiB for the index's vectors
    assert choose_index(10_000, 384, config).kind == "flat"
    assert choose_index(1_000_000, 384, config).kind == "ivf_flat"  # 1.4 GiB of float32 lists
    ten_million = choose_index(10_000_000, 384, config)
    assert ten_million.kind == "ivf_sq8"  # float32 lists would take 14.4 GiB; 8-bit codes take 3.7
    assert ten_million.bytes_per_vector == 384 + 8
    assert choose_index(100_000_000, 384, config).kind == "ivf_pq"  # SQ8 would take 36.5 GiB
    assert choose_index(100_000_000, 384, config).bytes_per_vector == 48 + 8
    # k-means trains on at most max_train_rows vectors, >= 64 of them per list
    assert choose_index(10_000_000, 384, config).nlist == 262_144 // 64
    assert choose_index(100_000, 384, config).nlist == 1264  # 4·√N, as before
    assert choose_index(1_000_000, 384, MiningConfig(index_memory_budget_bytes=GIB)).kind == "ivf_sq8"
    assert choose_index(50_000, 384, MiningConfig(index_kind="ivf_pq")).kind == "ivf_pq"
    assert choose_index(50_000_000, 384, MiningConfig(index_kind="flat")).kind == "flat"


def test_bad_index_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="index_kind must be 'auto' or one of"):
        MiningConfig(index_kind="hnsw")
    with pytest.raises(ValueError, match="max_train_rows must be at least 39"):
        MiningConfig(max_train_rows=10)
    with pytest.raises(ValueError, match="max_queries must be at least 1"):
        MiningConfig(max_queries=0)
    with pytest.raises(ValueError, match="index_memory_budget_bytes must be positive"):
        MiningConfig(index_memory_budget_bytes=0)


def test_vectors_read_in_slices_give_the_same_shard(small_source: Path, encoder: DenseEncoder, tmp_path: Path) -> None:
    """A corpus larger than one vector slice is read back from the cache slice by slice: same index, same shard."""
    cache = EmbeddingCache(tmp_path / "cache", encoder.identity)
    config = MiningConfig(top_k=15, exact_search_below=100, nprobe=3)
    whole = mine_split(small_source, tmp_path / "whole.parquet", "small", "c000", encoder, cache, config)
    sliced_config = MiningConfig(top_k=15, exact_search_below=100, nprobe=3, vector_chunk_rows=70)
    cache = EmbeddingCache(tmp_path / "cache", encoder.identity)
    sliced = mine_split(small_source, tmp_path / "sliced.parquet", "small", "c000", encoder, cache, sliced_config)
    assert whole.index_type == sliced.index_type == "IndexIVFFlat"
    assert sliced.cache_misses == 0
    assert (tmp_path / "whole.parquet").read_bytes() == (tmp_path / "sliced.parquet").read_bytes()
    assert whole.index_bytes == 240 * (384 * 4 + 8) + whole.nlist * 384 * 4


class HeldVectors:
    """Precomputed document vectors; each query's vector is its own positive's plus a little noise."""

    def __init__(self, vectors: np.ndarray, query_vectors: np.ndarray) -> None:
        self.vectors, self.queries = vectors, query_vectors

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    def prepare_documents(self, corpus: object, report: MiningReport) -> None:
        pass

    def document_vectors(self, start: int, stop: int) -> np.ndarray:
        return self.vectors[start:stop]

    def query_vectors(self, corpus: object, stop: int) -> np.ndarray:
        return self.queries[:stop]


@pytest.mark.parametrize(("kind", "label"), [("ivf_sq8", "IndexIVFScalarQuantizer (SQ8)"), ("ivf_pq", "IndexIVFPQ")])
def test_compressed_indexes_mine_from_precomputed_vectors(kind: str, label: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 12_000  # PQ's 256 codes per subquantizer want thousands of training vectors
    rows = {"query": [f"query number {i} about topic {i % 97}" for i in range(n)],
            "document": [f"document {i} on subject {i % 89} and theme {i % 101}" for i in range(n)],
            "dataset": ["synthetic"] * n}  # fmt: skip
    source = tmp_path / "source.parquet"
    write_source_pairs([rows], "synthetic", source)
    pairs = pl.read_parquet(source)
    doc_order = pairs.select("doc_id").unique().sort("doc_id")["doc_id"].to_list()
    position = {doc: i for i, doc in enumerate(doc_order)}
    vectors = rng.standard_normal((n, 64), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    by_query = pairs.sort("query_id")
    positives = np.array([position[d] for d in by_query["doc_id"].to_list()])
    queries = vectors[positives] + 0.05 * rng.standard_normal((n, 64), dtype=np.float32)
    config = MiningConfig(top_k=10, index_kind=kind, pq_subquantizers=16, max_queries=500)
    report = mine_split_with_vectors(
        source, tmp_path / "shard.parquet", "synthetic", "c000", HeldVectors(vectors, queries), "held", "r0", config
    )
    assert report.index_type.startswith(label)
    assert report.queries_mined == 500 and report.queries == n
    shard = pl.read_parquet(tmp_path / "shard.parquet")
    assert shard["query_id"].n_unique() == 500 and shard.height == report.candidates == 500 * 10
    # the nearest neighbours survive compression: almost every query finds its own positive
    assert report.recall_at_k["dense"] > 0.9
    code = 64 if kind == "ivf_sq8" else 16
    assert report.index_bytes == n * (code + 8) + report.nlist * 64 * 4
