"""Embedding fanned out over shards: 2 shards give the same candidates as 1, and the Dagster wiring runs them."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache, default_base_model_path
from embedkomb_pipeline.mining.fanout import embed_split_shard, shard_bounds, split_texts
from embedkomb_pipeline.mining.retrieval import MiningConfig, mine_split

CONFIG = MiningConfig(top_k=20)


def test_shards_cover_every_text_exactly_once() -> None:
    for n, count in [(0, 1), (1, 2), (240, 2), (481, 7), (5, 8)]:
        bounds = [shard_bounds(n, i, count) for i in range(count)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_bad_shard_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match="shard_count must be at least 1"):
        shard_bounds(10, 0, 0)
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, 2\)"):
        shard_bounds(10, 2, 2)


@pytest.fixture(scope="module")
def fp32_encoder() -> DenseEncoder:
    return DenseEncoder(default_base_model_path(), name="sentence-transformers/all-MiniLM-L6-v2", precision="fp32")


def fan_out_and_mine(source: Path, encoder: DenseEncoder, root: Path, shards: int) -> tuple[pl.DataFrame, dict]:
    """Embed the split in ``shards`` shards at once (one writer thread each, one cache folder), then mine it."""

    def shard(index: int) -> tuple[int, int]:
        report = embed_split_shard(source, index, shards, encoder, EmbeddingCache(root / "cache", encoder.identity))
        return report.texts, report.embedded

    with ThreadPoolExecutor(max_workers=shards) as pool:
        parts = list(pool.map(shard, range(shards)))
    cache = EmbeddingCache(root / "cache", encoder.identity)
    report = mine_split(source, root / "shard.parquet", "small", "c000", encoder, cache, CONFIG)
    return pl.read_parquet(root / "shard.parquet"), {"parts": parts, "report": report}


def test_two_shards_give_the_same_candidates_as_one_in_fp32(
    small_source: Path, fp32_encoder: DenseEncoder, tmp_path: Path
) -> None:
    """fp32 vectors do not depend on the encode batch they were in, so the shards change nothing at all."""
    one, one_run = fan_out_and_mine(small_source, fp32_encoder, tmp_path / "one", 1)
    two, two_run = fan_out_and_mine(small_source, fp32_encoder, tmp_path / "two", 2)
    hashes, _, _ = split_texts(small_source)
    assert [texts for texts, _ in two_run["parts"]] == [len(hashes) // 2, len(hashes) - len(hashes) // 2]
    assert [embedded for _, embedded in two_run["parts"]] == [texts for texts, _ in two_run["parts"]]
    assert two_run["report"].cache_misses == 0 and two_run["report"].cache_hits == len(hashes)
    assert one.height == one_run["report"].candidates > 0
    assert one.equals(two)
    assert (tmp_path / "one" / "shard.parquet").read_bytes() == (tmp_path / "two" / "shard.parquet").read_bytes()


def test_two_shards_at_the_default_precision_change_only_rounding(
    small_source: Path, encoder: DenseEncoder, tmp_path: Path
) -> None:
    """At the default precision (bf16 on CPUs with AVX512-BF16) a vector depends slightly on which texts shared
    its encode batch, as it does between any two encode calls: near-ties in the dense ranking can swap. The shards
    still embed every text once, the miner embeds nothing, and the candidates are the same up to those swaps."""
    one, one_run = fan_out_and_mine(small_source, encoder, tmp_path / "one", 1)
    two, two_run = fan_out_and_mine(small_source, encoder, tmp_path / "two", 2)
    hashes, _, _ = split_texts(small_source)
    assert (
        sum(texts for texts, _ in two_run["parts"]) == sum(embedded for _, embedded in two_run["parts"]) == len(hashes)
    )
    assert one_run["report"].cache_misses == two_run["report"].cache_misses == 0
    vectors_one, _ = EmbeddingCache(tmp_path / "one" / "cache", encoder.identity).lookup(hashes, encoder.dimension)
    vectors_two, _ = EmbeddingCache(tmp_path / "two" / "cache", encoder.identity).lookup(hashes, encoder.dimension)
    # bf16 keeps 8 mantissa bits: a component moves by ~2^-9 at most
    assert np.abs(vectors_one - vectors_two).max() < (4e-3 if encoder.precision == "bf16" else 1e-6)
    keys = ["query_id", "doc_id"]
    shared = one.join(two, on=keys, how="inner")
    assert one.height == two.height
    assert shared.height / one.height >= 0.95, shared.height / one.height
    # the lexical side never sees a vector: its ranks agree exactly wherever both kept a pair
    assert (shared["bm25_rank"].fill_null(0) == shared["bm25_rank_right"].fill_null(0)).all()
    if encoder.precision == "fp32":
        assert one.equals(two)


def test_a_second_fan_out_embeds_nothing(small_source: Path, encoder: DenseEncoder, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache", encoder.identity)
    first = [embed_split_shard(small_source, i, 3, encoder, cache) for i in range(3)]
    again = [embed_split_shard(small_source, i, 3, encoder, EmbeddingCache(tmp_path / "cache", encoder.identity))
             for i in range(3)]  # fmt: skip
    assert sum(r.embedded for r in first) == sum(r.texts for r in first)
    assert sum(r.embedded for r in again) == 0 and sum(r.cached for r in again) == sum(r.texts for r in first)


def test_fan_out_then_mine_through_dagster(small_source: Path, tmp_path: Path) -> None:
    from embedkomb_pipeline.defs.mining import document_embeddings, mining_shard
    from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME
    from embedkomb_pipeline.defs.resources import DenseModelResource, LakeResource

    lake = LakeResource(storage_dir=str(tmp_path / "lake"))
    target = lake.source_pairs_path("scifact_title_abstract")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(small_source.read_bytes())
    key = dg.MultiPartitionKey({"split": "scifact_title_abstract", "cycle": "c000"})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, ["c000"])
    result = dg.materialize(
        [document_embeddings, mining_shard],
        partition_key=key,
        instance=instance,
        resources={"lake": lake, "dense_model": DenseModelResource(precision="fp32")},
        run_config={
            "ops": {
                "document_embeddings": {"ops": {"plan_embedding_shards": {"config": {"shards": 2}}}},
                "mining_shard": {"config": {"top_k": 10}},
            }
        },
    )
    assert result.success
    embedded = result.asset_materializations_for_node("document_embeddings")[0].metadata
    assert embedded["shards"].value == 2
    assert embedded["embedded"].value == embedded["texts"].value > 0
    mined = result.asset_materializations_for_node("mining_shard")[0].metadata
    assert mined["embedding_cache_misses"].value == 0
    assert mined["embedding_cache_hits"].value == embedded["texts"].value
