"""The model_qualification asset: which labeling models kombinat's registry admits.

Wiring only: embedkomb_pipeline.qualification does the work. No `from __future__ import annotations` here:
Dagster reads the context annotation at definition time.
"""

import dagster as dg
import polars as pl
from pydantic import Field

from embedkomb_pipeline.defs.resources import KombinatResource, LakeResource
from embedkomb_pipeline.qualification import (
    DEFAULT_MODELS_DIR,
    assert_disjoint,
    candidate_from_path,
    offline_candidates,
    parse_sources,
    qualification_gold,
    qualify,
    registry_entry,
    report_markdown,
    write_report,
)
from embedkomb_pipeline.settings import default_data_dir


class QualificationConfig(dg.Config):
    """Which models to qualify, on which gold set, and the admission bar.

    - models: offline model names of scripts/fetch_models.py (smollm2-135m, qwen2.5-coder-0.5b,
      qwen2.5-coder-1.5b); None: every one present in models_dir. model_paths: any other GGUF files.
    - sources: gold sources "dataset:test[:min_grade]"; None: SciFact test + MS MARCO DL19 test (grade ≥ 2).
    - pairs_per_source: gold pairs per source, half relevant (the 1.5B model labels ~0.4–1.6 pairs/s on 2 cores).
    - kappa_min: κ (at the calibrated threshold, on the held-out part) a model needs to be admitted; the
      mission's bar is 0.8, a demo may lower it, and the report says so.
    - publish: write every model's entry (admitted or not) to kombinat's registry.
    """

    models: list[str] | None = None
    model_paths: list[str] = Field(default_factory=list)
    models_dir: str = str(DEFAULT_MODELS_DIR)
    data_dir: str | None = None  # None: EMBEDKOMB_DATA_DIR or ../shared/data
    sources: list[str] | None = None
    pairs_per_source: int = 40
    calibration_fraction: float = 0.5
    kappa_min: float = 0.8
    publish: bool = True
    n_ctx: int = 2048
    threads: int | None = None
    seed: int = 0


@dg.asset(
    group_name="labeling",
    kinds={"llama-cpp"},
    check_specs=[
        dg.AssetCheckSpec("model_admitted", asset="model_qualification", description="at least one model admitted")
    ],
    description=(
        "Runs each candidate labeling model over human-judged gold pairs (test qrels, never honeypots), reports "
        "accuracy, AUC and Cohen's κ, and admits to kombinat's registry only the models with κ ≥ kappa_min."
    ),
)
def model_qualification(
    context: dg.AssetExecutionContext, config: QualificationConfig, lake: LakeResource, kombinat: KombinatResource
) -> dg.MaterializeResult:
    from pathlib import Path

    from annotator.models import VerifiedHashes

    hashes = VerifiedHashes(lake.root / "qualification" / "hashes.json")  # a GB-sized GGUF is hashed once
    candidates = offline_candidates(Path(config.models_dir), config.models, sha256_of=hashes.get)
    candidates += [candidate_from_path(p, sha256_of=hashes.get) for p in config.model_paths]
    if not candidates:
        raise dg.Failure(f"no candidate model: none of the offline models is in {config.models_dir} (make models)")
    sources = parse_sources(config.sources)
    source_names = [f"{s.dataset}/qrels/{s.qrels_split} (grade ≥ {s.min_relevant_grade})" for s in sources]
    data_dir = config.data_dir or default_data_dir()
    if data_dir is None:
        raise dg.Failure("no BEIR data folder: set EMBEDKOMB_DATA_DIR or the data_dir config")
    gold = qualification_gold(data_dir, sources, per_source=config.pairs_per_source, seed=config.seed)
    if lake.honeypots_path.exists():
        assert_disjoint(gold, pl.read_parquet(lake.honeypots_path, columns=["pair_id"])["pair_id"].to_list())
    reports = qualify(
        candidates,
        gold,
        lake.root / "qualification" / "scores",
        kappa_min=config.kappa_min,
        calibration_fraction=config.calibration_fraction,
        seed=config.seed,
        n_ctx=config.n_ctx,
        threads=config.threads,
        log=context.log.info,
    )
    entries = [registry_entry(c, r, source_names) for c, r in zip(candidates, reports, strict=True)]
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
        {"gold_pairs": len(gold), "published": config.publish},
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
