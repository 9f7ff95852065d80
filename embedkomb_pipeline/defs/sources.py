"""source_pairs (per split): a split's known positives, normalized and keyed by text hash."""

import dagster as dg

from embedkomb_pipeline.defs.partitions import split_partitions
from embedkomb_pipeline.defs.resources import LakeResource, SourceDataResource
from embedkomb_pipeline.sources.pairs import write_source_pairs


@dg.asset(
    partitions_def=split_partitions,
    group_name="sources",
    kinds={"parquet", "huggingface"},
    description="The split's known (query, document) positives: normalized, de-duplicated, keyed by text hash.",
)
def source_pairs(
    context: dg.AssetExecutionContext, lake: LakeResource, source_data: SourceDataResource
) -> dg.MaterializeResult:
    split = context.partition_key
    path = lake.source_pairs_path(split)
    stats = write_source_pairs(source_data.iter_split(split), split, path)
    if stats.rows_written == 0:
        raise ValueError(f"split {split!r} produced no usable pairs ({stats.rows_read} read, all empty)")
    context.log.info(f"{split}: {stats.rows_written} pairs from {source_data.describe(split)}")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "origin": source_data.describe(split),
            "dagster/row_count": stats.rows_written,
            **stats.as_metadata(),
        }
    )


# one job per partitioning: Dagster runs a job over a single partitions definition
source_pairs_job = dg.define_asset_job(
    "source_pairs_job",
    selection=dg.AssetSelection.assets(source_pairs),
    partitions_def=split_partitions,
    description="Load and normalize a split's source pairs.",
)
