"""document_embeddings and mining_shard (per split × cycle) with its check; source_pairs is in defs/sources.py.

document_embeddings fans a split's embedding out over parallel steps (mining/fanout.py): each step embeds one
shard of the texts into the shared embedding cache; mining_shard then finds them there and only indexes and
mines. Materializing mining_shard alone still works: it embeds whatever the cache lacks itself.
"""

from dataclasses import asdict
from typing import Any

import dagster as dg
import duckdb

from embedkomb_pipeline.defs.partitions import (
    cycle_key,
    cycle_number,
    from_split,
    split_and_cycle,
    split_cycle_partitions,
)
from embedkomb_pipeline.defs.resources import DenseModelResource, LakeResource
from embedkomb_pipeline.defs.sources import source_pairs
from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache
from embedkomb_pipeline.mining.fanout import embed_split_shard
from embedkomb_pipeline.mining.retrieval import MiningConfig, mine_split


def _split_and_cycle_of_run(context: dg.OpExecutionContext) -> tuple[str, str]:
    """split and cycle of the run an op of a graph-backed asset runs in (its key may arrive as a plain string)."""
    key = context.partition_key
    if not isinstance(key, dg.MultiPartitionKey):
        key = split_cycle_partitions.get_partition_key_from_str(key)
    keys = key.keys_by_dimension
    return keys["split"], keys["cycle"]


def _encoder_for(
    context: dg.OpExecutionContext, lake: LakeResource, dense_model: DenseModelResource, cycle: str
) -> DenseEncoder:
    number = cycle_number(cycle)
    encoder, why = dense_model.encoder_for_cycle(lake, cycle_key(number - 1) if number > 0 else None)
    context.log.info(f"dense model: {why}")
    return encoder


class EmbeddingFanOutConfig(dg.Config):
    shards: int = 4  # parallel steps; the run's executor decides how many run at once


@dg.op(out=dg.DynamicOut(tuple))
def plan_embedding_shards(context: dg.OpExecutionContext, config: EmbeddingFanOutConfig, lake: LakeResource) -> Any:
    split, _ = _split_and_cycle_of_run(context)
    if config.shards < 1:
        raise ValueError(f"shards must be at least 1, got {config.shards}")
    source = lake.source_pairs_path(split)
    if not source.exists():
        raise FileNotFoundError(f"source_pairs for split {split!r} is not materialized ({source} missing)")
    for index in range(config.shards):
        yield dg.DynamicOutput((index, config.shards), mapping_key=f"shard_{index}")


@dg.op
def embed_document_shard(
    context: dg.OpExecutionContext, shard: tuple, lake: LakeResource, dense_model: DenseModelResource
) -> dict[str, Any]:
    split, cycle = _split_and_cycle_of_run(context)
    index, count = shard
    encoder = _encoder_for(context, lake, dense_model, cycle)
    cache = EmbeddingCache(lake.embedding_cache_dir, encoder.identity)
    report = embed_split_shard(lake.source_pairs_path(split), index, count, encoder, cache)
    context.log.info(f"shard {index + 1}/{count}: {report.embedded} texts embedded, {report.cached} already cached")
    return {**asdict(report), "model": encoder.identity.cache_key}


@dg.op
def collect_embedding_shards(reports: list[dict[str, Any]]) -> dg.Output[dict[str, Any]]:
    summary = {
        "shards": len(reports),
        "texts": sum(r["texts"] for r in reports),
        "embedded": sum(r["embedded"] for r in reports),
        "cached": sum(r["cached"] for r in reports),
        "model": reports[0]["model"] if reports else "",
    }
    return dg.Output(
        summary,
        metadata={
            **summary,
            "seconds_per_shard": dg.MetadataValue.json(
                {str(r["shard_index"]): round(r["seconds"], 2) for r in reports}
            ),
        },
    )


@dg.graph_asset(
    partitions_def=split_cycle_partitions,
    group_name="mining",
    kinds={"parquet"},
    description=(
        "The split's documents and queries embedded into the shared embedding cache, in shards that parallel "
        "steps compute (config: shards); mining_shard then embeds nothing."
    ),
)
def document_embeddings() -> Any:
    reports = plan_embedding_shards().map(embed_document_shard)
    return collect_embedding_shards(reports.collect())


class MiningShardConfig(dg.Config):
    top_k: int = 5000
    rrf_k: int = 60
    nprobe: int = 16
    nlist: int | None = None
    exact_search_below: int = 20_000
    index_memory_budget_bytes: int = 8 << 30


@dg.asset(
    partitions_def=split_cycle_partitions,
    deps=[dg.AssetDep(source_pairs, partition_mapping=from_split), document_embeddings],
    group_name="mining",
    kinds={"parquet", "faiss"},
    description=(
        "Top-K candidates per query: BM25 + dense (base model at c000, previous checkpoint after) in FAISS, "
        "fused by RRF (k=60), known positives removed."
    ),
)
def mining_shard(
    context: dg.AssetExecutionContext,
    config: MiningShardConfig,
    lake: LakeResource,
    dense_model: DenseModelResource,
) -> dg.MaterializeResult:
    split, cycle = split_and_cycle(context)
    number = cycle_number(cycle)
    source = lake.source_pairs_path(split)
    if not source.exists():
        raise FileNotFoundError(f"source_pairs for split {split!r} is not materialized ({source} missing)")
    encoder, why = dense_model.encoder_for_cycle(lake, cycle_key(number - 1) if number > 0 else None)
    context.log.info(f"dense model: {why}")
    cache = EmbeddingCache(lake.embedding_cache_dir, encoder.identity)
    mining_config = MiningConfig(
        top_k=config.top_k,
        rrf_k=config.rrf_k,
        nprobe=config.nprobe,
        nlist=config.nlist,
        exact_search_below=config.exact_search_below,
        index_memory_budget_bytes=config.index_memory_budget_bytes,
    )
    out = lake.candidates_path(split, cycle)
    report = mine_split(source, out, split, cycle, encoder, cache, mining_config)
    if report.top_k_effective < report.top_k_requested:
        context.log.warning(f"top_k {report.top_k_requested} clamped to the corpus size {report.top_k_effective}")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dagster/row_count": report.candidates,
            "dense_model": encoder.identity.name,
            "dense_model_revision": encoder.identity.revision,
            "dense_model_choice": why,
            "documents": report.documents,
            "queries": report.queries,
            "known_positives": report.positives,
            "top_k": report.top_k_effective,
            "index": f"{report.index_type} nlist={report.nlist} nprobe={report.nprobe}",
            "index_bytes": report.index_bytes,
            "documents_over_model_window": report.documents_over_model_window,
            "recall_at_k_bm25": report.recall_at_k["bm25"],
            "recall_at_k_dense": report.recall_at_k["dense"],
            "recall_at_k_rrf": report.recall_at_k["rrf"],
            "embedding_cache_hits": report.cache_hits,
            "embedding_cache_misses": report.cache_misses,
            "seconds": dg.MetadataValue.json({k: round(v, 3) for k, v in report.seconds.items()}),
            "throughput": dg.MetadataValue.json({k: round(v, 1) for k, v in report.throughput().items()}),
            "peak_rss_mb": round(report.peak_rss_mb, 1),
        }
    )


@dg.asset_check(asset=mining_shard, description="No pair_id appears twice and no known positive is a candidate.")
def mining_shard_is_clean(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    # checks run unpartitioned: inspect every materialized shard
    shards = sorted(lake.root.glob("mining/*/*/candidates.parquet"))
    if not shards:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "no shard materialized yet"})
    duplicates = positives = 0
    for shard in shards:
        split = shard.parent.parent.name
        source = lake.source_pairs_path(split)
        con = duckdb.connect()
        dup_row = con.execute("SELECT count(*) - count(DISTINCT pair_id) FROM read_parquet(?)", [str(shard)]).fetchone()
        pos_row = con.execute(
            "SELECT count(*) FROM read_parquet(?) c JOIN read_parquet(?) s USING (query_id, doc_id)",
            [str(shard), str(source)],
        ).fetchone()
        assert dup_row is not None and pos_row is not None  # aggregates without GROUP BY always return one row
        duplicates += dup_row[0]
        positives += pos_row[0]
        con.close()
    return dg.AssetCheckResult(
        passed=duplicates == 0 and positives == 0,
        metadata={
            "shards": len(shards),
            "duplicate_pair_ids": duplicates,
            "known_positives_as_candidates": positives,
        },
    )


mining_job = dg.define_asset_job(
    "mining_job",
    selection=dg.AssetSelection.assets(mining_shard),
    partitions_def=split_cycle_partitions,
    description="Mine a split's candidates for one cycle (needs source_pairs of the split).",
)

embed_and_mine_job = dg.define_asset_job(
    "embed_and_mine_job",
    selection=dg.AssetSelection.assets(document_embeddings, mining_shard),
    partitions_def=split_cycle_partitions,
    description=(
        "Embed a split in parallel shards (document_embeddings, config shards), then index and mine it once "
        "(mining_shard). Run it with the multiprocess executor so the shards run side by side."
    ),
)
