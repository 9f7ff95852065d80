"""Label quality: every offline model × prompt version against human assessors and frontier-model judges.

    flock /tmp/embedkomb-bench.lock .venv/bin/python -m bench.labeling            # everything (hours on 2 cores)
    .venv/bin/python -m bench.labeling --models smollm2-135m --prompts p1 g1 r1   # one model
    .venv/bin/python -m bench.labeling --report-only                             # figures from cached scores

Data (embedkomb_pipeline.evaluation.label_quality): a query-stratified sample of the TREC DL19 judged pool (per query
its --dl19-hard top-mined judged passages + random others, --dl19-per-query in all; human grades and the GPT-4o /
GPT-4 UMBRELA labels of the same pairs) and human-judged SciFact / NFCorpus test pairs (relevant vs random).
Thresholds and Platt calibration are fitted on half of each dataset's queries; every figure is on the other half,
with 95% bootstrap intervals over queries. Also: the best prompt per model (chosen on the calibration queries),
ensembles of two different models, what a quorum of two labels verifies (two copies of one model vs two models),
false negatives flagged among mined candidates, and labels/s against llama.cpp's own prompt processing.

Scores are cached under --cache per (model sha256, prompt version, document cap), written as they come: a run
that is stopped resumes. Results: --out/results.json and --out/results.md (small; committed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

from annotator.prompt import PROMPTS
from embedkomb_pipeline.evaluation.label_quality import (
    FRONTIER_REFERENCES,
    HUMAN,
    JudgedPair,
    LabelerReport,
    ScoreRun,
    assess_labeler,
    beir_human_pairs,
    dl19_pairs,
    ensemble_scores,
    fit_platt,
    llama_cpp_compute_limit,
    quorum_accuracy,
    score_cache_path,
    score_with_llama_cpp,
    split_by_query,
)
from embedkomb_pipeline.evaluation.qualification import offline_candidates
from embedkomb_pipeline.offline_models import MODELS, MODELS_DIR
from embedkomb_pipeline.settings import default_data_dir

REPO = Path(__file__).resolve().parents[1]
# Cheapest first, so that a stopped run has the most labelers finished.
DEFAULT_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
DATASETS = ("dl19", "scifact", "nfcorpus")
# The two halves of the DL19 sample, reported apart as well: the mined candidates (what labelers meet in
# production) and the random rest of each query's judged pool (comparable with a plain stratified sample).
DL19_VIEWS = {"dl19/mined": True, "dl19/random": False}


def dl19_views(pairs: list[JudgedPair], calibration: set[tuple[str, str]]) -> tuple[list[JudgedPair], set]:
    """The DL19 pairs again under the view names, with the same query split."""
    from dataclasses import replace

    viewed = [
        replace(p, dataset=name)
        for name, mined in DL19_VIEWS.items()
        for p in pairs
        if p.dataset == "dl19" and (p.mined_rank is not None) == mined
    ]
    viewed_calibration = {(name, q) for name in DL19_VIEWS for d, q in calibration if d == "dl19"}
    return viewed, viewed_calibration


def build_pairs(args: argparse.Namespace) -> list[JudgedPair]:
    pairs = dl19_pairs(
        args.data, per_query=args.dl19_per_query, hard=args.dl19_hard, seed=args.seed, cache_dir=args.cache
    )
    if args.beir_pairs:
        pairs += beir_human_pairs(args.data, "scifact", args.beir_pairs, min_grade=1, seed=args.seed)
        pairs += beir_human_pairs(args.data, "nfcorpus", args.beir_pairs, min_grade=2, seed=args.seed)
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--prompts", nargs="*", default=list(PROMPTS), help=f"of {', '.join(PROMPTS)}")
    parser.add_argument("--data", default=default_data_dir())
    parser.add_argument("--dl19-per-query", type=int, default=24, help="pairs per DL19 query (0: the whole pool)")
    parser.add_argument("--dl19-hard", type=int, default=12, help="of which the top mined judged passages")
    parser.add_argument("--beir-pairs", type=int, default=40, help="SciFact and NFCorpus test pairs each (0: none)")
    parser.add_argument(
        "--max-document-tokens", type=int, default=384, help="documents cut to this many tokens, as the annotator does"
    )
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the annotator's)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over queries")
    parser.add_argument("--limit-pairs", type=int, default=48, help="pairs for the compute-limit measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="score nothing: report what the cache holds")
    parser.add_argument("--cache", type=Path, default=REPO / ".bench" / "labeling")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "labeling")
    args = parser.parse_args()
    unknown = [p for p in args.prompts if p not in PROMPTS]
    if unknown:
        print(f"error: unknown prompt version(s) {unknown}; known: {', '.join(PROMPTS)}", file=sys.stderr)
        return 2
    candidates = offline_candidates(MODELS_DIR, args.models)
    pairs = build_pairs(args)
    calibration_queries, _ = split_by_query(pairs, seed=args.seed)
    print(f"{len(pairs)} judged pairs: " + ", ".join(f"{d} {sum(p.dataset == d for p in pairs)}" for d in DATASETS))

    runs: dict[str, ScoreRun] = {}
    by_model: dict[str, list[str]] = {}
    for candidate in candidates:
        for prompt in args.prompts:
            labeler = f"{candidate.name}/{prompt}"
            cache = score_cache_path(args.cache / "scores", candidate.sha256, prompt, args.max_document_tokens)
            if args.report_only and not cache.exists():
                continue
            if args.report_only:
                run = _cached_run(cache, labeler, pairs)
            else:
                run = score_with_llama_cpp(
                    candidate.path,
                    candidate.sha256,
                    labeler,
                    prompt,
                    pairs,
                    args.cache / "scores",
                    threads=args.threads,
                    max_document_tokens=args.max_document_tokens,
                )
            if run.scores:
                runs[labeler] = run
                by_model.setdefault(candidate.name, []).append(labeler)

    reports: list[LabelerReport] = []
    viewed, viewed_calibration = dl19_views(pairs, calibration_queries)
    for labeler, run in runs.items():
        scores = {pid: s.score for pid, s in run.scores.items()}
        for dataset in (*DATASETS, *DL19_VIEWS):
            source, cal = (viewed, viewed_calibration) if dataset in DL19_VIEWS else (pairs, calibration_queries)
            if any(p.dataset == dataset and p.pair_id in scores for p in source):
                report = assess_labeler(labeler, dataset, source, scores, cal, args.resamples, args.seed)
                report.speed = {
                    "pairs_per_second": _round(run.pairs_per_second, 3),
                    "prompt_tokens_per_second": _round(run.prompt_tokens_per_second, 1),
                    "evaluated_tokens_per_second": _round(run.evaluated_tokens_per_second, 1),
                }
                reports.append(report)

    best = best_prompts(runs, by_model, pairs, calibration_queries)
    ensembles = []
    for a, b in combinations(sorted(best.values()), 2):
        name = f"{a} + {b}"
        scores = ensemble_scores([runs[a], runs[b]], pairs, calibration_queries)
        for dataset in DATASETS:
            if any(p.dataset == dataset and p.pair_id in scores for p in pairs):
                ensembles.append(
                    assess_labeler(name, dataset, pairs, scores, calibration_queries, args.resamples, args.seed)
                )
    quorum = quorum_table(runs, best, pairs, calibration_queries)

    # Limits measured by earlier runs (say, one model per run) stay unless this run measures them again.
    previous = args.out / "results.json"
    limits: dict[str, Any] = json.loads(previous.read_text()).get("compute_limit", {}) if previous.exists() else {}
    if not args.report_only:
        dl19_eval = [p for p in pairs if p.dataset == "dl19"][: args.limit_pairs]
        for candidate in candidates:
            labeler = best.get(candidate.name)
            if labeler:
                prompt = labeler.split("/")[1]
                print(f"{labeler}: measuring labels/s against llama.cpp's own prompt processing")
                limits[labeler] = llama_cpp_compute_limit(
                    candidate.path, prompt, dl19_eval, threads=args.threads,
                    max_document_tokens=args.max_document_tokens,
                )  # fmt: skip

    results = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.labeling " + " ".join(sys.argv[1:]),
        "pairs": {d: sum(p.dataset == d for p in pairs) for d in DATASETS},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "prompts": {v: PROMPTS[v].summary for v in args.prompts},
        "best_prompt": best,
        "labelers": [r.as_dict() for r in reports],
        "ensembles": [r.as_dict() for r in ensembles],
        "quorum": quorum,
        "compute_limit": limits,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = render(results)
    (args.out / "results.md").write_text(markdown + "\n")
    print(markdown)
    print(f"results: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 0


def _cached_run(cache: Path, labeler: str, pairs: list[JudgedPair]) -> ScoreRun:
    from embedkomb_pipeline.evaluation.label_quality import PairScore

    data = json.loads(cache.read_text())
    return ScoreRun(labeler, {p.pair_id: PairScore(**data[p.pair_id]) for p in pairs if p.pair_id in data})


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def best_prompts(
    runs: dict[str, ScoreRun], by_model: dict[str, list[str]], pairs: list[JudgedPair], calibration: set
) -> dict[str, str]:
    """Per model, the prompt with the best DL19 AUC vs humans on the *calibration* queries (never the reported
    half, so choosing does not flatter the figures)."""
    from embedkomb_pipeline.labeling.agreement import auc

    best: dict[str, str] = {}
    cal = [p for p in pairs if p.dataset == "dl19" and (p.dataset, p.query_id) in calibration]
    for model, labelers in by_model.items():
        scored = []
        for labeler in labelers:
            rows = [p for p in cal if p.pair_id in runs[labeler].scores]
            if not rows:
                continue
            s = runs[labeler].scores
            value = auc(
                [s[p.pair_id].score for p in rows if p.human], [s[p.pair_id].score for p in rows if not p.human]
            )
            scored.append((value, labeler))
        if scored:
            best[model] = max(scored)[1]
    return best


def quorum_table(
    runs: dict[str, ScoreRun], best: dict[str, str], pairs: list[JudgedPair], calibration: set
) -> list[dict[str, Any]]:
    """Quorums of two labels on DL19 evaluation queries, each labeler at its calibrated (vs humans) threshold."""
    dl19 = [p for p in pairs if p.dataset == "dl19"]
    cal = [p for p in dl19 if (p.dataset, p.query_id) in calibration]
    ev = [p for p in dl19 if (p.dataset, p.query_id) not in calibration]
    verdicts: dict[str, dict[str, bool]] = {}
    for labeler in best.values():
        s = runs[labeler].scores
        rows = [p for p in cal if p.pair_id in s]
        if not rows or all(p.human for p in rows) or not any(p.human for p in rows):
            continue
        platt = fit_platt([s[p.pair_id].score for p in rows], [p.human for p in rows])
        from embedkomb_pipeline.labeling.agreement import best_threshold

        _, cut = best_threshold(platt.apply([s[p.pair_id].score for p in rows]).tolist(), [p.human for p in rows])
        verdicts[labeler] = {p.pair_id: bool(platt.apply([s[p.pair_id].score])[0] >= cut) for p in ev if p.pair_id in s}
    return quorum_accuracy(verdicts, ev, [HUMAN, *FRONTIER_REFERENCES])


def _ci(values: list[float] | None) -> str:
    if not values or values[0] is None or (isinstance(values[0], float) and math.isnan(values[0])):
        return "–"
    value, low, high = values
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def render(results: dict[str, Any]) -> str:
    lines = [
        f"Label quality ({results['generated_at']}; `{results['command']}`)",
        "",
        "Pairs: "
        + ", ".join(f"{k} {v}" for k, v in results["pairs"].items())
        + ". Figures on the evaluation half of the queries (threshold and calibration fitted on the other half); "
        "[95% bootstrap interval over queries].",
        "",
        "| labeler | data | eval pairs | AUC vs human | κ vs human | κ vs GPT-4o | κ vs GPT-4 | ECE raw → calibrated "
        "| FN flagged @keep 90% / 95% | pairs/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["labelers"] + results["ensembles"]:
        fn = r.get("false_negatives") or {}
        fn_text = (
            f"{fn['flagged_at_keep_90']:.2f} / {fn['flagged_at_keep_95']:.2f}" if "flagged_at_keep_90" in fn else "–"
        )
        speed = (r.get("speed") or {}).get("pairs_per_second")
        lines.append(
            f"| {r['labeler']} | {r['dataset']} | {r['pairs_evaluation']} | {_ci(r['auc_human'])} "
            f"| {_ci(r['kappa'].get(HUMAN))} | {_ci(r['kappa'].get('gpt-4o'))} | {_ci(r['kappa'].get('gpt-4'))} "
            f"| {r['ece_raw'][0]:.3f} → {r['ece_calibrated'][0]:.3f} | {fn_text} | {speed if speed else '–'} |"
        )
    for dataset in ("dl19", *DL19_VIEWS):
        first = next((r for r in results["labelers"] if r["dataset"] == dataset), None)
        if first is None:
            continue
        anchors = ", ".join(f"{k} vs human κ {_ci(v)}" for k, v in first["reference_kappa_vs_human"].items())
        line = f"Anchors on the same {dataset} evaluation pairs: {anchors}"
        fn_ref = first.get("false_negatives") or {}
        if "gpt-4o_flagged" in fn_ref:
            line += (
                f"; on the mined candidates GPT-4o flags {fn_ref['gpt-4o_flagged']:.2f} of the relevant and keeps "
                f"{fn_ref['gpt-4o_keeps']:.2f} of the non-relevant"
            )
        lines += ["", line + "."]
    lines += ["", "Best prompt per model (DL19 AUC on the calibration queries): "
              + ", ".join(f"{m}: {v.split('/')[1]}" for m, v in results["best_prompt"].items())]  # fmt: skip
    if results["quorum"]:
        lines += [
            "",
            "Quorum of two labels on DL19 evaluation pairs (each labeler at its calibrated threshold):",
            "",
            "| labels from | pairs | agreed (verified) | accuracy vs human | vs GPT-4o | vs GPT-4 |",
            "|---|---|---|---|---|---|",
        ]
        for q in results["quorum"]:
            who = f"2 × {q['labelers'][0]}" if q["same_model"] else " + ".join(q["labelers"])
            lines.append(
                f"| {who} | {q['pairs']} | {q['coverage']:.2f} | {q['accuracy_human']:.3f} "
                f"| {q['accuracy_gpt-4o']:.3f} | {q['accuracy_gpt-4']:.3f} |"
            )
    if results["compute_limit"]:
        lines += [
            "",
            "Speed against llama.cpp's own prompt processing of the same tokens (same model, threads, order):",
            "",
            "| labeler | pairs | labels/s | limit labels/s | limit evaluated tokens/s | share of limit |",
            "|---|---|---|---|---|---|",
        ]
        for labeler, c in results["compute_limit"].items():
            lines.append(
                f"| {labeler} | {c['pairs']} | {c['labels_per_second']} | {c['limit_labels_per_second']} "
                f"| {c['limit_evaluated_tokens_per_second']} | {c['share_of_limit']:.1%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
