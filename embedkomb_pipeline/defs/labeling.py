"""The labeling loop: work_queue → (volunteers label in kombinat) → labeled_pairs → verified_pairs; honeypots.

The refill sensor advances it: it pushes the next chunk of a shard when kombinat's queue runs low. Retraining
once enough labels are verified is defs/training.py's retrain_sensor.
"""

import json
import os
from typing import cast

import dagster as dg
import duckdb
import polars as pl

from embedkomb_pipeline.defs.mining import mining_shard
from embedkomb_pipeline.defs.partitions import (
    from_split,
    split_and_cycle,
    split_cycle_partitions,
)
from embedkomb_pipeline.defs.resources import (
    DatasetPublisherResource,
    KombinatResource,
    LakeResource,
    QualityThresholds,
    SourceDataResource,
)
from embedkomb_pipeline.defs.sources import source_pairs
from embedkomb_pipeline.labeling.export import write_verified
from embedkomb_pipeline.labeling.queue_feed import feed_queue, read_offset
from embedkomb_pipeline.labeling.snapshots import (
    contributor_kappas,
    kappa_by_model_config,
    pairwise_kappa,
    per_model_stats,
    pull_labels,
)
from embedkomb_pipeline.settings import default_data_dir
from embedkomb_pipeline.sources.gold import HONEYPOT_SOURCES, build_gold_pairs


class WorkQueueConfig(dg.Config):
    depth_budget: int = 20_000  # at most this many of the partition's pairs wait in kombinat's queue
    chunk_size: int = 5_000


@dg.asset(
    partitions_def=split_cycle_partitions,
    deps=[mining_shard, dg.AssetDep(source_pairs, partition_mapping=from_split)],
    group_name="labeling",
    kinds={"postgres"},
    description="The shard's candidates pushed to kombinat, hardest first, up to a queue-depth budget per run.",
)
def work_queue(
    context: dg.AssetExecutionContext, config: WorkQueueConfig, lake: LakeResource, kombinat: KombinatResource
) -> dg.MaterializeResult:
    split, cycle = split_and_cycle(context)
    shard = lake.candidates_path(split, cycle)
    if not shard.exists():
        raise FileNotFoundError(f"mining_shard {split}/{cycle} is not materialized ({shard} missing)")
    with kombinat.client() as client:
        result = feed_queue(
            client,
            shard,
            lake.source_pairs_path(split),
            split,
            cycle,
            lake.queue_state_path(split, cycle),
            depth_budget=config.depth_budget,
            chunk_size=config.chunk_size,
        )
        depth = client.queue_counts(split=split, cycle=cycle)
    return dg.MaterializeResult(
        metadata={
            "enqueued": result.enqueued,
            "already_present": result.already_present,
            "pushed_through": result.offset_after,
            "remaining_in_shard": result.remaining,
            "shard_candidates": result.total_candidates,
            "queue_depth": depth["queued"],
            "queue": dg.MetadataValue.json(depth),
        }
    )


class HoneypotConfig(dg.Config):
    per_source: int = 200


@dg.asset(
    group_name="labeling",
    kinds={"postgres", "parquet"},
    description=(
        "Gold pairs from human judgments (SciFact train, NFCorpus dev qrels): judged-relevant pairs and the same "
        "queries with random unjudged documents, loaded into kombinat as honeypots."
    ),
)
def honeypots(
    context: dg.AssetExecutionContext,
    config: HoneypotConfig,
    lake: LakeResource,
    source_data: SourceDataResource,
    kombinat: KombinatResource,
) -> dg.MaterializeResult:
    data_dir = source_data.beir_data_dir or default_data_dir()
    if data_dir is None:
        raise FileNotFoundError("honeypots need the BEIR qrels: set EMBEDKOMB_DATA_DIR")
    gold = build_gold_pairs(data_dir, HONEYPOT_SOURCES, per_source=config.per_source)
    frame = pl.DataFrame(gold)
    lake.honeypots_path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(lake.honeypots_path)
    with kombinat.client() as client:
        answer = client.load_honeypots(gold)
    by_source = frame.group_by("source").agg(pl.len().alias("pairs"), pl.col("relevant").mean().alias("relevant"))
    context.log.info(f"honeypots: {answer['inserted']} new, {answer['already_present']} already loaded")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(lake.honeypots_path)),
            "honeypots": frame.height,
            "inserted": answer["inserted"],
            "already_present": answer["already_present"],
            "by_source": dg.MetadataValue.json(by_source.to_dicts()),
        }
    )


@dg.asset(
    partitions_def=split_cycle_partitions,
    deps=[work_queue],
    group_name="labeling",
    kinds={"parquet"},
    check_specs=[
        dg.AssetCheckSpec("annotator_agreement", asset="labeled_pairs", description="Cohen's κ between labelers"),
        dg.AssetCheckSpec("label_balance", asset="labeled_pairs", description="share judged relevant in bounds"),
        dg.AssetCheckSpec("honeypot_accuracy", asset="labeled_pairs", description="contributors' honeypot accuracy"),
    ],
    description="Incremental snapshot of every label kombinat received for the partition (cursor kept between runs).",
)
def labeled_pairs(
    context: dg.AssetExecutionContext, lake: LakeResource, kombinat: KombinatResource, quality: QualityThresholds
) -> dg.MaterializeResult:
    split, cycle = split_and_cycle(context)
    with kombinat.client() as client:
        snapshot = pull_labels(client, split, cycle, lake.labels_dir(split, cycle))
        contributors = client.contributors()
    labels = pl.read_parquet(snapshot.path)
    counted = labels.filter(~pl.col("quarantined"))
    kappa, n_doubled = pairwise_kappa(labels)
    by_config = kappa_by_model_config(labels)
    pairs_of_labelers = contributor_kappas(labels, min_overlap=quality.min_pairs_for_kappa)
    worst = pairs_of_labelers[0] if pairs_of_labelers else None
    # Series.mean is annotated for every dtype; a Boolean column's mean is a float (None only if all are null)
    relevant_rate = float(cast(float, counted["relevant"].mean())) if counted.height else None
    # honeypot answers of the contributors whose labels this partition holds
    labelers = set(labels["contributor_id"].to_list())
    answered = [
        (c["honeypots_answered"], c["honeypot_accuracy"] or 0.0)
        for c in contributors
        if c["contributor_id"] in labelers
    ]
    hp_total = sum(n for n, _ in answered)
    hp_accuracy = sum(n * acc for n, acc in answered) / hp_total if hp_total else None
    checks = [
        dg.AssetCheckResult(
            check_name="annotator_agreement",
            # every two labelers with enough shared pairs must agree beyond chance
            passed=worst is None or worst["kappa"] >= quality.kappa_floor,
            metadata={
                "kappa_first_two_labels": kappa,
                "pairs_with_two_labels": n_doubled,
                # one model twice agrees by construction; only different configurations are independent evidence
                "kappa_same_model_config": by_config["same_model_config"]["kappa"],
                "pairs_same_model_config": by_config["same_model_config"]["pairs"],
                "kappa_different_model_configs": by_config["different_model_configs"]["kappa"],
                "pairs_different_model_configs": by_config["different_model_configs"]["pairs"],
                "lowest_contributor_kappa": worst["kappa"] if worst else None,
                "contributor_pairs": dg.MetadataValue.json(pairs_of_labelers),
                "floor": quality.kappa_floor,
            },
            severity=dg.AssetCheckSeverity.ERROR,
        ),
        dg.AssetCheckResult(
            check_name="label_balance",
            passed=relevant_rate is None or quality.relevant_rate_min <= relevant_rate <= quality.relevant_rate_max,
            metadata={"relevant_rate": relevant_rate, "bounds": [quality.relevant_rate_min, quality.relevant_rate_max]},
            severity=dg.AssetCheckSeverity.ERROR,
        ),
        dg.AssetCheckResult(
            check_name="honeypot_accuracy",
            passed=hp_accuracy is None or hp_accuracy >= quality.honeypot_accuracy_floor,
            metadata={"accuracy": hp_accuracy, "honeypot_labels": hp_total, "floor": quality.honeypot_accuracy_floor},
            severity=dg.AssetCheckSeverity.ERROR,
        ),
    ]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(snapshot.path)),
            "new_labels": snapshot.new_labels,
            "dagster/row_count": snapshot.total_labels,
            "quarantined": labels.height - counted.height,
            "contributors": labels["contributor_id"].n_unique(),
            "cursor": snapshot.cursor or "",
            "per_model": dg.MetadataValue.json(per_model_stats(labels)),
        },
        check_results=checks,
    )


@dg.asset(
    partitions_def=split_cycle_partitions,
    deps=[labeled_pairs],
    group_name="labeling",
    kinds={"parquet", "huggingface"},
    check_specs=[dg.AssetCheckSpec("unique_pair_ids", asset="verified_pairs", description="no pair_id twice")],
    description="Pairs ≥ 2 contributors in good standing agree on, as a Hugging Face dataset (one config per split).",
)
def verified_pairs(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    kombinat: KombinatResource,
    publisher: DatasetPublisherResource,
) -> dg.MaterializeResult:
    split, cycle = split_and_cycle(context)
    with kombinat.client() as client:
        rows = list(client.verified(split=split, cycle=cycle))
    result = write_verified(rows, lake.export_dir, split, cycle)
    pushed = publisher.publish(lake.export_dir)
    con = duckdb.connect()
    row = con.execute(
        "SELECT count(*), count(DISTINCT pair_id) FROM read_parquet(?)",
        [str(lake.export_dir / "data" / "*" / "*.parquet")],
    ).fetchone()
    assert row is not None  # an aggregate without GROUP BY always returns one row
    total, distinct = row
    con.close()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(result.path)),
            "dataset": dg.MetadataValue.path(str(lake.export_dir)),
            "dagster/row_count": result.rows,
            "relevant": result.relevant,
            "mean_agreement": result.mean_agreement,
            "models": ", ".join(result.models),
            "pushed": pushed or "not configured",
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="unique_pair_ids",
                passed=total == distinct,
                metadata={"rows": total, "distinct_pair_ids": distinct},
                severity=dg.AssetCheckSeverity.ERROR,
            )
        ],
    )


work_queue_job = dg.define_asset_job(
    "work_queue_job",
    selection=dg.AssetSelection.assets(work_queue),
    partitions_def=split_cycle_partitions,
    description="Push the next chunk of a shard to kombinat.",
)
export_job = dg.define_asset_job(
    "export_job",
    selection=dg.AssetSelection.assets(labeled_pairs, verified_pairs),
    partitions_def=split_cycle_partitions,
    description="Snapshot labels and export verified pairs for one split × cycle.",
)


def materialized_shards(lake: LakeResource) -> list[tuple[str, str]]:
    return sorted((p.parent.parent.name, p.parent.name) for p in lake.root.glob("mining/*/*/candidates.parquet"))


@dg.sensor(job=work_queue_job, minimum_interval_seconds=60, description="Refill kombinat's queue when it runs low.")
def refill_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource, kombinat: KombinatResource
) -> dg.SensorResult:
    low_watermark = int(os.environ.get("EMBEDKOMB_QUEUE_LOW_WATERMARK", "1000"))
    requests = []
    queued: dict[str, int] = {}
    with kombinat.client() as client:
        for split, cycle in materialized_shards(lake):
            state = lake.queue_state_path(split, cycle)
            if not state.exists():
                continue  # never fed: the first push is a maintainer's decision, not the sensor's
            offset = read_offset(state)
            shard = str(lake.candidates_path(split, cycle))
            row = duckdb.connect().execute("SELECT count(*) FROM read_parquet(?)", [shard]).fetchone()
            assert row is not None  # an aggregate without GROUP BY always returns one row
            total = row[0]
            depth = int(client.queue_counts(split=split, cycle=cycle)["queued"])
            queued[f"{split}/{cycle}"] = depth
            if offset < total and depth < low_watermark:
                requests.append(
                    dg.RunRequest(
                        run_key=f"refill-{split}-{cycle}-{offset}",
                        partition_key=dg.MultiPartitionKey({"split": split, "cycle": cycle}),
                    )
                )
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(queued))
