"""Qualification report for the offline labeling models: κ against a frontier reference (the admission figure)
and against humans, on held-out DL19 judged-pool queries.

    flock /tmp/embedkomb-bench.lock .venv/bin/python -m bench.qualification [--models smollm2-135m ...]

Runs embedkomb_pipeline.evaluation.qualification exactly as the `model_qualification` asset does (prompt version
chosen and calibration fitted on half the queries, figures on the other half), without publishing to kombinat.
Writes report.json / report.md to --out and prints the table. Scores are cached per model and prompt under
--out/scores, so a re-run with another --kappa-min or --reference is instant. The wider measurement (every
prompt, ensembles, quorums, speed) is `python -m bench.labeling`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embedkomb_pipeline.evaluation.qualification import (
    DEFAULT_MODELS_DIR,
    DEFAULT_REFERENCE,
    offline_candidates,
    parse_sources,
    qualification_pairs,
    qualify,
    report_markdown,
    write_report,
)
from embedkomb_pipeline.settings import default_data_dir

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=None, help="fetch_models names (default: all present)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--data", default=default_data_dir())
    parser.add_argument("--reference", default=DEFAULT_REFERENCE, help="gpt-4o, gpt-4, human or a labels/*.tsv file")
    parser.add_argument("--prompts", nargs="*", default=None, help="prompt versions to try (default: all)")
    parser.add_argument("--dl19-per-query", type=int, default=8)
    parser.add_argument("--sources", nargs="*", default=None, help="extra BEIR test sources dataset:test[:min_grade]")
    parser.add_argument("--pairs-per-source", type=int, default=40)
    parser.add_argument("--kappa-min", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "qualification")
    args = parser.parse_args()
    candidates = offline_candidates(args.models_dir, args.models)
    if not candidates:
        print(f"error: no offline model in {args.models_dir}: run `make models`", file=sys.stderr)
        return 1
    sources = parse_sources(args.sources)
    names = [f"msmarco-dl19-judged ({args.dl19_per_query} pairs per query, grade ≥ 2)"]
    names += [f"{s.dataset}/qrels/{s.qrels_split} (grade ≥ {s.min_relevant_grade})" for s in sources]
    gold = qualification_pairs(
        args.data,
        reference=args.reference,
        dl19_per_query=args.dl19_per_query,
        sources=sources,
        per_source=args.pairs_per_source,
        seed=args.seed,
    )
    reports = qualify(
        candidates,
        gold,
        args.out / "scores",
        reference=args.reference,
        prompt_versions=args.prompts,
        kappa_min=args.kappa_min,
        seed=args.seed,
        threads=args.threads,
    )
    extra = {"gold_pairs": len(gold), "published": False, "reference": args.reference}
    paths = write_report(reports, args.out, names, args.kappa_min, extra)
    print(report_markdown(reports, names, args.kappa_min))
    for r in reports:
        per_source = ", ".join(f"{s}: AUC {v['auc']:.3f} κ {v['kappa']:.3f}" for s, v in r.per_source.items())
        print(f"{r.name}: {per_source}")
    print(f"report: {paths['json']}, {paths['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
