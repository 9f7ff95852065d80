"""`make demo`: the cycle on the bundled sample, through Dagster, printing what it did.

At this stage of the project the cycle is source → mining; later stages are appended as they land.
Re-running is idempotent: the same partition is re-materialized to an identical shard, from the cache.
"""

from __future__ import annotations

import argparse
import time

import dagster as dg
import polars as pl
from rich.console import Console
from rich.table import Table

from embedkomb_pipeline.defs.mining import mining_shard, source_pairs
from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME
from embedkomb_pipeline.defs.resources import DenseModelResource, HubSourceData, LakeResource
from embedkomb_pipeline.instance import project_instance
from embedkomb_pipeline.sources import SAMPLE_SPLITS

console = Console()


def _metadata(result: dg.ExecuteInJobResult, node: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="scifact_title_abstract", choices=sorted(SAMPLE_SPLITS))
    parser.add_argument("--cycle", default="c000")
    parser.add_argument("--top-k", type=int, default=50, help="candidates kept per query (default 50)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    quiet_logs = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    instance = project_instance()
    lake = LakeResource()
    source_data = HubSourceData()
    resources = {"lake": lake, "source_data": source_data, "dense_model": DenseModelResource()}
    console.print(f"[bold]Embed Kombinat demo[/] — split [cyan]{args.split}[/], cycle [cyan]{args.cycle}[/]")
    console.print(
        f"  data: {source_data.describe(args.split)}\n  lake: {lake.root}\n  dagster: {instance.root_directory}"
    )

    with console.status("source_pairs: loading and normalizing the split"):
        result = dg.materialize(
            [source_pairs],
            partition_key=args.split,
            resources=resources,
            instance=instance,
            run_config=quiet_logs,
        )
    source_meta = _metadata(result, "source_pairs")
    console.print(
        f"[green]✓[/] source_pairs: {source_meta['rows_written']:,} pairs "
        f"({source_meta['unique_queries']:,} queries, {source_meta['unique_documents']:,} documents; "
        f"{source_meta['empty_dropped']} empty and {source_meta['duplicates_dropped']} duplicate rows dropped)"
    )

    instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, [args.cycle])
    key = dg.MultiPartitionKey({"split": args.split, "cycle": args.cycle})
    with console.status("mining_shard: BM25 + dense (all-MiniLM-L6-v2) + RRF; embedding is the slow part on CPU"):
        result = dg.materialize(
            [source_pairs, mining_shard],
            selection=[mining_shard],
            partition_key=key,
            resources=resources,
            instance=instance,
            run_config={**quiet_logs, "ops": {"mining_shard": {"config": {"top_k": args.top_k}}}},
        )
    meta = _metadata(result, "mining_shard")
    console.print(
        f"[green]✓[/] mining_shard: {meta['dagster/row_count']:,} candidates "
        f"(top {meta['top_k']} per query) with {meta['dense_model']} — {meta['dense_model_choice']}"
    )

    table = Table(title="mining", show_header=True)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in meta["seconds"].items():
        table.add_row(stage, f"{seconds:.2f}")
    console.print(table)
    console.print(
        f"recall@{meta['top_k']} of the known positive: BM25 {meta['recall_at_k_bm25']:.3f}, "
        f"dense {meta['recall_at_k_dense']:.3f}, RRF {meta['recall_at_k_rrf']:.3f}"
    )
    console.print(
        f"embedding cache: {meta['embedding_cache_hits']:,} hits, {meta['embedding_cache_misses']:,} misses; "
        f"peak memory {meta['peak_rss_mb']:.0f} MB"
    )

    shard = pl.read_parquet(meta["path"])
    pairs = pl.read_parquet(source_meta["path"])
    example = shard.filter(pl.col("query_id") == shard["query_id"][0]).head(3)
    query = pairs.filter(pl.col("query_id") == example["query_id"][0])["query"][0]
    console.print(f"\nexample query: [italic]{query}[/]")
    documents = pairs.select("doc_id", "document").unique("doc_id")
    for row in example.join(documents, on="doc_id").sort("rank").iter_rows(named=True):
        console.print(
            f"  #{row['rank']} (bm25 {row['bm25_rank']}, dense {row['dense_rank']}): {row['document'][:110]}…"
        )
    console.print(f"\nshard: {meta['path']}\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
