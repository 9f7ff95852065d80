"""The code location loads, and its assets materialize for real on a PostgreSQL-backed Dagster instance."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from embedkomb_pipeline.defs.mining import mining_shard, mining_shard_is_clean
from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME, cycle_key, cycle_number
from embedkomb_pipeline.defs.resources import DenseModelResource, LakeResource, LocalSourceData
from embedkomb_pipeline.defs.sources import source_pairs
from tests.conftest import MIRROR_SPLIT
from tests.pipeline.conftest import scifact_rows, write_hub_mirror


def test_definitions_load_from_the_defs_folder() -> None:
    from embedkomb_pipeline.definitions import defs

    loaded = defs()
    keys = {key.to_user_string() for key in loaded.resolve_all_asset_keys()}
    assert {"source_pairs", "mining_shard"} <= keys
    assert {"lake", "source_data", "dense_model"} <= set(loaded.resources or {})
    assert loaded.resolve_job_def("mining_job").partitions_def is not None
    # split × cycle, cycles dynamic
    partitions = loaded.resolve_assets_def("mining_shard").partitions_def
    assert isinstance(partitions, dg.MultiPartitionsDefinition)
    assert {d.name for d in partitions.partitions_defs} == {"split", "cycle"}


def test_cycle_keys_round_trip_and_reject_garbage() -> None:
    assert cycle_key(0) == "c000" and cycle_key(12) == "c012"
    assert cycle_number("c007") == 7
    with pytest.raises(ValueError, match="cycle keys look like"):
        cycle_number("7")


def test_source_and_mining_materialize_on_postgres_and_rerun_identically(
    postgres_instance: dg.DagsterInstance, shared_data: Path, tmp_path: Path
) -> None:
    mirror = write_hub_mirror(tmp_path / "mirror", MIRROR_SPLIT, scifact_rows(shared_data, 150), files=2)
    lake = LakeResource(storage_dir=str(tmp_path / "lake"))
    resources = {
        "lake": lake,
        "source_data": LocalSourceData(mirror_dir=str(mirror), beir_data_dir=str(shared_data)),
        "dense_model": DenseModelResource(),
    }
    source_result = dg.materialize(
        [source_pairs], partition_key=MIRROR_SPLIT, resources=resources, instance=postgres_instance
    )
    assert source_result.success
    postgres_instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, ["c000"])
    key = dg.MultiPartitionKey({"split": MIRROR_SPLIT, "cycle": "c000"})
    run_config = {"ops": {"mining_shard": {"config": {"top_k": 25}}}}

    first = dg.materialize(
        [source_pairs, mining_shard, mining_shard_is_clean],
        selection=[mining_shard],
        partition_key=key,
        resources=resources,
        instance=postgres_instance,
        run_config=run_config,
    )
    assert first.success
    shard_path = lake.candidates_path(MIRROR_SPLIT, "c000")
    first_bytes = shard_path.read_bytes()
    meta = first.asset_materializations_for_node("mining_shard")[0].metadata
    assert meta["top_k"].value == 25
    assert meta["dense_model"].value == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["dense_model_choice"].value == "base model (cycle 0)"
    assert meta["embedding_cache_misses"].value > 0
    assert meta["recall_at_k_rrf"].value >= max(meta["recall_at_k_bm25"].value, meta["recall_at_k_dense"].value) - 0.02
    checks = first.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]

    second = dg.materialize(
        [source_pairs, mining_shard],
        selection=[mining_shard],
        partition_key=key,
        resources=resources,
        instance=postgres_instance,
        run_config=run_config,
    )
    assert second.success
    assert shard_path.read_bytes() == first_bytes
    meta2 = second.asset_materializations_for_node("mining_shard")[0].metadata
    assert meta2["embedding_cache_misses"].value == 0

    # the instance in PostgreSQL recorded both materializations of the partition
    records = postgres_instance.fetch_materializations(dg.AssetKey("mining_shard"), limit=10).records
    assert len(records) == 2
    assert pl.read_parquet(shard_path)["split"].unique().to_list() == [MIRROR_SPLIT]


def test_a_later_cycle_mines_with_the_previous_checkpoint(shared_data: Path, tmp_path: Path) -> None:
    lake = LakeResource(storage_dir=str(tmp_path / "lake"))
    model_dir = lake.checkpoint_dir("c000") / "model"
    shutil.copytree(DenseModelResource().base_encoder().path, model_dir)
    encoder, why = DenseModelResource().encoder_for_cycle(lake, "c000")
    assert encoder.identity.name == "checkpoint-c000"
    assert "checkpoint of cycle c000" in why
    _, fallback = DenseModelResource().encoder_for_cycle(lake, "c001")
    assert fallback.startswith("base model: no checkpoint for cycle c001")


def test_mining_without_source_pairs_names_the_missing_input(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, ["c000"])
    key = dg.MultiPartitionKey({"split": MIRROR_SPLIT, "cycle": "c000"})
    result = dg.materialize(
        [mining_shard],
        partition_key=key,
        resources={"lake": LakeResource(storage_dir=str(tmp_path)), "dense_model": DenseModelResource()},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    cause = error.cause or error
    assert cause.cls_name == "FileNotFoundError"
    assert "source_pairs for split" in cause.message and "is not materialized" in cause.message
