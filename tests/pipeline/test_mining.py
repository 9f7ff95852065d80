from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from embedkomb_pipeline.ids import pair_id
from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache, default_base_model_path
from embedkomb_pipeline.mining.retrieval import MiningConfig, derive_nlist, mine_split, rrf_fuse


def test_rrf_matches_a_hand_computed_example() -> None:
    # BM25 ranks 7, 2, 9; dense ranks 9, 7, 4 (k = 60, ranks from 1)
    fused = rrf_fuse([[7, 2, 9], [9, 7, 4]], k=60)
    expected = {
        7: 1 / 61 + 1 / 62,  # 0.032522...
        9: 1 / 63 + 1 / 61,  # 0.032266...
        2: 1 / 62,
        4: 1 / 63,
    }
    assert [doc for doc, _ in fused] == [7, 9, 2, 4]
    for doc, score in fused:
        assert score == pytest.approx(expected[doc], abs=1e-15)
    assert fused[0][1] == pytest.approx(0.0325224749, abs=1e-9)


def test_rrf_ties_break_on_the_smaller_id() -> None:
    assert rrf_fuse([[5, 3], [3, 5]], k=60) == [(3, 1 / 61 + 1 / 62), (5, 1 / 61 + 1 / 62)]


@pytest.fixture(scope="module")
def mined(small_source: Path, encoder: DenseEncoder, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mined")
    cache = EmbeddingCache(root / "cache", encoder.identity)
    config = MiningConfig(top_k=20)
    first = mine_split(small_source, root / "a.parquet", "small", "c000", encoder, cache, config)
    second_cache = EmbeddingCache(root / "cache", encoder.identity)
    second = mine_split(small_source, root / "b.parquet", "small", "c000", encoder, second_cache, config)
    return {"root": root, "first": first, "second": second, "config": config}


def test_shard_has_the_documented_columns_and_k_per_query(mined: dict, small_source: Path) -> None:
    shard = pl.read_parquet(mined["root"] / "a.parquet")
    assert shard.columns == [
        "pair_id",
        "query_id",
        "doc_id",
        "split",
        "cycle",
        "bm25_rank",
        "dense_rank",
        "rrf_score",
        "rank",
    ]
    per_query = shard.group_by("query_id").len()
    assert per_query["len"].max() == 20
    assert mined["first"].candidates == shard.height
    assert shard["pair_id"].n_unique() == shard.height


def test_known_positives_never_appear_as_candidates(mined: dict, small_source: Path) -> None:
    shard = pl.read_parquet(mined["root"] / "a.parquet")
    source = pl.read_parquet(small_source)
    assert shard.join(source, on=["query_id", "doc_id"], how="inner").height == 0


def test_pair_ids_are_the_uuid5_of_query_text_doc_and_dataset(mined: dict, small_source: Path) -> None:
    shard = pl.read_parquet(mined["root"] / "a.parquet").head(200)
    queries = pl.read_parquet(small_source).select("query_id", "query", "source_dataset").unique("query_id")
    for row in shard.join(queries, on="query_id").iter_rows(named=True):
        assert row["pair_id"] == pair_id(row["query"], row["doc_id"], row["source_dataset"])


def test_scores_are_rrf_of_the_recorded_ranks_and_sorted(mined: dict) -> None:
    shard = pl.read_parquet(mined["root"] / "a.parquet")
    recomputed = (1.0 / (60 + shard["bm25_rank"].cast(pl.Float64))).fill_null(0.0) + (
        1.0 / (60 + shard["dense_rank"].cast(pl.Float64))
    ).fill_null(0.0)
    assert np.allclose(recomputed.to_numpy(), shard["rrf_score"].to_numpy(), rtol=0, atol=1e-12)
    for _, group in shard.group_by("query_id"):
        ordered = group.sort("rank")
        assert ordered["rank"].to_list() == list(range(1, ordered.height + 1))
        assert all(np.diff(ordered["rrf_score"].to_numpy()) <= 1e-15)
    # both retrievers contribute: fused lists mix lexical-only and dense-only candidates
    assert shard["bm25_rank"].null_count() > 0 and shard["dense_rank"].null_count() > 0


def test_remining_gives_an_identical_shard_from_the_cache(mined: dict) -> None:
    assert (mined["root"] / "a.parquet").read_bytes() == (mined["root"] / "b.parquet").read_bytes()
    first, second = mined["first"], mined["second"]
    assert first.cache_misses > 0
    assert second.cache_misses == 0
    assert second.cache_hits == first.cache_hits + first.cache_misses


def test_recall_is_reported_and_rrf_is_at_least_as_good_as_either(mined: dict) -> None:
    recall = mined["first"].recall_at_k
    assert set(recall) == {"bm25", "dense", "rrf"}
    assert all(0.0 <= value <= 1.0 for value in recall.values())
    # titles → their own abstracts: both retrievers find most positives in the top 20
    assert recall["rrf"] >= 0.8


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuinely different model: all-MiniLM-L6-v2 with its last layer's output weights perturbed."""
    from sentence_transformers import SentenceTransformer

    target = tmp_path_factory.mktemp("other-model") / "model"
    shutil.copytree(default_base_model_path(), target)
    model = SentenceTransformer(str(target), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer.5.output.dense.weight" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save(str(target))
    return target


def test_cache_is_missed_with_another_model(mined: dict, small_source: Path, other_model: Path) -> None:
    other = DenseEncoder(other_model, name="perturbed-minilm", precision="fp32")
    base_identity = mined["first"].model_revision
    assert other.identity.revision != base_identity
    cache = EmbeddingCache(mined["root"] / "cache", other.identity)
    report = mine_split(small_source, mined["root"] / "other.parquet", "small", "c001", other, cache, mined["config"])
    assert report.cache_hits == 0
    assert report.cache_misses == mined["first"].cache_hits + mined["first"].cache_misses
    assert report.model_name == "perturbed-minilm"


def test_a_cache_refuses_to_serve_a_different_model(mined: dict, encoder: DenseEncoder, other_model: Path) -> None:
    other = DenseEncoder(other_model, name="perturbed-minilm", precision="fp32")
    cache = EmbeddingCache(mined["root"] / "cache", encoder.identity)
    with pytest.raises(ValueError, match="cannot serve"):
        cache.embed(other, ["text"], ["hash"])


def test_k_larger_than_the_corpus_is_clamped(small_source: Path, encoder: DenseEncoder, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache", encoder.identity)
    report = mine_split(
        small_source, tmp_path / "s.parquet", "small", "c000", encoder, cache, MiningConfig(top_k=10_000)
    )
    assert report.top_k_requested == 10_000
    assert report.top_k_effective == report.documents == 240
    per_query = pl.read_parquet(tmp_path / "s.parquet").group_by("query_id").len()["len"]
    # every other document is a candidate once the query's own positive is removed
    assert per_query.max() <= report.documents - 1


def test_ivf_index_is_used_above_the_exact_threshold(small_source: Path, encoder: DenseEncoder, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache", encoder.identity)
    config = MiningConfig(top_k=10, exact_search_below=100, nprobe=4)
    report = mine_split(small_source, tmp_path / "ivf.parquet", "small", "c000", encoder, cache, config)
    assert report.index_type == "IndexIVFFlat"
    assert report.nlist == derive_nlist(240) == 6
    assert report.nprobe == 4
    assert report.recall_at_k["dense"] > 0.5


def test_long_documents_are_counted_as_over_the_model_window(
    shared_data: Path, encoder: DenseEncoder, tmp_path: Path
) -> None:
    from embedkomb_pipeline.sources.pairs import write_source_pairs
    from tests.pipeline.conftest import scifact_rows

    rows = scifact_rows(shared_data, 30, max_chars=20_000)
    source = tmp_path / "long.parquet"
    write_source_pairs([rows], "long", source)
    report = mine_split(
        source,
        tmp_path / "long-shard.parquet",
        "long",
        "c000",
        encoder,
        EmbeddingCache(tmp_path / "cache", encoder.identity),
        MiningConfig(top_k=5),
    )
    expected = encoder.count_over_window(pl.read_parquet(source).unique("doc_id")["document"].to_list())
    assert report.documents_over_model_window == expected > 0


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        MiningConfig(top_k=0)
    with pytest.raises(ValueError, match="nprobe"):
        MiningConfig(nprobe=0)


def test_an_empty_source_is_a_clear_error(tmp_path: Path, encoder: DenseEncoder, small_source: Path) -> None:
    empty = tmp_path / "empty.parquet"
    pl.read_parquet(small_source).head(0).write_parquet(empty)
    with pytest.raises(ValueError, match="holds no source pairs"):
        mine_split(empty, tmp_path / "x.parquet", "s", "c000", encoder, EmbeddingCache(tmp_path, encoder.identity))
