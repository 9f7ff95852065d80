"""The evaluation stage: mteb_scores (MTEB retrieval scores of each cycle's checkpoint and of its base model) and
model_qualification (which labeling models kombinat's registry admits).

Wiring only: embedkomb_pipeline.evaluation.harness and .qualification do the work. No `from __future__ import
annotations` here: Dagster reads the context annotation at definition time.
"""

from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from embedkomb_pipeline.defs.partitions import cycle_partitions
from embedkomb_pipeline.defs.resources import DenseModelResource, KombinatResource, LakeResource, QualityThresholds
from embedkomb_pipeline.defs.training import checkpoint
from embedkomb_pipeline.evaluation.harness import (
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
from embedkomb_pipeline.evaluation.qualification import (
    DEFAULT_MODELS_DIR,
    DEFAULT_REFERENCE,
    assert_disjoint,
    candidate_from_path,
    offline_candidates,
    parse_sources,
    qualification_pairs,
    qualified_registry_entry,
    qualify,
    report_markdown,
    write_report,
)
from embedkomb_pipeline.mining.embedding import default_base_model_path
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
    group_name="evaluation",
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
    base = evaluate_model(
        base_dir,
        tasks,
        results_dir,
        dense_model.base_model_name,
        precision=config.precision,
        batch_size=config.batch_size,
        log=context.log.info,
    )
    name = config.checkpoint_model_name.format(cycle=cycle)
    trained = evaluate_model(
        model_dir,
        tasks,
        results_dir,
        name,
        precision=config.precision,
        batch_size=config.batch_size,
        log=context.log.info,
    )
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


class QualificationConfig(dg.Config):
    """Which models to qualify, against which reference, on which judged pairs, and the admission bar.

    - models: offline model names of embedkomb_pipeline.offline_models (smollm2-135m, qwen2.5-coder-0.5b,
      qwen2.5-coder-1.5b); None: every one present in models_dir. model_paths: any other GGUF files.
    - reference: what a model must agree with — "gpt-4o" (default), "gpt-4", "human", or a labels/*.tsv file of
      0-3 grades for the DL19 judged pool; κ against humans is reported either way.
    - prompt_versions: the wordings to try (None: all the annotator knows); the best on the calibration queries
      is the one the registry entry names.
    - dl19_per_query / dl19_hard: pairs per DL19 query, of which the top mined (0: random only, no mining).
    - sources: extra human-judged BEIR test sources "dataset:test[:min_grade]", reported beside DL19.
    - kappa_min: κ against the reference a model needs to be admitted; the mission's bar is 0.8, a demo may lower
      it, and the report says so.
    - publish: write every model's entry (admitted or not, with its prompt version and calibration) to kombinat.
    """

    models: list[str] | None = None
    model_paths: list[str] = Field(default_factory=list)
    models_dir: str = str(DEFAULT_MODELS_DIR)
    data_dir: str | None = None  # None: EMBEDKOMB_DATA_DIR or ../shared/data
    reference: str = DEFAULT_REFERENCE
    prompt_versions: list[str] | None = None
    dl19_per_query: int = 8
    dl19_hard: int = 0
    dl19_max_queries: int | None = None  # a quick look (tests): the first N queries only, never for admission
    sources: list[str] | None = None
    pairs_per_source: int = 40
    kappa_min: float = 0.8
    publish: bool = True
    n_ctx: int = 2048
    max_document_tokens: int = 384
    resamples: int = 200
    threads: int | None = None
    seed: int = 0


@dg.asset(
    group_name="evaluation",
    kinds={"llama-cpp"},
    check_specs=[
        dg.AssetCheckSpec("model_admitted", asset="model_qualification", description="at least one model admitted")
    ],
    description=(
        "Runs each candidate labeling model with every prompt version over the DL19 judged pool (human and "
        "frontier-model labels), chooses its prompt and fits its calibration on half the queries, reports κ against "
        "the reference and humans on the other half, and admits to kombinat's registry only the models with "
        "κ ≥ kappa_min against the reference."
    ),
)
def model_qualification(
    context: dg.AssetExecutionContext, config: QualificationConfig, lake: LakeResource, kombinat: KombinatResource
) -> dg.MaterializeResult:
    from annotator.models import VerifiedHashes

    hashes = VerifiedHashes(lake.root / "qualification" / "hashes.json")  # a GB-sized GGUF is hashed once
    candidates = offline_candidates(Path(config.models_dir), config.models, sha256_of=hashes.get)
    candidates += [candidate_from_path(p, sha256_of=hashes.get) for p in config.model_paths]
    if not candidates:
        raise dg.Failure(f"no candidate model: none of the offline models is in {config.models_dir} (make models)")
    sources = parse_sources(config.sources)
    source_names = [f"msmarco-dl19-judged ({config.dl19_per_query or 'all'} pairs per query, grade ≥ 2)"]
    source_names += [f"{s.dataset}/qrels/{s.qrels_split} (grade ≥ {s.min_relevant_grade})" for s in sources]
    data_dir = config.data_dir or default_data_dir()
    if data_dir is None:
        raise dg.Failure("no BEIR data folder: set EMBEDKOMB_DATA_DIR or the data_dir config")
    gold = qualification_pairs(
        data_dir,
        reference=config.reference,
        dl19_per_query=config.dl19_per_query,
        dl19_hard=config.dl19_hard,
        sources=sources,
        per_source=config.pairs_per_source,
        seed=config.seed,
        cache_dir=lake.root / "qualification",
        dl19_max_queries=config.dl19_max_queries,
    )
    if lake.honeypots_path.exists():
        assert_disjoint(gold, pl.read_parquet(lake.honeypots_path, columns=["pair_id"])["pair_id"].to_list())
    reports = qualify(
        candidates,
        gold,
        lake.root / "qualification" / "scores",
        reference=config.reference,
        prompt_versions=config.prompt_versions,
        kappa_min=config.kappa_min,
        seed=config.seed,
        n_ctx=config.n_ctx,
        threads=config.threads,
        max_document_tokens=config.max_document_tokens,
        resamples=config.resamples,
        log=context.log.info,
    )
    entries = [qualified_registry_entry(c, r, source_names) for c, r in zip(candidates, reports, strict=True)]
    registry: list[dict] = []
    if config.publish:
        with kombinat.client() as client:
            client.upsert_models(entries)
            registry = client.models()
    paths = write_report(
        reports,
        lake.root / "qualification",
        source_names,
        config.kappa_min,
        {"gold_pairs": len(gold), "published": config.publish, "reference": config.reference},
    )
    admitted = [r.name for r in reports if r.admitted]
    if config.kappa_min < 0.8:
        context.log.warning(f"admission bar lowered to κ ≥ {config.kappa_min} (the mission's bar is 0.8)")
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.md(report_markdown(reports, source_names, config.kappa_min)),
            "admitted": admitted,
            "tried": [r.name for r in reports],
            "kappa_min": config.kappa_min,
            "reference": config.reference,
            "bar_lowered": config.kappa_min < 0.8,
            "gold_pairs": len(gold),
            "models": dg.MetadataValue.json([r.as_dict() for r in reports]),
            "registry": dg.MetadataValue.json(
                [{"name": e["name"], "admitted": e["admitted"]} for e in registry] if registry else []
            ),
            "report_path": dg.MetadataValue.path(str(paths["json"])),
            "report_markdown_path": dg.MetadataValue.path(str(paths["markdown"])),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="model_admitted",
                passed=bool(admitted),
                metadata={"admitted": admitted, "kappa_min": config.kappa_min},
                # volunteers cannot label without an admitted model, but rejecting every model is a valid outcome
                severity=dg.AssetCheckSeverity.WARN,
            )
        ],
    )
