"""Retrieval quality after fine-tuning: nDCG@10 on the held-out SciFact test claims (300 queries, human qrels).

Training data is the pipeline's sample split, scifact_title_abstract (paper titles → their abstracts), with BM25
(bm25s) top-k candidates per title mined as the pipeline's mining stage would. Verified labels: the top
`--label-candidates` candidates of `--label-queries` titles are labeled by each of `--label-models` (the offline
GGUFs, through the annotator's own llama.cpp backend and prompt: one forward pass, P(yes) vs P(no)), and a pair is
verified when every model gives the same verdict at P ≥ 0.5 — kombinat's rule (≥ 2 independent labelers agree),
with models in place of volunteers. Labeling every one of the ~50k candidates would take hours on 2 cores, so the
rest stay *unverified*. The variants differ in what they do with the candidates:

  (a) base        all-MiniLM-L6-v2 as shipped;
  (b) unfiltered  InfoNCE with the mined candidates as hard negatives (what hard-negative mining does unlabeled);
  (c) infonce     InfoNCE, verified-relevant candidates as positives, verified non-relevant as hard negatives,
                  unverified candidates masked out of the denominator;
  (d) exact       the same labels, exact softmax over the whole corpus cache with coordinate ascent.

All trained variants start from (a) and get the same number of optimizer steps, batch, lr (1e-4), temperature
and sequence length. Evaluation: exact cosine search over the whole SciFact corpus (title + " " + text, as MTEB
builds it), binary qrels, nDCG@10 computed here; (a) should reproduce MTEB's published 64.51 up to precision.
Caveat: the titles and abstracts are SciFact's own corpus, so training sees the evaluation documents (never
the test claims or their judgments) — as a domain split would in the pipeline.

    flock -x /tmp/embedkomb-cpu.lock .venv/bin/python -m bench.quality --steps 40
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:
    from embedkomb_pipeline.sources.beir import BeirDataset
    from embedkomb_pipeline.training.data import TrainingSet


def ndcg_at_10(ranked: list[list[str]], qids: list[str], qrels: dict[str, dict[str, int]]) -> float:
    total = 0.0
    for qid, docs in zip(qids, ranked, strict=True):
        rel = qrels[qid]
        dcg = sum((2 ** rel.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(docs[:10]))
        ideal = sorted(rel.values(), reverse=True)[:10]
        idcg = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
        total += dcg / idcg if idcg else 0.0
    return total / len(qids)


def evaluate(model_dir: Path, beir: BeirDataset, batch_size: int = 64, precision: str = "fp32") -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    qrels = beir.judged("test")
    qids = [q for q in qrels if q in beir.queries]
    doc_ids = list(beir.corpus)
    docs = [(beir.corpus[d].title + " " + beir.corpus[d].text).strip() for d in doc_ids]
    model = SentenceTransformer(str(model_dir), device=None, local_files_only=True)
    if precision == "bf16":  # 1.5-3x faster on CPUs with AVX512-BF16 (bench/mining.py); scores move slightly
        model.to(torch.bfloat16)
    kw = {"batch_size": batch_size, "convert_to_tensor": True, "normalize_embeddings": True, "show_progress_bar": False}
    d = model.encode(docs, **kw).float().cpu()
    q = model.encode([beir.queries[x] for x in qids], **kw).float().cpu()
    top = torch.topk(q @ d.T, 10, dim=1).indices.tolist()
    return ndcg_at_10([[doc_ids[j] for j in row] for row in top], qids, qrels)


def verify_by_agreement(
    candidates: Path,
    source: Path,
    models: list[Path],
    n_queries: int,
    per_query: int,
    out: Path,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, float]:
    """Label the top candidates of n random titles with every model; write the pairs they all agree on as a
    verified export file (the columns the training-set builder reads). Returns counts and timings."""
    import random

    import polars as pl

    from annotator.backends.base import Pair, order_pairs
    from annotator.backends.llama_cpp import LlamaCppBackend

    shard = pl.read_parquet(candidates).filter(pl.col("rank") <= per_query)
    texts = pl.read_parquet(source)
    queries = dict(zip(texts["query_id"], texts["query"], strict=True))
    documents = dict(zip(texts["doc_id"], texts["document"], strict=True))
    chosen = set(
        random.Random(seed).sample(sorted(set(shard["query_id"])), min(n_queries, shard["query_id"].n_unique()))
    )
    rows = [r for r in shard.iter_rows(named=True) if r["query_id"] in chosen]
    pairs = [Pair(r["pair_id"], queries[r["query_id"]], documents[r["doc_id"]]) for r in rows]
    verdicts: dict[str, list[bool]] = {p.pair_id: [] for p in pairs}
    probabilities: dict[str, list[float]] = {p.pair_id: [] for p in pairs}
    stats: dict[str, float] = {"labeled_pairs": len(pairs)}
    for model in models:
        t0 = time.perf_counter()
        backend = LlamaCppBackend(model, n_ctx=1024, max_document_tokens=384, n_threads=threads)
        for done, score in enumerate(backend.score_pairs(order_pairs(pairs)), start=1):
            verdicts[score.pair_id].append(score.p_relevant >= 0.5)
            probabilities[score.pair_id].append(score.p_relevant)
            if done % 20 == 0:
                print(f"  {model.name}: {done}/{len(pairs)} pairs, {time.perf_counter() - t0:.0f} s", flush=True)
        backend.close()
        seconds = time.perf_counter() - t0
        stats[f"{model.stem}_pairs_per_s"] = round(len(pairs) / seconds, 2)
        stats[f"{model.stem}_relevant_share"] = round(sum(v[-1] for v in verdicts.values()) / len(pairs), 3)
        print(f"  labeled {len(pairs)} pairs with {model.name} in {seconds:.0f} s", flush=True)
    agreed = [(p, v[0]) for p in pairs if len(set(v := verdicts[p.pair_id])) == 1]
    stats["verified"] = len(agreed)
    stats["verified_relevant"] = sum(label for _, label in agreed)
    pl.DataFrame(
        {
            "query": [p.query for p, _ in agreed],
            "document": [p.document for p, _ in agreed],
            "label": [label for _, label in agreed],
            "p_relevant": [sum(probabilities[p.pair_id]) / len(models) for p, _ in agreed],
            "status": ["verified"] * len(agreed),
            "split": ["scifact_title_abstract"] * len(agreed),
        },
        schema={"query": pl.String, "document": pl.String, "label": pl.Boolean, "p_relevant": pl.Float64,
                "status": pl.String, "split": pl.String},
    ).write_parquet(out)  # fmt: skip
    return stats


def build_training_set(
    data_dir: Path,
    top_k: int,
    work: Path,
    label_models: list[Path],
    label_queries: int,
    label_candidates: int,
    label_threads: int | None = None,
) -> tuple[TrainingSet, dict[str, float]]:
    import bm25s
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedkomb_pipeline.mining.retrieval import CANDIDATE_SCHEMA
    from embedkomb_pipeline.sources.pairs import iter_sample_split, write_source_pairs
    from embedkomb_pipeline.training.data import build_training_set as build

    source = work / "source.parquet"
    write_source_pairs(iter_sample_split("scifact_title_abstract", data_dir), "scifact_title_abstract", source)
    frame = pl.read_parquet(source)
    queries, docs = frame["query"].to_list(), frame["document"].to_list()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    hits, _scores = retriever.retrieve(
        bm25s.tokenize(queries, stopwords="en", show_progress=False), k=top_k + 1, show_progress=False
    )
    qid, did = frame["query_id"].to_list(), frame["doc_id"].to_list()
    cols: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA.names}
    for i, row in enumerate(hits):
        kept = [int(j) for j in row if did[int(j)] != did[i]][:top_k]
        for rank, j in enumerate(kept, start=1):
            for name, value in (
                ("pair_id", f"{i}-{j}"), ("query_id", qid[i]), ("doc_id", did[j]), ("split", "scifact_title_abstract"),
                ("cycle", "c000"), ("bm25_rank", rank), ("dense_rank", None), ("rrf_score", 1 / (60 + rank)),
                ("rank", rank),
            ):  # fmt: skip
                cols[name].append(value)
    candidates = work / "candidates.parquet"
    pq.write_table(pa.table(cols, schema=CANDIDATE_SCHEMA), candidates)
    if not label_models:
        return build([source], [], [candidates]), {}
    verified = work / "verified.parquet"
    stats = verify_by_agreement(
        candidates, source, label_models, label_queries, label_candidates, verified, threads=label_threads
    )
    return build([source], [verified], [candidates]), stats


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per trained variant")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=10, help="mined candidates per title")
    parser.add_argument("--variants", default="base,unfiltered,infonce,exact")
    parser.add_argument(
        "--data-dir", default=os.environ.get("EMBEDKOMB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--eval-precision", choices=["fp32", "bf16", "auto"], default="fp32")
    parser.add_argument(
        "--label-models",
        default="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf,qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        help="GGUF files under models/ (make models) that verify candidates by agreement; '' for none",
    )
    parser.add_argument("--label-queries", type=int, default=200, help="titles whose candidates get labeled")
    parser.add_argument("--label-candidates", type=int, default=2, help="top candidates labeled per such title")
    parser.add_argument(
        "--label-threads", type=int, default=None, help="llama.cpp threads (default: every core; 1 on a busy machine)"
    )
    parser.add_argument("--out", default=None, help="keep the trained models here (default: a temporary folder)")
    args = parser.parse_args()

    import tempfile

    import torch

    from embedkomb_pipeline.mining.embedding import default_base_model_path, default_precision
    from embedkomb_pipeline.sources.beir import load_beir
    from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer, TrainConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = default_precision() if args.eval_precision == "auto" else args.eval_precision
    print(f"device: {device}, evaluation in {precision}", flush=True)
    beir = load_beir(Path(args.data_dir) / "scifact")
    base = default_base_model_path()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    label_models = [REPO / "models" / name for name in args.label_models.split(",") if name]
    missing = [str(p) for p in label_models if not p.is_file()]
    if missing:
        parser.error(f"labeling models not found: {', '.join(missing)} (run `make models`, or pass --label-models '')")
    data, label_stats = build_training_set(
        Path(args.data_dir) / "scifact",
        args.top_k,
        work,
        label_models,
        args.label_queries,
        args.label_candidates,
        args.label_threads,
    )
    print(f"verification: {label_stats}", flush=True)
    print(f"training set: {data.counts}", flush=True)
    common = {"batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "lr": 1e-4, "seed": 0}
    results = {}
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        if variant == "base":
            model_dir = base
        else:
            if variant == "exact":
                # two phases (query tower, then document tower, cache re-encoded), the same total steps
                config = TrainConfig(
                    loss="exact", phases=2, epochs_per_phase=1.0, max_steps_per_phase=args.steps // 2, **common
                )
                variant_data = data
            else:
                config = TrainConfig(loss="infonce", phases=1, epochs_per_phase=1.0, max_steps_per_phase=args.steps,
                                     hard_negatives_per_query=1, **common)  # fmt: skip
                variant_data = data.unfiltered() if variant == "unfiltered" else data
            trainer = TowerTrainer(base, variant_data, config)
            trainer.train(log=lambda m: print("  " + m, flush=True), track_objective=False)
            model_dir = trainer.save(work / variant)["model"]
            del trainer
        train_seconds = time.perf_counter() - t0
        score = evaluate(model_dir, beir, precision=precision)
        results[variant] = {"ndcg@10": round(score, 4), "seconds": round(time.perf_counter() - t0, 1),
                            "train_seconds": round(train_seconds, 1)}  # fmt: skip
        print(f"{variant:12} nDCG@10 {score:.4f}  ({results[variant]['seconds']} s)", flush=True)
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "verification": label_stats,
                      "training_set": data.counts, "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
