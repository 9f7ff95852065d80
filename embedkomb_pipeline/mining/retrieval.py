"""Candidate mining for one split: BM25 + dense retrieval fused by Reciprocal Rank Fusion.

For each query the shard keeps the top K documents that are *not* known positives: the lexical and
semantic near-misses an embedding model confuses most, which the labelers then judge.

Memory stays bounded by the corpus, never by queries × K: queries run in batches, fusion reuses
per-document scratch arrays, and each batch's rows go straight to the Parquet writer. Document vectors reach
the FAISS index in chunks (``MiningConfig.vector_chunk_rows``), and the index type follows the corpus size
(``choose_index``): a flat float32 copy of every vector stops fitting long before bm25s does.

The dense side reads its vectors from a ``VectorSource``: ``EncoderVectors`` (the encoder through the embedding
cache) in the pipeline; the scale benchmark (bench/mining_scale.py) plugs in precomputed vectors instead, so
BM25, the index, RRF and the writer run at corpus sizes this machine's CPUs cannot embed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from embedkomb_pipeline.ids import pair_id
from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache

if TYPE_CHECKING:
    import faiss

CANDIDATE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("split", pa.string()),
        ("cycle", pa.string()),
        ("bm25_rank", pa.int32()),
        ("dense_rank", pa.int32()),
        ("rrf_score", pa.float64()),
        ("rank", pa.int32()),
    ]
)


INDEX_KINDS = ("flat", "ivf_flat", "ivf_sq8", "ivf_pq")


@dataclass(frozen=True)
class MiningConfig:
    """Knobs of one mining run. Ranks are 1-based everywhere, as RRF defines them."""

    top_k: int = 5000
    rrf_k: int = 60
    nprobe: int = 16
    nlist: int | None = None  # derived from the corpus size when None
    exact_search_below: int = 20_000  # corpora smaller than this use exact inner-product search
    query_batch_size: int = 512
    encode_batch_size: int = 128
    bm25_stopwords: str = "en"
    bm25_stemmer: str = "english"
    threads: int = 0  # 0: all cores
    # The dense index's vectors must fit this many bytes (choose_index): IVFFlat while its float32 lists fit,
    # then IVF with 8-bit scalar quantization (¼ of the bytes), then IVF-PQ (pq_subquantizers bytes per vector).
    index_memory_budget_bytes: int = 8 << 30
    index_kind: str = "auto"  # or one of INDEX_KINDS to force it (the recall benchmark compares them)
    pq_subquantizers: int = 48
    # k-means of the IVF lists trains on at most this many vectors: the cost is rows × nlist × dim × iterations,
    # and with FAISS's 256 points per list a 10M-document split would train for hours on a CPU
    max_train_rows: int = 262_144
    vector_chunk_rows: int = 1_000_000  # document vectors travel to the index in slices this big
    max_queries: int | None = None  # mine only the first N queries (query-id order): benchmarks at corpus scale

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.rrf_k < 0:
            raise ValueError(f"rrf_k must be non-negative, got {self.rrf_k}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {self.nprobe}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist must be at least 1, got {self.nlist}")
        if self.index_memory_budget_bytes < 1:
            raise ValueError(f"index_memory_budget_bytes must be positive, got {self.index_memory_budget_bytes}")
        if self.max_train_rows < 39:
            raise ValueError(
                f"max_train_rows must be at least 39 (FAISS's minimum per list), got {self.max_train_rows}"
            )
        if self.vector_chunk_rows < 1:
            raise ValueError(f"vector_chunk_rows must be at least 1, got {self.vector_chunk_rows}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be at least 1, got {self.max_queries}")
        if self.index_kind not in ("auto", *INDEX_KINDS):
            raise ValueError(f"index_kind must be 'auto' or one of {INDEX_KINDS}, got {self.index_kind!r}")
        if self.pq_subquantizers < 1:
            raise ValueError(f"pq_subquantizers must be at least 1, got {self.pq_subquantizers}")


@dataclass
class MiningReport:
    """What a mining run did: counts, per-stage seconds, recall of the known positives, cache use."""

    split: str
    cycle: str
    model_name: str
    model_revision: str
    documents: int = 0
    queries: int = 0
    positives: int = 0
    top_k_requested: int = 0
    top_k_effective: int = 0
    candidates: int = 0
    index_type: str = ""
    nlist: int = 0
    nprobe: int = 0
    index_bytes: int = 0  # the index's vectors, ids and coarse centroids, as FAISS holds them in memory
    queries_mined: int = 0  # queries < this when MiningConfig.max_queries cut the run short
    documents_over_model_window: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    recall_at_k: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    peak_rss_mb: float = 0.0
    peak_rss_mb_after: dict[str, float] = field(default_factory=dict)  # the process's peak so far, per stage

    def throughput(self) -> dict[str, float]:
        """documents/s for indexing and embedding stages, queries/s for search stages."""
        per_doc = {
            "bm25_index": self.documents,
            "embed_documents": self.documents,
            "dense_index": self.documents,
        }
        per_query = {
            "bm25_search": self.queries_mined or self.queries,
            "embed_queries": self.queries_mined or self.queries,
            "dense_search": self.queries_mined or self.queries,
            "fuse_and_write": self.queries_mined or self.queries,
        }
        out: dict[str, float] = {}
        for stage, count in {**per_doc, **per_query}.items():
            seconds = self.seconds.get(stage)
            if seconds:
                unit = "docs_per_s" if stage in per_doc else "queries_per_s"
                out[f"{stage}_{unit}"] = count / seconds
        return out


def rrf_fuse(rank_lists: list[list[int]], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal Rank Fusion of ranked id lists (best first): score(d) = Σ 1 / (k + rank), rank 1-based.

    Ties go to the smaller id so the order is deterministic. The reference implementation the vectorized
    path in mine_split is tested against.
    """
    scores: dict[int, float] = {}
    for ranked in rank_lists:
        for position, doc in enumerate(ranked, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + position)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def derive_nlist(n_documents: int) -> int:
    """≈ 4·√N lists, but never fewer than 39 training points per list (FAISS's own minimum)."""
    return max(1, min(int(4 * math.sqrt(n_documents)), n_documents // 39))


@dataclass(frozen=True)
class IndexPlan:
    """Which FAISS index a corpus gets, and how many bytes its vectors will take there."""

    kind: str  # "flat", "ivf_flat", "ivf_sq8" or "ivf_pq"
    nlist: int
    bytes_per_vector: int  # code bytes + the 8-byte id an IVF list stores beside each code

    @property
    def label(self) -> str:
        return {
            "flat": "IndexFlatIP (exact)",
            "ivf_flat": "IndexIVFFlat",
            "ivf_sq8": "IndexIVFScalarQuantizer (SQ8)",
            "ivf_pq": "IndexIVFPQ",
        }[self.kind]


def choose_index(n_documents: int, dimension: int, config: MiningConfig) -> IndexPlan:
    """The index for a corpus: exact search while it is small, IVFFlat while its float32 lists fit the budget,
    then 8-bit scalar quantization (¼ the bytes, recall close to IVFFlat's), then product quantization.

    HNSW is never chosen: it keeps every float32 vector plus its graph links, so it needs more memory than
    IVFFlat, not less (bench/mining_scale.py measures the recall of each against exact search).
    """
    if config.index_kind == "flat" or (config.index_kind == "auto" and n_documents < config.exact_search_below):
        return IndexPlan("flat", 0, 4 * dimension)
    if config.nlist:
        nlist = min(config.nlist, n_documents)
    else:
        # k-means trains on at most max_train_rows vectors: keep >= 64 of them per list
        nlist = min(derive_nlist(n_documents), max(1, config.max_train_rows // 64))
    budget = config.index_memory_budget_bytes - nlist * dimension * 4  # the coarse centroids come first
    for kind, code_bytes in (("ivf_flat", 4 * dimension), ("ivf_sq8", dimension), ("ivf_pq", config.pq_subquantizers)):
        if config.index_kind == kind or (
            config.index_kind == "auto" and (n_documents * (code_bytes + 8) <= budget or kind == "ivf_pq")
        ):
            return IndexPlan(kind, nlist, code_bytes + 8)
    raise AssertionError("unreachable: ivf_pq is always returned")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class VectorSource(Protocol):
    """Where the dense side's vectors come from: unit-norm float32, rows in the corpus's order."""

    @property
    def dimension(self) -> int: ...

    def prepare_documents(self, corpus: _Corpus, report: MiningReport) -> None:
        """Make every document vector available (embed what is missing); called once before any read."""
        ...

    def document_vectors(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of the corpus's document vectors."""
        ...

    def query_vectors(self, corpus: _Corpus, stop: int) -> np.ndarray:
        """The vectors of the first ``stop`` queries."""
        ...


class EncoderVectors:
    """The pipeline's source: the dense encoder through the embedding cache, so nothing is embedded twice.

    Documents are embedded (or found) in slices of ``chunk_rows`` texts; a corpus of one slice stays in memory,
    a larger one is read back slice by slice from the cache, so the full float32 matrix of a large split never
    has to exist at once.
    """

    def __init__(
        self, encoder: DenseEncoder, cache: EmbeddingCache, chunk_rows: int = 1_000_000, show_progress: bool = False
    ) -> None:
        self.encoder, self.cache, self.chunk_rows, self.show_progress = encoder, cache, chunk_rows, show_progress
        self._doc_ids: list[str] = []
        self._held: np.ndarray | None = None

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    def prepare_documents(self, corpus: _Corpus, report: MiningReport) -> None:
        report.documents_over_model_window = self.encoder.count_over_window(corpus.documents)
        self._doc_ids = corpus.doc_ids
        n = len(corpus.doc_ids)
        for start in range(0, n, self.chunk_rows):
            stop = min(n, start + self.chunk_rows)
            vectors = self.cache.embed(
                self.encoder, corpus.documents[start:stop], corpus.doc_ids[start:stop], self.show_progress
            )
            self._held = vectors if stop - start == n else None

    def document_vectors(self, start: int, stop: int) -> np.ndarray:
        if self._held is not None:
            return self._held[start:stop]
        vectors, found = self.cache.lookup(self._doc_ids[start:stop], self.dimension)
        if not found.all():
            raise RuntimeError(f"{int((~found).sum())} document embeddings vanished from {self.cache.directory}")
        return vectors

    def query_vectors(self, corpus: _Corpus, stop: int) -> np.ndarray:
        from embedkomb_pipeline.ids import text_hash

        self._held = None  # the index holds the documents now
        # queries share the cache with documents: a title that is also a document text is embedded once
        queries = corpus.queries[:stop]
        return self.cache.embed(self.encoder, queries, [text_hash(q) for q in queries], self.show_progress)


class _Corpus:
    """The split's unique documents and queries, in a deterministic order, plus query → positive docs."""

    def __init__(self, source_pairs: Path) -> None:
        pairs = pl.read_parquet(source_pairs, columns=["query_id", "doc_id", "query", "document", "source_dataset"])
        if pairs.height == 0:
            raise ValueError(f"{source_pairs} holds no source pairs: nothing to mine")
        docs = pairs.select("doc_id", "document").unique(subset="doc_id", keep="first").sort("doc_id")
        queries = (
            pairs.select("query_id", "query", "source_dataset").unique(subset="query_id", keep="first").sort("query_id")
        )
        self.doc_ids: list[str] = docs["doc_id"].to_list()
        self.documents: list[str] = docs["document"].to_list()
        self.query_ids: list[str] = queries["query_id"].to_list()
        self.queries: list[str] = queries["query"].to_list()
        self.query_datasets: list[str] = queries["source_dataset"].to_list()
        doc_index = pl.DataFrame({"doc_id": self.doc_ids, "doc_idx": np.arange(len(self.doc_ids), dtype=np.int64)})
        query_index = pl.DataFrame(
            {"query_id": self.query_ids, "query_idx": np.arange(len(self.query_ids), dtype=np.int64)}
        )
        positives = (
            pairs.select("query_id", "doc_id")
            .join(doc_index, on="doc_id")
            .join(query_index, on="query_id")
            .sort("query_idx", "doc_idx")
        )
        self.n_positives = positives.height
        # CSR layout: positives of query q are pos_docs[pos_offsets[q]:pos_offsets[q+1]]
        counts = np.bincount(positives["query_idx"].to_numpy(), minlength=len(self.query_ids))
        self.pos_offsets = np.concatenate([[0], np.cumsum(counts)])
        self.pos_docs = positives["doc_idx"].to_numpy()
        self.max_positives = int(counts.max()) if counts.size else 0

    def positives_of(self, query_idx: int) -> np.ndarray:
        return self.pos_docs[self.pos_offsets[query_idx] : self.pos_offsets[query_idx + 1]]


def _bm25_search(
    corpus: _Corpus, config: MiningConfig, depth: int, report: MiningReport
) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
    import bm25s
    import Stemmer

    tokenizer = bm25s.tokenization.Tokenizer(
        stopwords=config.bm25_stopwords, stemmer=Stemmer.Stemmer(config.bm25_stemmer)
    )
    started = time.perf_counter()
    doc_tokens = tokenizer.tokenize(corpus.documents, return_as="tuple", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(doc_tokens, show_progress=False)
    report.seconds["bm25_index"] = time.perf_counter() - started
    report.seconds["bm25_search"] = 0.0
    threads = config.threads or os.cpu_count() or 1

    def search(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        began = time.perf_counter()
        query_tokens = tokenizer.tokenize(
            corpus.queries[start:stop], update_vocab="never", return_as="string", show_progress=False
        )
        ids, scores = retriever.retrieve(query_tokens, k=depth, show_progress=False, n_threads=threads)
        report.seconds["bm25_search"] += time.perf_counter() - began
        # a zero score means no shared term: such a document was not really retrieved
        return np.where(scores > 0, ids, -1).astype(np.int64), scores

    return search


def _ivf_index(plan: IndexPlan, dimension: int, config: MiningConfig) -> faiss.IndexIVF:
    import faiss

    quantizer = faiss.IndexFlatIP(dimension)
    if plan.kind == "ivf_flat":
        return faiss.IndexIVFFlat(quantizer, dimension, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "ivf_sq8":
        return faiss.IndexIVFScalarQuantizer(
            quantizer, dimension, plan.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    if dimension % config.pq_subquantizers:
        raise ValueError(f"pq_subquantizers ({config.pq_subquantizers}) must divide the dimension ({dimension})")
    return faiss.IndexIVFPQ(quantizer, dimension, plan.nlist, config.pq_subquantizers, 8, faiss.METRIC_INNER_PRODUCT)


def build_dense_index(vectors: VectorSource, n_docs: int, config: MiningConfig, report: MiningReport) -> faiss.Index:
    """Train (on a fixed sample) and fill the index ``choose_index`` picks, one vector slice at a time."""
    import faiss

    dimension = vectors.dimension
    plan = choose_index(n_docs, dimension, config)
    index: faiss.Index
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(dimension)
        report.index_type, report.nlist, report.nprobe = plan.label, 0, 0
    else:
        ivf = _ivf_index(plan, dimension, config)
        # a fixed sample and FAISS's fixed k-means seed keep the index, and so the shard, reproducible
        train_rows = min(n_docs, 256 * plan.nlist, config.max_train_rows)
        sample = np.sort(np.random.default_rng(0).choice(n_docs, size=train_rows, replace=False))
        training = np.empty((train_rows, dimension), dtype=np.float32)
        filled = 0
        for start in range(0, n_docs, config.vector_chunk_rows):
            stop = min(n_docs, start + config.vector_chunk_rows)
            rows = sample[(sample >= start) & (sample < stop)]
            if rows.size:
                training[filled : filled + rows.size] = vectors.document_vectors(start, stop)[rows - start]
                filled += rows.size
        ivf.train(training)
        del training
        ivf.nprobe = min(config.nprobe, plan.nlist)
        report.index_type, report.nlist, report.nprobe = plan.label, plan.nlist, ivf.nprobe
        if plan.kind == "ivf_pq":
            report.index_type += f" (m={config.pq_subquantizers})"
        index = ivf
    for start in range(0, n_docs, config.vector_chunk_rows):
        index.add(vectors.document_vectors(start, min(n_docs, start + config.vector_chunk_rows)))
    report.index_bytes = n_docs * plan.bytes_per_vector  # a flat index stores no ids: its plan counts none
    report.index_bytes += plan.nlist * dimension * 4
    return index


def _dense_search(
    corpus: _Corpus,
    config: MiningConfig,
    depth: int,
    n_queries: int,
    vectors: VectorSource,
    report: MiningReport,
) -> Callable[[int, int], np.ndarray]:
    import faiss

    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    started = time.perf_counter()
    vectors.prepare_documents(corpus, report)
    report.seconds["embed_documents"] = time.perf_counter() - started
    report.peak_rss_mb_after["embed_documents"] = _peak_rss_mb()

    started = time.perf_counter()
    index = build_dense_index(vectors, len(corpus.doc_ids), config, report)
    report.seconds["dense_index"] = time.perf_counter() - started
    report.peak_rss_mb_after["dense_index"] = _peak_rss_mb()

    started = time.perf_counter()
    query_vectors = vectors.query_vectors(corpus, n_queries)
    report.seconds["embed_queries"] = time.perf_counter() - started
    report.seconds["dense_search"] = 0.0

    def search(start: int, stop: int) -> np.ndarray:
        began = time.perf_counter()
        _, ids = index.search(query_vectors[start:stop], depth)
        report.seconds["dense_search"] += time.perf_counter() - began
        return ids.astype(np.int64)

    return search


def mine_split(
    source_pairs: Path,
    out_path: Path,
    split: str,
    cycle: str,
    encoder: DenseEncoder,
    cache: EmbeddingCache,
    config: MiningConfig = MiningConfig(),
    show_progress: bool = False,
) -> MiningReport:
    """Mine one split into a candidate shard (Parquet, CANDIDATE_SCHEMA) and return what was done."""
    vectors = EncoderVectors(encoder, cache, config.vector_chunk_rows, show_progress)
    report = mine_split_with_vectors(
        source_pairs, out_path, split, cycle, vectors, encoder.identity.name, encoder.identity.revision, config
    )
    report.cache_hits, report.cache_misses = cache.stats.hits, cache.stats.misses
    return report


def mine_split_with_vectors(
    source_pairs: Path,
    out_path: Path,
    split: str,
    cycle: str,
    vectors: VectorSource,
    model_name: str,
    model_revision: str,
    config: MiningConfig = MiningConfig(),
) -> MiningReport:
    """mine_split with the dense vectors from any VectorSource (the scale benchmark's precomputed ones)."""
    started_all = time.perf_counter()
    report = MiningReport(split, cycle, model_name, model_revision)
    started = time.perf_counter()
    corpus = _Corpus(source_pairs)
    report.seconds["load"] = time.perf_counter() - started
    report.peak_rss_mb_after["load"] = _peak_rss_mb()
    n_docs = len(corpus.doc_ids)
    n_queries = min(len(corpus.query_ids), config.max_queries or len(corpus.query_ids))
    report.documents, report.queries, report.positives = n_docs, len(corpus.query_ids), corpus.n_positives
    report.queries_mined = n_queries
    report.top_k_requested = config.top_k
    # K larger than the corpus is clamped: a query can have at most N minus its positives candidates
    top_k = min(config.top_k, n_docs)
    report.top_k_effective = top_k
    depth = min(n_docs, top_k + corpus.max_positives)

    bm25 = _bm25_search(corpus, config, depth, report)
    report.peak_rss_mb_after["bm25_index"] = _peak_rss_mb()
    dense = _dense_search(corpus, config, depth, n_queries, vectors, report)

    started_fuse = time.perf_counter()
    search_seconds = 0.0
    rrf = np.zeros(n_docs, dtype=np.float64)
    bm25_rank = np.zeros(n_docs, dtype=np.int32)  # 0 = not retrieved
    dense_rank = np.zeros(n_docs, dtype=np.int32)
    hits = {"bm25": 0, "dense": 0, "rrf": 0}
    ranks_1 = np.arange(1, depth + 1, dtype=np.int32)
    contribution = 1.0 / (config.rrf_k + ranks_1.astype(np.float64))
    doc_ids = np.asarray(corpus.doc_ids, dtype=object)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.tmp")
    with pq.ParquetWriter(tmp_path, CANDIDATE_SCHEMA) as writer:
        for start in range(0, n_queries, config.query_batch_size):
            stop = min(start + config.query_batch_size, n_queries)
            before = report.seconds.get("bm25_search", 0.0) + report.seconds.get("dense_search", 0.0)
            bm_ids, _ = bm25(start, stop)
            dn_ids = dense(start, stop)
            search_seconds += report.seconds["bm25_search"] + report.seconds["dense_search"] - before
            cols: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA.names}
            for row, query_idx in enumerate(range(start, stop)):
                bm_row, dn_row = bm_ids[row], dn_ids[row]
                bm_valid, dn_valid = bm_row >= 0, dn_row >= 0
                bm_docs, dn_docs = bm_row[bm_valid], dn_row[dn_valid]
                rrf[bm_docs] += contribution[: bm_docs.size]
                rrf[dn_docs] += contribution[: dn_docs.size]
                bm25_rank[bm_docs] = ranks_1[: bm_docs.size]
                dense_rank[dn_docs] = ranks_1[: dn_docs.size]
                union = np.union1d(bm_docs, dn_docs)
                order = np.lexsort((union, -rrf[union]))
                fused = union[order]
                positives = corpus.positives_of(query_idx)
                hits["bm25"] += int(np.isin(positives, bm_docs[:top_k]).sum())
                hits["dense"] += int(np.isin(positives, dn_docs[:top_k]).sum())
                hits["rrf"] += int(np.isin(positives, fused[:top_k]).sum())
                kept = fused[~np.isin(fused, positives)][:top_k]
                n = kept.size
                query_text, dataset = corpus.queries[query_idx], corpus.query_datasets[query_idx]
                kept_ids = doc_ids[kept].tolist()
                cols["pair_id"].extend(pair_id(query_text, d, dataset) for d in kept_ids)
                cols["query_id"].extend([corpus.query_ids[query_idx]] * n)
                cols["doc_id"].extend(kept_ids)
                cols["bm25_rank"].append(bm25_rank[kept])
                cols["dense_rank"].append(dense_rank[kept])
                cols["rrf_score"].append(rrf[kept].copy())
                cols["rank"].append(np.arange(1, n + 1, dtype=np.int32))
                rrf[union] = 0.0
                bm25_rank[union] = 0
                dense_rank[union] = 0
            if not cols["pair_id"]:
                continue
            total = len(cols["pair_id"])
            bm_col = np.concatenate(cols["bm25_rank"])
            dn_col = np.concatenate(cols["dense_rank"])
            table = pa.table(
                {
                    "pair_id": pa.array(cols["pair_id"], pa.string()),
                    "query_id": pa.array(cols["query_id"], pa.string()),
                    "doc_id": pa.array(cols["doc_id"], pa.string()),
                    "split": pa.array([split] * total, pa.string()),
                    "cycle": pa.array([cycle] * total, pa.string()),
                    "bm25_rank": pa.array(bm_col, pa.int32(), mask=bm_col == 0),
                    "dense_rank": pa.array(dn_col, pa.int32(), mask=dn_col == 0),
                    "rrf_score": pa.array(np.concatenate(cols["rrf_score"]), pa.float64()),
                    "rank": pa.array(np.concatenate(cols["rank"]), pa.int32()),
                },
                schema=CANDIDATE_SCHEMA,
            )
            writer.write_table(table)
            report.candidates += total
    tmp_path.replace(out_path)
    report.seconds["fuse_and_write"] = time.perf_counter() - started_fuse - search_seconds
    report.peak_rss_mb_after["fuse_and_write"] = _peak_rss_mb()
    # recall over the positives of the queries mined (all of them unless max_queries cut the run short)
    denominator = max(int(corpus.pos_offsets[n_queries]), 1)
    report.recall_at_k = {name: count / denominator for name, count in hits.items()}
    report.seconds["total"] = time.perf_counter() - started_all
    report.peak_rss_mb = _peak_rss_mb()
    return report
