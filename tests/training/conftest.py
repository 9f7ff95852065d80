"""A tiny lake cut from real SciFact: source pairs, a lexically mined candidate shard, a verified export.

The verdicts in the export are a deterministic rule (word overlap), standing in for volunteers' labels: the
training code only needs real texts and a realistic shape (some candidates verified either way, most not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkomb_pipeline.ids import normalize_text, pair_id, text_hash
from embedkomb_pipeline.labeling.export import write_verified
from embedkomb_pipeline.mining.retrieval import CANDIDATE_SCHEMA
from embedkomb_pipeline.sources.pairs import write_source_pairs
from tests.pipeline.conftest import scifact_rows

SPLIT = "scifact_title_abstract"
_WORD = re.compile(r"[a-z0-9]{4,}")


@dataclass
class Lake:
    root: Path
    source: Path
    candidates: Path
    export_root: Path
    verified_rows: list[dict]
    candidate_rows: list[dict]


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def build_lake(root: Path, shared_data: Path, n: int = 160, max_chars: int = 200, top_k: int = 5) -> Lake:
    rows = scifact_rows(shared_data, n, max_chars=max_chars)
    source = root / "source_pairs" / f"{SPLIT}.parquet"
    source.parent.mkdir(parents=True)
    write_source_pairs([rows], SPLIT, source)
    queries = [normalize_text(q) for q in rows["query"]]
    docs = [normalize_text(d) for d in rows["document"]]
    doc_words = [_words(d) for d in docs]
    # candidates: each title's top-k other abstracts by word overlap (a stand-in for BM25, same shape)
    candidate_rows: list[dict] = []
    for qi, q in enumerate(queries):
        qw = _words(q)
        scored = sorted(((len(qw & dw), -di) for di, dw in enumerate(doc_words) if di != qi), reverse=True)[:top_k]
        for rank, (_overlap, neg_di) in enumerate(scored, start=1):
            di = -neg_di
            candidate_rows.append(
                {
                    "pair_id": pair_id(q, text_hash(docs[di]), "scifact"),
                    "query_id": text_hash(q),
                    "doc_id": text_hash(docs[di]),
                    "split": SPLIT,
                    "cycle": "c000",
                    "bm25_rank": rank,
                    "dense_rank": None,
                    "rrf_score": 1 / (60 + rank),
                    "rank": rank,
                    "_query": q,
                    "_document": docs[di],
                    "_overlap": _overlap,
                }
            )
    candidates = root / "mining" / SPLIT / "c000" / "candidates.parquet"
    candidates.parent.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("_")} for r in candidate_rows],
                             schema=CANDIDATE_SCHEMA),
        candidates,
    )  # fmt: skip
    # verified: the first two candidates of every other query; "relevant" when they share ≥ 3 words
    verified_rows = []
    for r in candidate_rows:
        if queries.index(r["_query"]) % 2 == 0 and r["rank"] <= 2:
            verified_rows.append(
                {
                    "query": r["_query"],
                    "document": r["_document"],
                    "label": r["_overlap"] >= 3,
                    "p_relevant": 0.9 if r["_overlap"] >= 3 else 0.1,
                    "n_labels": 2,
                    "agreement": 1.0,
                    "status": "verified",
                    "pair_id": r["pair_id"],
                    "split": SPLIT,
                    "cycle": "c000",
                    "models": ["rule/word-overlap"],
                }
            )
    export_root = root / "exports" / "verified"
    write_verified(verified_rows, export_root, SPLIT, "c000")
    return Lake(root, source, candidates, export_root, verified_rows, candidate_rows)


@pytest.fixture(scope="session")
def lake(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Lake:
    return build_lake(tmp_path_factory.mktemp("lake"), shared_data)
