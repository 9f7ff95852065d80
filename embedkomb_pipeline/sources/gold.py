"""Gold pairs from real human relevance judgments: honeypots now, the qualification set later.

Relevant pairs are judged ones at or above a grade; clearly non-relevant pairs pair the same query with a
random document of the corpus that was not judged for it at all. Texts are normalized and keyed exactly as
mined pairs are, so a honeypot is indistinguishable from an ordinary pair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from embedkomb_pipeline.ids import normalize_text, pair_id, text_hash
from embedkomb_pipeline.sources.beir import load_beir


@dataclass(frozen=True)
class GoldSource:
    """One BEIR dataset's qrels split, and the grade from which a judgment counts as relevant."""

    dataset: str
    qrels_split: str
    min_relevant_grade: int = 1


# honeypots come from train/dev judgments; test judgments stay for evaluation and model qualification
HONEYPOT_SOURCES = (
    GoldSource("scifact", "train"),
    GoldSource("nfcorpus", "dev", min_relevant_grade=2),
)
QUALIFICATION_SOURCES = (
    GoldSource("scifact", "test"),
    GoldSource("msmarco-dl19-subset5k", "test", min_relevant_grade=2),
)


def build_gold_pairs(
    data_dir: str | Path, sources: tuple[GoldSource, ...], per_source: int = 200, seed: int = 0
) -> list[dict]:
    """Up to per_source pairs per source, half relevant, half clearly non-relevant, deterministic for a seed."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for source in sources:
        data = load_beir(source.dataset, data_dir=data_dir)
        judged = data.judged(source.qrels_split)
        doc_ids = sorted(data.corpus)
        relevant = sorted(
            (qid, did)
            for qid, docs in judged.items()
            for did, grade in docs.items()
            if grade >= source.min_relevant_grade and qid in data.queries
        )
        rng.shuffle(relevant)
        relevant = relevant[: per_source // 2]
        origin = f"{source.dataset}/qrels/{source.qrels_split}"
        for qid, did in relevant:
            rows.append(_row(data.queries[qid], data.corpus[did].text, source.dataset, True, judged[qid][did], origin))
            while True:
                other = doc_ids[rng.randrange(len(doc_ids))]
                if other not in judged[qid]:
                    break
            rows.append(_row(data.queries[qid], data.corpus[other].text, source.dataset, False, 0, origin))
    return [r for r in rows if r["query"] and r["document"]]


def _row(query: str, document: str, dataset: str, relevant: bool, grade: int, origin: str) -> dict:
    query_n, document_n = normalize_text(query), normalize_text(document)
    return {
        "pair_id": pair_id(query_n, text_hash(document_n), dataset),
        "query": query_n,
        "document": document_n,
        "relevant": relevant,
        "grade": min(grade, 3),
        "source": origin,
    }
