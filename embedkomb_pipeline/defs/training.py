"""The checkpoint asset (one embedding model per cycle, trained on all verified pairs so far) and the sensor that
retrains once enough new pairs are verified.

Wiring only: embedkomb_pipeline.training.checkpoint does the work. No `from __future__ import annotations`
here: Dagster reads the context annotation at definition time.
"""

import json
import os
import time
import warnings
from dataclasses import asdict
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
from embedkomb_pipeline.training.checkpoint import MetadataEntry, verified_splits
from embedkomb_pipeline.training.launch import TrainingJob, launch_run_command, read_failure
from embedkomb_pipeline.training.presets import get_preset

# a cycle's checkpoint reads the verified_pairs of every split of that cycle (and of earlier cycles, from the lake)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)  # beta since Dagster 1.5; the documented way, as in partitions.py
    from_cycle = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="cycle")


class CheckpointConfig(dg.Config):
    """Training knobs. The model preset (training/presets.py) sets the base model, sequence length, batch, lr,
    temperature, Matryoshka dims and cache precision; a knob set here wins over the preset's. The default, `mini`,
    is the 2022 recipe on all-MiniLM-L6-v2: lr 1e-4, batch 64, exact softmax with coordinate ascent."""

    preset: str = "mini"  # "mini" (all-MiniLM-L6-v2, offline), "base" (bge-base-en-v1.5), "large" (bge-large-en-v1.5)
    model: str | None = None  # a Hub id or a local folder; None: the preset's (mini: dense_model.base_model_path)
    # processes: 1 trains inside the run's process; N > 1 starts `torchrun` with N data-parallel processes (one per
    # GPU with CUDA, gloo on CPU) through Dagster Pipes, and resumes an interrupted run from its last saved step
    nproc: int = 1
    save_every_steps: int | None = None  # resume state every K steps (besides each phase's end; nproc 1: only then)
    loss: str = "exact"  # "exact" or "infonce" (the baseline)
    towers: str = "shared"  # "shared" (mining uses one model) or "separate"
    phases: int = 2
    epochs_per_phase: float = 1.0
    max_steps_per_phase: int | None = None
    batch_size: int | None = None  # the global batch, all processes together; None: the preset's
    lr: float | None = None  # None: the preset's
    temperature: float | None = None  # None: the preset's
    chunk_size: int = 8192
    matryoshka_dims: list[int] | None = None  # None: the preset's; []: the full size alone
    label_smoothing: float = 0.0  # exact softmax only; the 2022 recipe uses 0.01
    hard_negatives_per_query: int = 1
    max_seq_length: int | None = None  # None: the preset's
    cache_precision: str | None = None  # "fp32" or "bf16" (CPU autocast for the frozen cache); None: the preset's
    splits: list[str] | None = None  # None: every split with a verified export up to this cycle
    max_queries: int | None = None
    mask_top_k: int | None = None  # mask unverified candidates ranked ≤ this; None: all of them
    track_objective: bool = True
    seed: int = 0


def _dagster_metadata(entries: dict[str, MetadataEntry]) -> dict[str, Any]:
    """training.checkpoint's (kind, value) pairs as Dagster metadata values."""
    make = {"path": dg.MetadataValue.path, "md": dg.MetadataValue.md, "json": dg.MetadataValue.json,
            "text": dg.MetadataValue.text}  # fmt: skip
    return {name: make[kind](value) if kind in make else value for name, (kind, value) in entries.items()}


def _train_checkpoint(
    context: dg.AssetExecutionContext,
    config: CheckpointConfig,
    lake: LakeResource,
    dense_model: DenseModelResource,
    checkpoint_publisher: CheckpointPublisherResource,
    training_pipes: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    cycle = context.partition_key
    preset = get_preset(config.preset)
    base_model = preset.resolve_model(config.model, mini_folder=dense_model.base_model_path)
    splits = config.splits if config.splits is not None else verified_splits(lake.export_dir, cycle)
    candidate_files = [
        p
        for split in splits
        for p in sorted(lake.candidates_path(split, cycle).parent.parent.glob("*/candidates.parquet"))
        if p.parent.name <= cycle  # cycle keys sort in order
    ]
    train_config = preset.configure(
        loss=config.loss,
        towers=config.towers,
        phases=config.phases,
        epochs_per_phase=config.epochs_per_phase,
        max_steps_per_phase=config.max_steps_per_phase,
        batch_size=config.batch_size,
        lr=config.lr,
        temperature=config.temperature,
        chunk_size=config.chunk_size,
        matryoshka_dims=config.matryoshka_dims,
        label_smoothing=config.label_smoothing,
        hard_negatives_per_query=config.hard_negatives_per_query,
        max_seq_length=config.max_seq_length,
        cache_precision=config.cache_precision,
        seed=config.seed,
    )
    job = TrainingJob(
        cycle=cycle,
        base_model=str(base_model),
        export_root=str(lake.export_dir),
        out_dir=str(lake.checkpoint_dir(cycle)),
        config=asdict(train_config),
        source_pairs={s: str(lake.source_pairs_path(s)) for s in splits},
        candidate_files=[str(p) for p in candidate_files],
        splits=splits,
        max_queries=config.max_queries,
        mask_top_k=config.mask_top_k,
        track_objective=config.track_objective,
        preset=preset.name,
        nproc=config.nproc,
        save_every_steps=config.save_every_steps,
        # in one process a resume state is kept only when asked for (it weighs a model and its Adam state)
        resume=config.nproc > 1 or config.save_every_steps is not None,
    )
    if config.nproc > 1:
        try:
            invocation = training_pipes.run(context=context, command=launch_run_command(job.write()))
        except Exception as error:  # Dagster's Pipes error type is not public: the failure file tells ours apart
            failure = read_failure(job)
            if failure is None:
                raise
            raise dg.Failure(
                description=failure.describe(),
                metadata={
                    "failed_rank": failure.rank,
                    "error": failure.error,
                    "log_path": dg.MetadataValue.path(failure.log_path or ""),
                    "log_tail": dg.MetadataValue.md(f"```\n{failure.log_tail}\n```"),
                },
            ) from error
        metadata: dict[str, Any] = dict(invocation.get_materialize_result().metadata or {})
    else:
        report = job.train(log=context.log.info)
        metadata = _dagster_metadata(report.metadata(base_model))
    published = checkpoint_publisher.publish(lake.checkpoint_dir(cycle), cycle)
    if published is not None:
        context.log.info(f"pushed to the Hub: {published.commit_url} (tag {published.tag})")
    metadata["hub_commit"] = dg.MetadataValue.url(published.commit_url) if published else "not published"
    return dg.MaterializeResult(metadata=metadata)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)  # resource_defs on an asset: beta in Dagster 1.13
    checkpoint = dg.asset(
        name="checkpoint",
        partitions_def=cycle_partitions,
        deps=[dg.AssetDep(verified_pairs, partition_mapping=from_cycle)],
        group_name="training",
        kinds={"pytorch", "sentence-transformers"},
        description=(
            "The embedding model trained on all verified pairs up to this cycle (exact softmax with coordinate ascent "
            "by default), in sentence-transformers format with its training config, metrics and loss curve."
        ),
        # Training with nproc > 1 runs in its own processes (torchrun) through Dagster Pipes. The client is bound here,
        # on the asset, so that every place that materializes `checkpoint` with its own resources keeps working; a
        # Kubernetes deployment swaps it for dagster-k8s' PipesK8sClient (docs/deploy.md, "Training on GPUs").
        resource_defs={"training_pipes": dg.PipesSubprocessClient()},
    )(_train_checkpoint)

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
