"""The mteb_scores asset: MTEB retrieval scores of each cycle's checkpoint and of its base model.

Wiring only: embedkomb_pipeline.evaluation does the work. No `from __future__ import annotations` here:
Dagster reads the context annotation at definition time.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from embedkomb_pipeline.defs.partitions import cycle_partitions
from embedkomb_pipeline.defs.resources import DenseModelResource, LakeResource, QualityThresholds
from embedkomb_pipeline.defs.training import checkpoint
from embedkomb_pipeline.embedding import default_base_model_path
from embedkomb_pipeline.evaluation import (
    METRICS,
    evaluate_model,
    load_trend,
    plot_trend,
    png_markdown,
    regression_check,
    resolve_tasks,
    save_cycle_scores,
    trend_markdown,
)
from embedkomb_pipeline.settings import default_data_dir


class MtebScoresConfig(dg.Config):
    """Which MTEB retrieval tasks to score, and how.

    - tasks: local BEIR folder names under the data folder (scifact, nfcorpus, …), MTEB task names (SciFact) or
      paths to BEIR folders. The demo runs `{"tasks": ["scifact"]}`.
    - source: "auto" (the real MTEB task from the Hub when reachable and uncapped, else the local folder),
      "local" or "hub".
    - max_corpus / max_queries: cap the corpus (keeping every judged document of the kept queries) for quick
      runs and tests; a capped task is renamed `<Task>-cap<N>` and is not comparable with published scores.
    - precision: "fp32" (as MTEB's published runs) or "bf16" (faster on CPUs with AVX512-BF16; filed as an mteb
      experiment).
    - regression_tolerance: allowed nDCG@10 drop against the previous cycle (None: the quality resource's).
    """

    tasks: list[str] = Field(default_factory=lambda: ["scifact", "nfcorpus"])
    source: str = "auto"
    data_dir: str | None = None  # None: EMBEDKOMB_DATA_DIR or ../shared/data
    max_corpus: int | None = None
    max_queries: int | None = None
    precision: str = "fp32"
    batch_size: int = 64
    checkpoint_model_name: str = "embedkomb/checkpoint-{cycle}"
    regression_tolerance: float | None = None


@dg.asset(
    partitions_def=cycle_partitions,
    deps=[checkpoint],
    group_name="training",
    kinds={"mteb", "sentence-transformers"},
    check_specs=[
        dg.AssetCheckSpec(
            "mteb_no_regression", asset="mteb_scores", description="nDCG@10 not below the previous cycle's"
        )
    ],
    description=(
        "MTEB retrieval scores (nDCG@10, recall@100, MRR@10 per task) of the cycle's checkpoint and of its base "
        "model, in mteb's results layout, with the trend across cycles."
    ),
)
def mteb_scores(
    context: dg.AssetExecutionContext,
    config: MtebScoresConfig,
    lake: LakeResource,
    dense_model: DenseModelResource,
    quality: QualityThresholds,
) -> dg.MaterializeResult:
    cycle = context.partition_key
    model_dir = lake.checkpoint_dir(cycle) / "model"
    if not (model_dir / "modules.json").exists():
        raise dg.Failure(f"no checkpoint for cycle {cycle} at {model_dir}: materialize checkpoint[{cycle}] first")
    tasks = resolve_tasks(
        config.tasks,
        config.data_dir or default_data_dir(),
        source=config.source,
        max_corpus=config.max_corpus,
        max_queries=config.max_queries,
    )
    for task in tasks:
        context.log.info(f"{task.name}: {task.source}; comparable={task.comparable}; {'; '.join(task.notes)}")
    results_dir = lake.root / "mteb"
    base_dir = Path(dense_model.base_model_path) if dense_model.base_model_path else default_base_model_path()
    run = {"precision": config.precision, "batch_size": config.batch_size, "log": context.log.info}
    base = evaluate_model(base_dir, tasks, results_dir, dense_model.base_model_name, **run)
    name = config.checkpoint_model_name.format(cycle=cycle)
    trained = evaluate_model(model_dir, tasks, results_dir, name, **run)
    scores_dir = lake.root / "mteb_scores"
    previous = load_trend(scores_dir, up_to_cycle=cycle)
    previous = [entry for entry in previous if entry["cycle"] < cycle]
    current = {
        "checkpoint": trained.as_dict(),
        "base": base.as_dict(),
        "tasks": [t.describe() for t in tasks],
        "config": {k: v for k, v in config.model_dump().items()},
    }
    path = save_cycle_scores(scores_dir, cycle, current)
    trend = load_trend(scores_dir, up_to_cycle=cycle)
    plot = plot_trend(trend, scores_dir / "trend.png")
    tolerance = config.regression_tolerance
    verdict = regression_check(
        {"cycle": cycle, **current},
        previous[-1] if previous else None,
        quality.mteb_regression_tolerance if tolerance is None else tolerance,
    )
    per_task = {
        f"{task}/{prefix}{metric}": dg.MetadataValue.float(scores[metric])
        for prefix, model in (("", trained), ("base/", base))
        for task, scores in model.tasks.items()
        for metric in METRICS
    }
    return dg.MaterializeResult(
        metadata={
            **per_task,
            "scores": dg.MetadataValue.md(trend_markdown(trend)),
            "trend": dg.MetadataValue.md(png_markdown(plot, "nDCG@10 across cycles")),
            "tasks": dg.MetadataValue.json([t.describe() for t in tasks]),
            "checkpoint_model": f"{name}@{trained.revision}",
            "base_model": f"{base.model_name}@{base.revision}",
            "base_from_cache": all(base.from_cache.values()),
            "precision": config.precision,
            "results_dir": dg.MetadataValue.path(str(results_dir)),
            "scores_path": dg.MetadataValue.path(str(path)),
            "cycles_in_trend": len(trend),
            "seconds": round(base.seconds + trained.seconds, 1),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="mteb_no_regression",
                passed=verdict.passed,
                metadata={
                    "previous_cycle": verdict.previous_cycle or "",
                    "tolerance": verdict.tolerance,
                    "drops": dg.MetadataValue.json(verdict.drops),
                    "note": verdict.note,
                },
                severity=dg.AssetCheckSeverity.ERROR,
            )
        ],
    )
