"""The checkpoint asset (one embedding model per cycle, trained on all verified pairs so far) and the sensor that
retrains once enough new pairs are verified.

Wiring only: embedkomb_pipeline.training.checkpoint does the work. No `from __future__ import annotations`
here: Dagster reads the context annotation at definition time.
"""

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from embedkomb_pipeline.defs.labeling import export_job, materialized_shards, verified_pairs
from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME, cycle_key, cycle_number, cycle_partitions
from embedkomb_pipeline.defs.resources import (
    CheckpointPublisherResource,
    DenseModelResource,
    KombinatResource,
    LakeResource,
)
from embedkomb_pipeline.mining.embedding import default_base_model_path
from embedkomb_pipeline.training.checkpoint import train_checkpoint, verified_splits
from embedkomb_pipeline.training.coordinate_ascent import TrainConfig

# a cycle's checkpoint reads the verified_pairs of every split of that cycle (and of earlier cycles, from the lake)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)  # beta since Dagster 1.5; the documented way, as in partitions.py
    from_cycle = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="cycle")


class CheckpointConfig(dg.Config):
    """Training knobs (defaults: the 2022 recipe, lr 1e-4, batch 64, exact softmax with coordinate ascent)."""

    loss: str = "exact"  # "exact" or "infonce" (the baseline)
    towers: str = "shared"  # "shared" (mining uses one model) or "separate"
    phases: int = 2
    epochs_per_phase: float = 1.0
    max_steps_per_phase: int | None = None
    batch_size: int = 64
    lr: float = 1e-4
    temperature: float = 0.05
    chunk_size: int = 8192
    matryoshka_dims: list[int] | None = None
    label_smoothing: float = 0.0  # exact softmax only; the 2022 recipe uses 0.01
    hard_negatives_per_query: int = 1
    max_seq_length: int = 256
    cache_precision: str = "fp32"  # "bf16": the frozen cache under CPU autocast (faster where AVX512-BF16 exists)
    splits: list[str] | None = None  # None: every split with a verified export up to this cycle
    max_queries: int | None = None
    mask_top_k: int | None = None  # mask unverified candidates ranked ≤ this; None: all of them
    track_objective: bool = True
    seed: int = 0


@dg.asset(
    partitions_def=cycle_partitions,
    deps=[dg.AssetDep(verified_pairs, partition_mapping=from_cycle)],
    group_name="training",
    kinds={"pytorch", "sentence-transformers"},
    description=(
        "The embedding model trained on all verified pairs up to this cycle (exact softmax with coordinate ascent "
        "by default), in sentence-transformers format with its training config, metrics and loss curve."
    ),
)
def checkpoint(
    context: dg.AssetExecutionContext,
    config: CheckpointConfig,
    lake: LakeResource,
    dense_model: DenseModelResource,
    checkpoint_publisher: CheckpointPublisherResource,
) -> dg.MaterializeResult:
    cycle = context.partition_key
    base_model = Path(dense_model.base_model_path) if dense_model.base_model_path else default_base_model_path()
    splits = config.splits if config.splits is not None else verified_splits(lake.export_dir, cycle)
    candidate_files = [
        p
        for split in splits
        for p in sorted(lake.candidates_path(split, cycle).parent.parent.glob("*/candidates.parquet"))
        if p.parent.name <= cycle  # cycle keys sort in order
    ]
    train_config = TrainConfig(
        loss=config.loss,  # type: ignore[arg-type]
        towers=config.towers,  # type: ignore[arg-type]
        phases=config.phases,
        epochs_per_phase=config.epochs_per_phase,
        max_steps_per_phase=config.max_steps_per_phase,
        batch_size=config.batch_size,
        lr=config.lr,
        temperature=config.temperature,
        chunk_size=config.chunk_size,
        matryoshka_dims=tuple(config.matryoshka_dims) if config.matryoshka_dims else None,
        label_smoothing=config.label_smoothing,
        hard_negatives_per_query=config.hard_negatives_per_query,
        max_seq_length=config.max_seq_length,
        cache_precision=config.cache_precision,  # type: ignore[arg-type]
        seed=config.seed,
    )
    report = train_checkpoint(
        cycle=cycle,
        base_model=base_model,
        export_root=lake.export_dir,
        source_pairs={s: lake.source_pairs_path(s) for s in splits},
        candidate_files=candidate_files,
        out_dir=lake.checkpoint_dir(cycle),
        config=train_config,
        splits=splits,
        max_queries=config.max_queries,
        mask_top_k=config.mask_top_k,
        track_objective=config.track_objective,
        log=context.log.info,
    )
    published = checkpoint_publisher.publish(report.out_dir, cycle)
    if published is not None:
        context.log.info(f"pushed to the Hub: {published.commit_url} (tag {published.tag})")
    metrics = report.result.metrics()
    objective = {k: metrics[k] for k in ("objective_before", "objective_after") if metrics[k] is not None}
    return dg.MaterializeResult(
        metadata={
            **objective,
            "model_path": dg.MetadataValue.path(str(report.model_dir)),
            "base_model": str(base_model),
            "device": report.result.device,
            "splits": report.splits,
            "training_set": dg.MetadataValue.json(report.data.counts),
            "steps": metrics["steps"],
            "examples_per_second": metrics["examples_per_second"],
            "final_step_loss": report.result.steps[-1]["loss"] if report.result.steps else None,
            "metrics": dg.MetadataValue.json(json.loads((report.out_dir / "metrics.json").read_text())),
            "loss_curve": dg.MetadataValue.md(report.loss_curve_markdown()),
            "loss_curve_path": dg.MetadataValue.path(str(report.paths["loss_curve"])),
            "seconds": round(report.seconds, 1),
            "hub_commit": dg.MetadataValue.url(published.commit_url) if published else "not published",
        }
    )


checkpoint_job = dg.define_asset_job(
    "checkpoint_job",
    selection=dg.AssetSelection.assets(checkpoint),
    partitions_def=cycle_partitions,
    description="Train one cycle's checkpoint on every verified export up to that cycle.",
)


def _exported_since(instance: dg.DagsterInstance, split: str, cycle: str, since: float) -> bool:
    partition = str(dg.MultiPartitionKey({"split": split, "cycle": cycle}))
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=verified_pairs.key, asset_partitions=[partition], after_timestamp=since),
        limit=1,
    ).records
    return bool(records)


@dg.sensor(
    jobs=[export_job, checkpoint_job],
    minimum_interval_seconds=300,
    description=(
        "Once enough new pairs are verified: export every split mined in the current cycle, then train that cycle's "
        "checkpoint on the fresh exports and open the next cycle, which mines with it."
    ),
)
def retrain_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource, kombinat: KombinatResource
) -> dg.SensorResult:
    """Two steps, kept in the cursor so a restart of the daemon neither loses nor repeats one:

    1. verified pairs grew by ≥ EMBEDKOMB_RETRAIN_THRESHOLD since the last retrain → request the export
       (labeled_pairs + verified_pairs) of every split mined in the current cycle;
    2. once each of those exports has materialized → request `checkpoint` for the cycle and add the next cycle.
    """
    state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {"verified_at_last_cycle": 0}
    exporting = state.get("exporting")
    if exporting:
        waiting = [s for s in exporting["splits"] if not _exported_since(context.instance, s, exporting["cycle"],
                                                                          exporting["requested_at"])]  # fmt: skip
        if waiting:
            return dg.SensorResult(
                skip_reason=f"waiting for the export of {exporting['cycle']}: {', '.join(waiting)}",
                cursor=context.cursor,
            )
        cycle = exporting["cycle"]
        following = cycle_key(cycle_number(cycle) + 1)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"retrain-checkpoint-{cycle}",
                    job_name=checkpoint_job.name,
                    partition_key=cycle,
                    tags={"embedkomb/trigger": "retrain", "embedkomb/next_cycle": following},
                )
            ],
            dynamic_partitions_requests=[cycle_partitions.build_add_request([following])],
            cursor=json.dumps({"verified_at_last_cycle": exporting["verified"], "trained": cycle, "opened": following}),
        )

    threshold = int(os.environ.get("EMBEDKOMB_RETRAIN_THRESHOLD", "10000"))
    with kombinat.client() as client:
        verified = int(client.queue_counts()["verified"])
    new = verified - state["verified_at_last_cycle"]
    if new < threshold:
        return dg.SensorResult(skip_reason=f"{new} newly verified pairs, threshold {threshold}", cursor=context.cursor)
    cycles = sorted(context.instance.get_dynamic_partitions(CYCLE_PARTITIONS_NAME), key=cycle_number)
    current = cycles[-1] if cycles else cycle_key(0)
    splits = sorted({split for split, cycle in materialized_shards(lake) if cycle == current})
    if not splits:
        return dg.SensorResult(skip_reason=f"no split was mined in cycle {current}", cursor=context.cursor)
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"retrain-export-{current}-{split}",
                job_name=export_job.name,
                partition_key=dg.MultiPartitionKey({"split": split, "cycle": current}),
                tags={"embedkomb/trigger": "retrain"},
            )
            for split in splits
        ],
        cursor=json.dumps(
            {
                **state,
                "exporting": {"cycle": current, "splits": splits, "requested_at": time.time(), "verified": verified},
            }
        ),
    )
