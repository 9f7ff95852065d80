"""Labels for the training experiment: the best offline labeler over the hardest mined candidates of the sample splits.

    flock /tmp/embedkomb-bench.lock .venv/bin/python -m bench.training_labels          # hours on 2 cores; resumable
    .venv/bin/python -m bench.training_labels --summary-only                          # counts of what is labeled

For each sample split (SciFact and NFCorpus titles → abstracts) it writes the source pairs and mines candidates
as the pipeline does (embedkomb_pipeline.mining: BM25 + all-MiniLM-L6-v2, fused by RRF), draws --queries queries
per split at random and labels each one's top --per-query candidates with --model, using the prompt version and
the Platt calibration that `bench.labeling` chose for it (bench/results/labeling/results.json) — the registry
entry kombinat would hold. Queries of the splits alternate, so a run stopped early still covers both.

Output: --out (default bench/results/training_labels/labels.parquet: ids and scores, no texts; small, committed)
and summary.json / summary.md beside it. The label file is the resume point: a stopped run goes on where it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from embedkomb_pipeline.labeling.offline_labels import (
    OfflineLabelError,
    hardest_candidates,
    label_candidates,
    labeler_from_results,
    read_offline_labels,
)
from embedkomb_pipeline.offline_models import MODELS, MODELS_DIR
from embedkomb_pipeline.settings import default_data_dir
from embedkomb_pipeline.sources.pairs import SAMPLE_SPLITS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "training_labels" / "labels.parquet"


def prepare_split(split: str, data_dir: Path, work: Path, top_k: int) -> tuple[Path, Path]:
    """The split's source pairs and its mined candidates (cached in work: mining is deterministic)."""
    from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache, default_base_model_path
    from embedkomb_pipeline.mining.retrieval import MiningConfig, mine_split
    from embedkomb_pipeline.sources.pairs import iter_sample_split, write_source_pairs

    source = work / split / "source.parquet"
    candidates = work / split / f"candidates-top{top_k}.parquet"
    if not source.exists():
        stats = write_source_pairs(iter_sample_split(split, data_dir), split, source)
        print(f"{split}: {stats.rows_written} source pairs", flush=True)
    if not candidates.exists():
        encoder = DenseEncoder(default_base_model_path(), precision="fp32")
        cache = EmbeddingCache(work / "embeddings", encoder.identity)
        report = mine_split(source, candidates, split, "c000", encoder, cache, MiningConfig(top_k=top_k))
        print(f"{split}: mined top {top_k} for {report.queries} queries over {report.documents} documents", flush=True)
    return source, candidates


def summarize(labels: pl.DataFrame) -> dict[str, object]:
    by_split = (
        labels.group_by("split")
        .agg(
            pl.len().alias("pairs"),
            pl.col("query_id").n_unique().alias("queries"),
            pl.col("label").mean().alias("relevant_share"),
            pl.col("truncated").mean().alias("truncated_share"),
            (pl.len() / pl.col("seconds").sum()).alias("pairs_per_second"),
        )
        .sort("split")
    )
    by_rank = labels.group_by("rank").agg(pl.len().alias("pairs"), pl.col("label").mean().alias("relevant_share"))
    first = labels.row(0, named=True) if labels.height else {}
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.training_labels " + " ".join(sys.argv[1:]),
        "labeler": first.get("labeler"),
        "prompt_version": first.get("prompt_version"),
        "calibration": json.loads(first["calibration"]) if first else None,
        "max_document_tokens": first.get("max_document_tokens"),
        "pairs": labels.height,
        "splits": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in by_split.to_dicts()
        ],
        "by_rank": [
            {"rank": r["rank"], "pairs": r["pairs"], "relevant_share": round(r["relevant_share"], 4)}
            for r in by_rank.sort("rank").to_dicts()
        ],
    }


def summary_markdown(summary: dict) -> str:
    lines = [
        f"Offline labels for training ({summary['generated_at']}; `{summary['command']}`)",
        "",
        f"Labeler {summary['labeler']}, prompt {summary['prompt_version']}, calibration {summary['calibration']}, "
        f"documents cut at {summary['max_document_tokens']} tokens; {summary['pairs']} pairs.",
        "",
        "| split | pairs | queries | labeled relevant | documents cut | pairs/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["splits"]:
        lines.append(
            f"| {r['split']} | {r['pairs']} | {r['queries']} | {r['relevant_share']:.3f} | "
            f"{r['truncated_share']:.3f} | {r['pairs_per_second']:.3f} |"
        )
    lines += ["", "Labeled relevant by mined rank: " + ", ".join(
        f"rank {r['rank']} {r['relevant_share']:.2f} ({r['pairs']})" for r in summary["by_rank"]
    )]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_summary(labels: pl.DataFrame, out: Path) -> dict[str, object]:
    summary = summarize(labels)
    (out.parent / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out.parent / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary), flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--splits", nargs="*", default=list(SAMPLE_SPLITS), help=f"of {', '.join(SAMPLE_SPLITS)}")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--queries", type=int, default=500, help="queries drawn per split")
    parser.add_argument("--per-query", type=int, default=4, help="top mined candidates labeled per query")
    parser.add_argument("--mine-top-k", type=int, default=20, help="candidates mined per query (kept for masking)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "labeling" / "results.json",
                        help="bench.labeling's results: the model's prompt version and calibration")  # fmt: skip
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "training_labels", help="sources, candidates")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-document-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the annotator's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary-only", action="store_true", help="label nothing: summarize --out")
    args = parser.parse_args()

    if args.summary_only:
        try:
            write_summary(read_offline_labels(args.out), args.out)
        except OfflineLabelError as error:
            parser.error(str(error))
        return 0
    unknown = [s for s in args.splits if s not in SAMPLE_SPLITS]
    if unknown or args.model not in MODELS:
        parser.error(f"unknown split(s) {unknown}" if unknown else f"unknown model {args.model!r}")
    if args.data is None:
        parser.error("no data folder: pass --data or set EMBEDKOMB_DATA_DIR")
    model = MODELS[args.model]
    model_path = model.path(MODELS_DIR)
    if not model_path.is_file():
        parser.error(f"{model_path} is missing: run `make models`")
    try:
        labeler = labeler_from_results(args.results, model.registry_name, model_path, model.sha256)
    except OfflineLabelError as error:
        parser.error(str(error))

    frames, texts = [], {}
    for split in args.splits:
        source, candidates = prepare_split(split, Path(args.data), args.work, args.mine_top_k)
        frames.append(hardest_candidates(candidates, args.per_query, args.queries, seed=args.seed))
        frame = pl.read_parquet(source, columns=["query_id", "doc_id", "query", "document"])
        texts.update({("q", q): t for q, t in zip(frame["query_id"], frame["query"], strict=True)})
        texts.update({("d", d): t for d, t in zip(frame["doc_id"], frame["document"], strict=True)})
    # alternate the splits query by query, so that a stopped run holds both
    todo = pl.concat(frames).with_columns(pl.col("split").rank("dense").alias("split_order"))
    todo = todo.sort(["query_order", "split_order", "rank"])
    print(f"{todo.height} candidate pairs of {todo['query_id'].n_unique()} queries to label with "
          f"{labeler.name}/{labeler.prompt_version}", flush=True)  # fmt: skip
    try:
        labels = label_candidates(
            labeler,
            todo,
            lambda q, d: (texts[("q", q)], texts[("d", d)]),
            args.out,
            max_document_tokens=args.max_document_tokens,
            threads=args.threads,
            log=lambda m: print(m, flush=True),
        )
    except OfflineLabelError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print("stopped: the labels so far are saved; run the same command to go on", flush=True)
        labels = read_offline_labels(args.out)
    write_summary(labels, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
