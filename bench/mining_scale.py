"""Mining at corpus scale without the encoder, and the recall each FAISS index type costs.

These CPUs embed ~100 documents/s, so a 10M-document split cannot be embedded here; everything else on the
mining path can run at that size. Two modes:

scale — the real miner (mine_split_with_vectors: bm25s, FAISS, RRF, the Parquet shard writer) on a corpus of
    N documents with precomputed vectors instead of the encoder:
    - texts: real-shaped, drawn from the real corpora in the data folder. Every sentence (>= 20 chars) of the
      SciFact, NFCorpus and MS MARCO subset texts forms a pool; a document is 1-4 pool sentences drawn at
      random (seeded), its query a 4-12-word window of one of them (a lexically findable positive, like a
      title for its abstract). Built through the real source writer (write_source_pairs), in a process of its
      own. Vocabulary is the pool's (~100k terms): a real 10M corpus has more distinct terms, so bm25s's vocab
      dict is smaller here than it would be.
    - vectors: deterministic random unit vectors (standard normal, normalized; block b of 65,536 rows drawn
      from numpy's default_rng([seed, b])), so any slice can be regenerated and the full float32 matrix never
      has to exist. Random vectors spread evenly over the IVF lists: timings and bytes are representative,
      dense recall on them is meaningless (that is what the recall mode is for).
    - queries: all N are indexed as positives, the first --queries (query-id order) are mined, K = --top-k;
      per-query stages scale linearly in the number mined (reported per query).
    The miner runs in a fresh process, so its peak RSS is its own; the baseline in the same run is the 100k
    corpus (the size mining was measured at before).

recall — exact inner-product search vs IVFFlat, IVF-SQ8, IVF-PQ and HNSW on real all-MiniLM-L6-v2
    embeddings of bench/mining.py's large corpus (real sentences; --recall-docs of them), recall@K of the exact
    top K, build seconds, search seconds and index bytes. Embeddings are cached in --cache-dir.

    nice -n 19 python -m bench.mining_scale scale --docs 100000 1000000
    nice -n 19 python -m bench.mining_scale recall --recall-docs 100000
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "mining_scale"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
DIMENSION = 384  # all-MiniLM-L6-v2's


# --------------------------------------------------------------------------------------------------------
# Real-shaped corpora


def sentence_pool(data_dir: Path) -> list[str]:
    from embedkomb_pipeline.sources.beir import iter_jsonl

    pool: list[str] = []
    for name in ("scifact", "nfcorpus", "msmarco-dl19-subset5k"):
        for _, obj in iter_jsonl(data_dir / name / "corpus.jsonl"):
            pool += [s for s in _SENTENCE.split(obj.get("text") or "") if len(s) >= 20]
    if not pool:
        raise FileNotFoundError(f"no corpus sentences under {data_dir}")
    return pool


def scale_batches(pool: list[str], n_docs: int, seed: int, batch: int = 250_000) -> Iterator[dict[str, list[str]]]:
    """n_docs (query, document) pairs of real sentences, as RawBatches for write_source_pairs."""
    rng = np.random.default_rng(seed)
    words = [s.split() for s in pool]
    for start in range(0, n_docs, batch):
        size = min(batch, n_docs - start)
        lengths = rng.choice([1, 2, 3, 4], size=size, p=[0.2, 0.35, 0.3, 0.15])
        picks = rng.integers(0, len(pool), size=int(lengths.sum()))
        window = rng.integers(4, 13, size=size)
        offset = rng.random(size)
        out: dict[str, list[str]] = {"query": [], "document": [], "dataset": []}
        cursor = 0
        for i in range(size):
            chosen = picks[cursor : cursor + lengths[i]]
            cursor += lengths[i]
            out["document"].append(" ".join(pool[j] for j in chosen))
            source = words[chosen[0]]
            first = int(offset[i] * max(1, len(source) - window[i]))
            out["query"].append(" ".join(source[first : first + window[i]]))
            out["dataset"].append("scale")
        yield out


def build_scale_source(data_dir: Path, n_docs: int, out: Path, seed: int) -> dict:
    from embedkomb_pipeline.sources.pairs import write_source_pairs

    started = time.perf_counter()
    stats = write_source_pairs(scale_batches(sentence_pool(data_dir), n_docs, seed), "scale", out)
    return {
        "pairs": stats.rows_written,
        "documents": stats.unique_documents,
        "queries": stats.unique_queries,
        "seconds": time.perf_counter() - started,
        "bytes": out.stat().st_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --------------------------------------------------------------------------------------------------------
# Precomputed vectors


class RandomUnitVectors:
    """Deterministic random unit vectors standing in for embeddings (see the module docstring)."""

    BLOCK = 65_536

    def __init__(self, dimension: int = DIMENSION, seed: int = 0) -> None:
        self._dimension, self.seed, self.n_docs = dimension, seed, 0

    @property
    def dimension(self) -> int:
        return self._dimension

    def _block(self, stream: int, block: int) -> np.ndarray:
        rows = np.random.default_rng([self.seed, stream, block]).standard_normal(
            (self.BLOCK, self._dimension), dtype=np.float32
        )
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows

    def _rows(self, stream: int, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self._dimension), dtype=np.float32)
        for block in range(start // self.BLOCK, (stop - 1) // self.BLOCK + 1 if stop > start else 0):
            lo, hi = max(start, block * self.BLOCK), min(stop, (block + 1) * self.BLOCK)
            out[lo - start : hi - start] = self._block(stream, block)[lo - block * self.BLOCK : hi - block * self.BLOCK]
        return out

    def prepare_documents(self, corpus: object, report: object) -> None:
        self.n_docs = len(corpus.doc_ids)  # type: ignore[attr-defined]

    def document_vectors(self, start: int, stop: int) -> np.ndarray:
        return self._rows(0, start, stop)

    def query_vectors(self, corpus: object, stop: int) -> np.ndarray:
        return self._rows(1, 0, stop)


# --------------------------------------------------------------------------------------------------------
# Workers (fresh processes: peak RSS is the worker's own)


def worker_scale(args: argparse.Namespace) -> dict:
    from embedkomb_pipeline.mining.retrieval import MiningConfig, mine_split_with_vectors

    config = MiningConfig(
        top_k=args.top_k, max_queries=args.queries, index_memory_budget_bytes=int(args.index_budget_gib * (1 << 30))
    )
    out = Path(args.work) / "candidates.parquet"
    report = mine_split_with_vectors(
        Path(args.source), out, "scale", "c000", RandomUnitVectors(), "random-unit-vectors", "seed0", config
    )
    return {
        "documents": report.documents,
        "queries_indexed": report.queries,
        "queries_mined": report.queries_mined,
        "top_k": report.top_k_effective,
        "candidates": report.candidates,
        "index": f"{report.index_type} nlist={report.nlist} nprobe={report.nprobe}",
        "index_bytes": report.index_bytes,
        "shard_bytes": out.stat().st_size,
        "seconds": {k: round(v, 2) for k, v in report.seconds.items()},
        "peak_rss_mb_after": {k: round(v) for k, v in report.peak_rss_mb_after.items()},
        "peak_rss_mb": round(report.peak_rss_mb),
        "recall_at_k_bm25": round(report.recall_at_k["bm25"], 4),
        "per_query_ms": {
            stage: round(1000 * report.seconds[stage] / max(report.queries_mined, 1), 3)
            for stage in ("bm25_search", "dense_search", "fuse_and_write")
        },
    }


def worker_build(args: argparse.Namespace) -> dict:
    return build_scale_source(Path(args.data_dir), args.n, Path(args.source), args.seed)


def spawn(*worker_args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "bench.mining_scale", *worker_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {worker_args[:2]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def run_scale(args: argparse.Namespace) -> None:
    print(f"machine: {os.cpu_count()} cores; K = {args.top_k}; {args.queries:,} queries mined per corpus", flush=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-mining-scale-", dir=args.tmp) as tmp:
        for n in args.docs:
            source = Path(tmp) / f"source-{n}.parquet"
            built = spawn("worker-build", "--n", str(n), "--source", str(source), "--data-dir", args.data_dir,
                          "--seed", str(args.seed))  # fmt: skip
            print(f"[{n:,}] source pairs: {built['pairs']:,} pairs, {built['documents']:,} documents, "
                  f"{built['bytes'] / 1e6:.0f} MB, built in {built['seconds']:.0f} s", flush=True)  # fmt: skip
            work = Path(tmp) / f"work-{n}"
            work.mkdir()
            mined = spawn("worker-scale", "--source", str(source), "--work", str(work), "--top-k", str(args.top_k),
                          "--queries", str(args.queries), "--index-budget-gib", str(args.index_budget_gib))  # fmt: skip
            mined["source"] = built
            results.append(mined)
            print(f"[{n:,}] " + json.dumps(mined), flush=True)
            source.unlink()
            save_scale(args, results)  # after every size: a larger one that fails keeps the smaller ones
    print("\n=== mining at scale (precomputed random unit vectors, real-shaped texts) ===")
    base = results[0]
    for r in results:
        s = r["seconds"]
        print(f"{r['documents']:>11,} docs: peak RSS {r['peak_rss_mb'] / 1024:6.2f} GiB, index {r['index']}, "
              f"{r['index_bytes'] / 2**30:.2f} GiB; load {s['load']:.0f} s, bm25 index {s['bm25_index']:.0f} s, "
              f"dense index {s['dense_index']:.0f} s; per query: bm25 {r['per_query_ms']['bm25_search']:.2f} ms, "
              f"dense {r['per_query_ms']['dense_search']:.2f} ms, "
              f"fuse+write {r['per_query_ms']['fuse_and_write']:.2f} ms"
              f"  (RSS × {r['peak_rss_mb'] / base['peak_rss_mb']:.1f} vs {base['documents']:,})")  # fmt: skip


def save_scale(args: argparse.Namespace, results: list[dict]) -> None:
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=1))


# --------------------------------------------------------------------------------------------------------
# Recall of each index type on real embeddings


def run_recall(args: argparse.Namespace) -> None:
    import faiss
    import polars as pl

    from bench.mining import build_large
    from embedkomb_pipeline.ids import text_hash
    from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache, default_base_model_path
    from embedkomb_pipeline.mining.retrieval import MiningConfig, MiningReport, build_dense_index

    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = cache_dir / f"large-{args.recall_docs}.parquet"
    if not source.exists():
        build_large(Path(args.data_dir), source, min_documents=args.recall_docs)
    pairs = pl.read_parquet(source, columns=["doc_id", "document", "query"])
    # the corpus is always bench/mining.py's --recall-docs corpus; --recall-use takes its first documents (doc-id
    # order, the order they are embedded and cached in), so a smaller run reuses a larger one's cache
    docs = pairs.select("doc_id", "document").unique("doc_id").sort("doc_id").head(args.recall_use or args.recall_docs)
    queries = pairs["query"].unique().sort().sample(n=min(args.recall_queries, pairs["query"].n_unique()), seed=0)
    encoder = DenseEncoder(default_base_model_path(), name="all-MiniLM-L6-v2")
    cache = EmbeddingCache(cache_dir / "cache", encoder.identity)
    started = time.perf_counter()
    # in slices of 10k, each cached as it completes: an interrupted run keeps what it embedded
    texts, ids = docs["document"].to_list(), docs["doc_id"].to_list()
    parts = []
    for start in range(0, len(texts), 10_000):
        parts.append(cache.embed(encoder, texts[start : start + 10_000], ids[start : start + 10_000]))
        print(f"  {start + len(parts[-1]):,} / {len(texts):,} documents embedded or cached "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    doc_vectors = np.concatenate(parts)
    query_texts = queries.to_list()
    query_vectors = cache.embed(encoder, query_texts, [text_hash(q) for q in query_texts])
    embed_seconds = time.perf_counter() - started
    n, k = len(doc_vectors), args.top_k
    print(f"{n:,} documents, {len(query_texts):,} queries embedded (or read from the cache) in {embed_seconds:.0f} s; "
          f"{cache.stats.misses:,} newly embedded")  # fmt: skip

    class Held:
        dimension = DIMENSION

        def document_vectors(self, start: int, stop: int) -> np.ndarray:
            return doc_vectors[start:stop]

    exact = faiss.IndexFlatIP(DIMENSION)
    exact.add(doc_vectors)
    started = time.perf_counter()
    _, truth = exact.search(query_vectors, k)
    exact_seconds = time.perf_counter() - started
    rows: list[dict[str, Any]] = [{"index": "IndexFlatIP (exact)", "recall_at_k": 1.0, "build_s": 0.0,
             "search_ms_per_query": round(1000 * exact_seconds / len(query_texts), 3),
             "bytes": n * DIMENSION * 4}]  # fmt: skip
    variants: list[tuple[str, MiningConfig | None, dict[str, int]]] = [
        ("ivf_flat", MiningConfig(index_kind="ivf_flat"), {}),
        ("ivf_sq8", MiningConfig(index_kind="ivf_sq8"), {}),
        ("ivf_pq m=48", MiningConfig(index_kind="ivf_pq", pq_subquantizers=48), {}),
        ("ivf_pq m=96", MiningConfig(index_kind="ivf_pq", pq_subquantizers=96), {}),
        ("ivf_flat nprobe=64", MiningConfig(index_kind="ivf_flat", nprobe=64), {}),
        ("ivf_sq8 nprobe=64", MiningConfig(index_kind="ivf_sq8", nprobe=64), {}),
        ("hnsw M=32 efSearch=128", None, {"M": 32, "ef": 128}),
        ("hnsw M=32 efSearch=256", None, {"M": 32, "ef": 256}),
    ]
    hnsw: faiss.IndexHNSWFlat | None = None
    for name, config, hnsw_params in variants:
        started = time.perf_counter()
        if config is not None:
            report = MiningReport("recall", "c000", "all-MiniLM-L6-v2", encoder.identity.revision)
            index = build_dense_index(Held(), n, config, report)  # type: ignore[arg-type]
            index_bytes = report.index_bytes
            label = f"{report.index_type} nlist={report.nlist} nprobe={report.nprobe}"
        else:
            if hnsw is None:
                hnsw = faiss.IndexHNSWFlat(DIMENSION, hnsw_params["M"], faiss.METRIC_INNER_PRODUCT)
                hnsw.hnsw.efConstruction = 80
                hnsw.add(doc_vectors)
            hnsw.hnsw.efSearch = hnsw_params["ef"]
            index = hnsw
            # float32 vectors + level-0 links (2·M ids of 4 bytes) + upper levels (~1/M of that)
            index_bytes = int(n * (DIMENSION * 4 + 2 * hnsw_params["M"] * 4 * 1.05))
            label = name
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        _, found = index.search(query_vectors, k)
        search_seconds = time.perf_counter() - started
        recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth, strict=True)]))
        rows.append({"index": label, "recall_at_k": round(recall, 4), "build_s": round(build_seconds, 1),
                     "search_ms_per_query": round(1000 * search_seconds / len(query_texts), 3),
                     "bytes": int(index_bytes)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n=== recall@{k} of the exact top {k}, {n:,} real MiniLM document vectors, {len(query_texts):,} queries ==="
    )
    for row in rows:
        print(f"{row['index']:<58} recall {row['recall_at_k']:.4f}  build {row['build_s']:6.1f} s  "
              f"search {row['search_ms_per_query']:7.3f} ms/query  {row['bytes'] / 2**20:8.1f} MiB "
              f"({row['bytes'] / n:.0f} B/doc)")  # fmt: skip
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(
            {"command": " ".join(sys.argv), "documents": n, "queries": len(query_texts), "k": k,
             "embed_seconds": round(embed_seconds, 1), "rows": rows}, indent=1))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["scale", "recall", "worker-scale", "worker-build"])
    parser.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=5_000, help="queries mined per corpus (scale)")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--index-budget-gib", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recall-docs", type=int, default=100_000)
    parser.add_argument("--recall-use", type=int, default=0, help="recall: use only this many of the documents")
    parser.add_argument("--recall-queries", type=int, default=2_000)
    parser.add_argument("--cache-dir", default="/tmp/embedkomb-mining-scale")
    parser.add_argument("--tmp", default=None, help="folder for the generated corpora (needs ~1 GB per 1M docs)")
    parser.add_argument(
        "--data-dir", default=os.environ.get("EMBEDKOMB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--json-out", default="")
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(n < 1000 for n in args.docs) or args.queries < 1 or args.top_k < 1:
        parser.error("--docs needs >= 1000 documents per corpus, --queries and --top-k >= 1")
    if args.mode == "scale":
        run_scale(args)
    elif args.mode == "recall":
        run_recall(args)
    else:
        result = worker_scale(args) if args.mode == "worker-scale" else worker_build(args)
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
