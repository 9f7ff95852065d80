"""split × cycle partitions. Read parts with keys_by_dimension, never by splitting the key string."""

from __future__ import annotations

import warnings

import dagster as dg

from embedkomb_pipeline.settings import hub_splits
from embedkomb_pipeline.sources.pairs import SAMPLE_SPLITS

CYCLE_PARTITIONS_NAME = "cycle"

split_partitions = dg.StaticPartitionsDefinition(sorted(SAMPLE_SPLITS) + sorted(set(hub_splits()) - set(SAMPLE_SPLITS)))
cycle_partitions = dg.DynamicPartitionsDefinition(name=CYCLE_PARTITIONS_NAME)
split_cycle_partitions = dg.MultiPartitionsDefinition({"split": split_partitions, "cycle": cycle_partitions})

# a split × cycle asset reads the split-only asset of its own split
with warnings.catch_warnings():
    # beta since Dagster 1.5 and the documented way to map split × cycle onto split
    warnings.simplefilter("ignore", dg.BetaWarning)
    from_split = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="split")


def cycle_key(number: int) -> str:
    """c000, c001, …: zero-padded so that keys sort in cycle order."""
    if number < 0:
        raise ValueError(f"cycle numbers start at 0, got {number}")
    return f"c{number:03d}"


def cycle_number(key: str) -> int:
    if len(key) < 2 or key[0] != "c" or not key[1:].isdigit():
        raise ValueError(f"cycle keys look like c000, c001, …; got {key!r}")
    return int(key[1:])


def split_and_cycle(context: dg.AssetExecutionContext) -> tuple[str, str]:
    keys = context.partition_key.keys_by_dimension
    return keys["split"], keys["cycle"]
