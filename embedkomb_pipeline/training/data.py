"""The training set: per query its positives, verified hard negatives and masked (unverified) mined candidates.

Inputs, all from the lake:
- source pairs of each split (`query_id`, `doc_id`, `query`, `document`): every row is a known positive, and
  the split's documents are the corpus the exact softmax runs over;
- the verified export (`data/<split>/<cycle>.parquet`, rows carry texts, not ids: ids are recomputed with the
  same normalization and hash the pipeline keys everything by);
- mined candidate shards (`query_id`, `doc_id`, `rank`, ...) of every cycle so far: a candidate that is not yet
  verified is likely enough to be relevant (it ranked high for the query) that it must not be pushed away as a
  negative; it is masked out of the loss's denominator.

Texts are indexed once (queries and documents as lists, dictionaries from id to index) so that positives,
negatives and masks are small integer lists: the loss never needs a dense query × corpus mask.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from embedkomb_pipeline.ids import normalize_text, text_hash

Side = Literal["query", "document"]


@dataclass
class SideView:
    """One direction of training: anchors embedded by the trainable tower, the cache by the frozen one.

    positives[i] / masked[i] / negatives[i] index cache_texts for anchor i.
    """

    side: Side
    anchor_texts: list[str]
    cache_texts: list[str]
    positives: list[list[int]]
    masked: list[list[int]]
    negatives: list[list[int]]


@dataclass
class TrainingSet:
    """Queries and the document corpus with, per query, index lists into the corpus."""

    query_ids: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    positives: list[list[int]] = field(default_factory=list)  # source positive + verified relevant
    hard_negatives: list[list[int]] = field(default_factory=list)  # verified not relevant
    masked: list[list[int]] = field(default_factory=list)  # mined, not verified: suspected false negatives
    counts: dict[str, int] = field(default_factory=dict)
    # per query, how many of its leading positives are source pairs (the rest were verified); empty: all of them
    n_source: list[int] = field(default_factory=list)

    def view(self, side: Side) -> SideView:
        """Queries as anchors against the document cache, or documents (those with a positive) against queries."""
        if side == "query":
            return SideView("query", self.queries, self.documents, self.positives, self.masked, self.hard_negatives)
        pos: dict[int, list[int]] = {}
        masked: dict[int, list[int]] = {}
        negs: dict[int, list[int]] = {}
        for q, docs in enumerate(self.positives):
            for d in docs:
                pos.setdefault(d, []).append(q)
        for q, docs in enumerate(self.masked):
            for d in docs:
                masked.setdefault(d, []).append(q)
        for q, docs in enumerate(self.hard_negatives):
            for d in docs:
                negs.setdefault(d, []).append(q)
        anchors = sorted(pos)  # a document no query is positive for has nothing to be pulled toward
        return SideView(
            "document",
            [self.documents[d] for d in anchors],
            self.queries,
            [pos[d] for d in anchors],
            [masked.get(d, []) for d in anchors],
            [negs.get(d, []) for d in anchors],
        )

    def _queries_at(self, keep: Sequence[int]) -> TrainingSet:
        """The queries at these indices, with the whole corpus."""
        return TrainingSet(
            [self.query_ids[i] for i in keep],
            [self.queries[i] for i in keep],
            self.doc_ids,
            self.documents,
            [self.positives[i] for i in keep],
            [self.hard_negatives[i] for i in keep],
            [self.masked[i] for i in keep],
            {**self.counts, "queries": len(keep)},
            [self.n_source[i] for i in keep] if self.n_source else [],
        )

    def subset(self, n_queries: int, seed: int = 0) -> TrainingSet:
        """n random queries with the whole corpus kept (the softmax still runs over every document)."""
        if n_queries >= len(self.queries):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.queries)), n_queries))
        return self._queries_at(keep)

    def restricted_to(self, query_ids: Iterable[str]) -> TrainingSet:
        """Only these queries (in the set's own order), the corpus kept whole: variants of one experiment train
        on the same queries, and the exact softmax still runs over every document."""
        wanted = set(query_ids)
        keep = [i for i, q in enumerate(self.query_ids) if q in wanted]
        return self._queries_at(keep)

    def unfiltered(self) -> TrainingSet:
        """The same data as if nothing had been verified: only source positives, every mined candidate a negative.

        The ablation "fine-tuning with unfiltered mined negatives" (what hard-negative mining does without labels).
        """
        n_source = self.n_source or [len(p) for p in self.positives]
        keep = [i for i, k in enumerate(n_source) if k]  # a query only verification brought in has no source pair
        return TrainingSet(
            [self.query_ids[i] for i in keep],
            [self.queries[i] for i in keep],
            self.doc_ids,
            self.documents,
            [self.positives[i][: n_source[i]] for i in keep],
            # every mined candidate, verified relevant ones included, is a negative
            [
                sorted(set(self.masked[i]) | set(self.hard_negatives[i]) | set(self.positives[i][n_source[i] :]))
                for i in keep
            ],
            [[] for _ in keep],
            {**self.counts, "queries": len(keep), "unfiltered": 1},
            [n_source[i] for i in keep],
        )

    def relevant_masked(self) -> TrainingSet:
        """Verified-relevant candidates masked instead of pulled in as positives; verified non-relevant ones stay
        negatives. The cautious use of a weak labeler's "relevant": such a candidate is kept out of the loss
        rather than trained toward, so a wrong "relevant" costs nothing but one negative."""
        n_source = self.n_source or [len(p) for p in self.positives]
        keep = [i for i, k in enumerate(n_source) if k]
        return TrainingSet(
            [self.query_ids[i] for i in keep],
            [self.queries[i] for i in keep],
            self.doc_ids,
            self.documents,
            [self.positives[i][: n_source[i]] for i in keep],
            [self.hard_negatives[i] for i in keep],
            [sorted(set(self.masked[i]) | set(self.positives[i][n_source[i] :])) for i in keep],
            {**self.counts, "queries": len(keep), "relevant_masked": 1},
            [n_source[i] for i in keep],
        )


def export_files(export_root: Path, splits: Sequence[str], up_to_cycle: str) -> list[Path]:
    """The verified export's files of these splits for every cycle ≤ up_to_cycle (cycle keys sort in order)."""
    files = []
    for split in splits:
        folder = export_root / "data" / split
        if folder.is_dir():
            files += sorted(p for p in folder.glob("*.parquet") if p.stem <= up_to_cycle)
    return files


def _read_verified(files: Iterable[Path]) -> pl.DataFrame:
    frames = [pl.read_parquet(f, columns=["query", "document", "label", "status", "split"]) for f in files]
    frames = [f for f in frames if f.height]
    if not frames:
        return pl.DataFrame(schema={"query_id": pl.String, "doc_id": pl.String, "query": pl.String,
                                    "document": pl.String, "label": pl.Boolean})  # fmt: skip
    frame = pl.concat(frames).filter(pl.col("status") == "verified")
    # normalize here exactly as source_pairs and mining do, so the ids match theirs
    queries = [normalize_text(t) for t in frame["query"].to_list()]
    documents = [normalize_text(t) for t in frame["document"].to_list()]
    frame = pl.DataFrame(
        {
            "query_id": [text_hash(t) for t in queries],
            "doc_id": [text_hash(t) for t in documents],
            "query": queries,
            "document": documents,
            "label": frame["label"].to_list(),
        },
        schema={
            "query_id": pl.String,
            "doc_id": pl.String,
            "query": pl.String,
            "document": pl.String,
            "label": pl.Boolean,
        },
    ).unique(["query_id", "doc_id"], keep="last")  # a pair re-verified in a later cycle: the latest verdict wins
    # relevant rows first: a query new to the corpus is admitted by its positive before its negatives are read
    return frame.sort(["label", "query_id", "doc_id"], descending=[True, False, False])


def build_training_set(
    source_pairs: Sequence[Path],
    verified_files: Sequence[Path] = (),
    candidate_files: Sequence[Path] = (),
    mask_top_k: int | None = None,
) -> TrainingSet:
    """Join the source positives, the verified verdicts and the mined candidates into one TrainingSet.

    mask_top_k: mask only unverified candidates ranked ≤ this (None: all of them); the lower ranks are less
    likely relevant and stay as negatives.
    """
    ts = TrainingSet()
    doc_index: dict[str, int] = {}
    query_index: dict[str, int] = {}

    def doc(doc_id: str, text: str) -> int:
        if doc_id not in doc_index:
            doc_index[doc_id] = len(ts.doc_ids)
            ts.doc_ids.append(doc_id)
            ts.documents.append(text)
        return doc_index[doc_id]

    def query(query_id: str, text: str) -> int:
        if query_id not in query_index:
            query_index[query_id] = len(ts.query_ids)
            ts.query_ids.append(query_id)
            ts.queries.append(text)
            ts.positives.append([])
            ts.hard_negatives.append([])
            ts.masked.append([])
        return query_index[query_id]

    source_rows = 0
    for path in source_pairs:
        frame = pl.read_parquet(path, columns=["query_id", "doc_id", "query", "document"])
        source_rows += frame.height
        for qid, did, qtext, dtext in frame.iter_rows():
            q, d = query(qid, qtext), doc(did, dtext)
            if d not in ts.positives[q]:
                ts.positives[q].append(d)

    n_source = [len(p) for p in ts.positives]  # so far every positive is a source pair
    verified = _read_verified(verified_files)
    verified_keys: set[tuple[str, str]] = set()
    relevant = not_relevant = 0
    for qid, did, qtext, dtext, label in verified.iter_rows():
        verified_keys.add((qid, did))
        if qid not in query_index and not label:
            continue  # a query with no positive anywhere cannot be trained on
        q, d = query(qid, qtext), doc(did, dtext)
        if label:
            relevant += 1
            if d not in ts.positives[q]:
                ts.positives[q].append(d)
        else:
            not_relevant += 1
            if d not in ts.positives[q] and d not in ts.hard_negatives[q]:
                ts.hard_negatives[q].append(d)

    masked = 0
    for path in candidate_files:
        frame = pl.read_parquet(path, columns=["query_id", "doc_id", "rank"])
        if mask_top_k is not None:
            frame = frame.filter(pl.col("rank") <= mask_top_k)
        for qid, did, _rank in frame.iter_rows():
            # only candidates of known queries over known documents: mining draws both from the source pairs
            if (qid, did) in verified_keys or qid not in query_index or did not in doc_index:
                continue
            q, d = query_index[qid], doc_index[did]
            if d not in ts.positives[q] and d not in ts.masked[q]:
                ts.masked[q].append(d)
                masked += 1

    ts.n_source = n_source + [0] * (len(ts.query_ids) - len(n_source))  # queries verification brought in
    ts.counts = {
        "queries": len(ts.queries),
        "documents": len(ts.documents),
        "source_pairs": source_rows,
        "verified_relevant": relevant,
        "verified_not_relevant": not_relevant,
        "positives": sum(len(p) for p in ts.positives),
        "hard_negatives": sum(len(n) for n in ts.hard_negatives),
        "masked_candidates": masked,
    }
    return ts


def positive_aware_filter(
    data: TrainingSet, encode: Callable[[list[str]], np.ndarray], margin: float = 0.95
) -> TrainingSet:
    """NV-Retriever's label-free false-negative filter (Moreira et al. 2024, "TopK-PercPos"): a hard negative whose
    similarity to the query is above ``margin`` × the query's best positive similarity is taken for an unlabeled
    positive. It stops being a negative and is masked instead, so it is not pushed away from the query through the
    batch either. Similarities are cosines of ``encode`` (normalized embeddings of the base model, as the method
    uses the model being fine-tuned before training).
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    needed = sorted({d for q in range(len(data.queries)) for d in data.positives[q] + data.hard_negatives[q]})
    row = {d: i for i, d in enumerate(needed)}
    queries = encode(data.queries)
    documents = encode([data.documents[d] for d in needed]) if needed else np.zeros((0, queries.shape[1]))
    kept_negatives: list[list[int]] = []
    masked: list[list[int]] = []
    dropped = 0
    for q in range(len(data.queries)):
        similarity = documents[[row[d] for d in data.positives[q] + data.hard_negatives[q]]] @ queries[q]
        n_pos = len(data.positives[q])
        ceiling = margin * float(similarity[:n_pos].max()) if n_pos else float("inf")
        keep = [d for d, s in zip(data.hard_negatives[q], similarity[n_pos:], strict=True) if s <= ceiling]
        drop = [d for d in data.hard_negatives[q] if d not in set(keep)]
        dropped += len(drop)
        kept_negatives.append(keep)
        masked.append(sorted(set(data.masked[q]) | set(drop)))
    return TrainingSet(
        data.query_ids,
        data.queries,
        data.doc_ids,
        data.documents,
        data.positives,
        kept_negatives,
        masked,
        {**data.counts, "hard_negatives": sum(map(len, kept_negatives)), "positive_aware_dropped": dropped},
        data.n_source,
    )
