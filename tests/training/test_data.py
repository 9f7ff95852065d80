"""The training-set builder on a lake cut from real SciFact."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedkomb_pipeline.ids import text_hash
from embedkomb_pipeline.labeling.export import write_verified
from embedkomb_pipeline.training.data import build_training_set, export_files
from tests.training.conftest import SPLIT, Lake


def test_positives_negatives_and_masks(lake: Lake) -> None:
    ts = build_training_set([lake.source], export_files(lake.export_root, [SPLIT], "c000"), [lake.candidates])
    relevant = [r for r in lake.verified_rows if r["label"]]
    not_relevant = [r for r in lake.verified_rows if not r["label"]]
    assert relevant and not_relevant, "the fixture must verify pairs both ways"
    assert ts.counts["verified_relevant"] == len(relevant)
    assert ts.counts["verified_not_relevant"] == len(not_relevant)
    assert len(ts.documents) == len(ts.doc_ids) == len(set(ts.doc_ids))
    qi = {q: i for i, q in enumerate(ts.query_ids)}
    di = {d: i for i, d in enumerate(ts.doc_ids)}
    verified = {(text_hash(r["query"]), text_hash(r["document"])) for r in lake.verified_rows}
    for r in relevant:
        q, d = qi[text_hash(r["query"])], di[text_hash(r["document"])]
        assert d in ts.positives[q] and ts.positives[q][0] != d  # the source positive comes first
        assert d not in ts.masked[q] and d not in ts.hard_negatives[q]
    for r in not_relevant:
        q, d = qi[text_hash(r["query"])], di[text_hash(r["document"])]
        assert d in ts.hard_negatives[q] and d not in ts.masked[q] and d not in ts.positives[q]
    unverified = [c for c in lake.candidate_rows if (c["query_id"], c["doc_id"]) not in verified]
    assert ts.counts["masked_candidates"] == len({(c["query_id"], c["doc_id"]) for c in unverified})
    for c in unverified:
        assert di[c["doc_id"]] in ts.masked[qi[c["query_id"]]]
    # every query keeps its source positive; a query's document view is the transpose
    assert all(p for p in ts.positives)
    view = ts.view("document")
    assert view.cache_texts == ts.queries
    anchor_of = {text: k for k, text in enumerate(view.anchor_texts)}
    for r in relevant:
        k = anchor_of[ts.documents[di[text_hash(r["document"])]]]
        assert qi[text_hash(r["query"])] in view.positives[k]


def test_without_labels_every_candidate_is_masked_and_unfiltered_makes_them_negatives(lake: Lake) -> None:
    ts = build_training_set([lake.source], [], [lake.candidates])
    assert ts.counts["verified_relevant"] == 0
    assert all(len(p) == 1 for p in ts.positives)
    assert ts.counts["masked_candidates"] == len(lake.candidate_rows)
    top2 = build_training_set([lake.source], [], [lake.candidates], mask_top_k=2)
    assert top2.counts["masked_candidates"] == sum(1 for c in lake.candidate_rows if c["rank"] <= 2)
    labeled = build_training_set([lake.source], export_files(lake.export_root, [SPLIT], "c000"), [lake.candidates])
    raw = labeled.unfiltered()
    assert all(len(p) == 1 for p in raw.positives) and not any(raw.masked)
    # every mined candidate (verified relevant ones included) is a negative in the unfiltered ablation
    assert sum(len(n) for n in raw.hard_negatives) == len(lake.candidate_rows)


def test_later_cycles_unnormalized_text_and_new_queries(lake: Lake, tmp_path: Path) -> None:
    export_root = tmp_path / "export"
    r = dict(lake.verified_rows[0])
    write_verified(lake.verified_rows, export_root, SPLIT, "c000")
    # c001: the same pair re-verified the other way, with its texts spaced differently (ids must still match)
    flipped = {**r, "label": not r["label"], "cycle": "c001", "pair_id": r["pair_id"] + "-x",
               "query": "  " + r["query"].replace(" ", "  "), "document": r["document"] + "\n"}  # fmt: skip
    new_query = {**r, "query": "A query no source pair has", "document": "A document no source pair has.",
                 "label": True, "cycle": "c001", "pair_id": "new"}  # fmt: skip
    write_verified([flipped, new_query], export_root, SPLIT, "c001")
    assert [p.stem for p in export_files(export_root, [SPLIT], "c000")] == ["c000"]
    files = export_files(export_root, [SPLIT], "c001")
    assert [p.stem for p in files] == ["c000", "c001"]
    ts = build_training_set([lake.source], files, [lake.candidates])
    q = ts.query_ids.index(text_hash(r["query"]))
    d = ts.doc_ids.index(text_hash(r["document"]))
    assert (d in ts.positives[q]) == (not r["label"])  # the later verdict wins
    assert (d in ts.hard_negatives[q]) == r["label"]
    nq = ts.query_ids.index(text_hash("A query no source pair has"))
    assert ts.documents[ts.positives[nq][0]] == "A document no source pair has."
    # the unfiltered ablation keeps source positives only, and drops the query only verification brought in
    raw = ts.unfiltered()
    assert text_hash("A query no source pair has") not in raw.query_ids
    assert len(raw.queries) == len(ts.queries) - 1
    assert all(len(p) == k for p, k in zip(raw.positives, raw.n_source, strict=True))
    rq = raw.query_ids.index(text_hash(r["query"]))
    assert (d in raw.hard_negatives[rq]) and d not in raw.positives[rq]


def test_restricted_to_keeps_the_whole_corpus_and_the_sets_own_order(lake: Lake) -> None:
    ts = build_training_set([lake.source], export_files(lake.export_root, [SPLIT], "c000"), [lake.candidates])
    wanted = [ts.query_ids[7], ts.query_ids[2], "not a query"]
    sub = ts.restricted_to(wanted)
    assert sub.query_ids == [ts.query_ids[2], ts.query_ids[7]] and sub.counts["queries"] == 2
    assert sub.documents is ts.documents and sub.doc_ids is ts.doc_ids
    assert sub.positives == [ts.positives[2], ts.positives[7]] and sub.masked == [ts.masked[2], ts.masked[7]]
    assert sub.hard_negatives == [ts.hard_negatives[2], ts.hard_negatives[7]]


def test_positive_aware_filter_masks_negatives_too_close_to_the_positive(lake: Lake) -> None:
    import numpy as np

    from embedkomb_pipeline.mining.embedding import DenseEncoder, default_base_model_path
    from embedkomb_pipeline.training.data import positive_aware_filter

    raw = build_training_set([lake.source], [], [lake.candidates]).unfiltered()
    encoder = DenseEncoder(default_base_model_path(), precision="fp32")
    encode = encoder.model.encode
    filtered = positive_aware_filter(raw, lambda texts: encode(texts, normalize_embeddings=True), margin=0.95)
    assert filtered.positives == raw.positives and filtered.queries == raw.queries
    dropped = filtered.counts["positive_aware_dropped"]
    assert 0 < dropped < sum(map(len, raw.hard_negatives)), "real data: some candidates are that close, not all"
    q_emb = encode(raw.queries, normalize_embeddings=True)
    d_emb = encode(raw.documents, normalize_embeddings=True)
    for q in range(len(raw.queries)):
        ceiling = 0.95 * max(float(d_emb[d] @ q_emb[q]) for d in raw.positives[q])
        for d in raw.hard_negatives[q]:
            close = float(d_emb[d] @ q_emb[q]) > ceiling + 1e-5
            far = float(d_emb[d] @ q_emb[q]) < ceiling - 1e-5
            assert not close or (d in filtered.masked[q] and d not in filtered.hard_negatives[q])
            assert not far or (d in filtered.hard_negatives[q] and d not in filtered.masked[q])
    # margin 1.0 drops only negatives more similar than the positive itself
    strict = positive_aware_filter(raw, lambda texts: encode(texts, normalize_embeddings=True), margin=1.0)
    assert strict.counts["positive_aware_dropped"] < dropped
    assert np.isfinite(q_emb).all()
    with pytest.raises(ValueError, match="margin"):
        positive_aware_filter(raw, lambda texts: encode(texts), margin=0)


def test_every_variant_sees_the_same_queries_and_candidates_treated_its_own_way(lake: Lake) -> None:
    from embedkomb_pipeline.training.variants import VARIANTS, Hyperparameters, train_config, training_data

    labeled = build_training_set([lake.source], export_files(lake.export_root, [SPLIT], "c000"), [lake.candidates])
    unlabeled = build_training_set([lake.source], [], [lake.candidates])

    def encode(texts: list[str]):  # a stand-in that puts every text at the same point: all candidates "close"
        import numpy as np

        return np.ones((len(texts), 4)) / 2.0

    data = {name: training_data(name, labeled, unlabeled, encode) for name in list(VARIANTS)[1:]}
    assert all(d.queries == labeled.queries for d in (data["infonce_labels"], data["exact_masked"]))
    assert data["infonce_labels"] is data["exact_labels"] is labeled
    assert data["exact_masked"] is unlabeled and not any(unlabeled.hard_negatives)
    assert sum(map(len, data["unfiltered"].hard_negatives)) == len(lake.candidate_rows)
    assert not any(data["positive_aware"].hard_negatives)  # equal similarity: above 95% of the positive's
    # verified relevant candidates: positives for exact_labels, masked (never positives) for exact_labels_masked
    cautious = data["exact_labels_masked"]
    assert cautious.queries == labeled.queries and cautious.hard_negatives == labeled.hard_negatives
    verified_relevant = [set(p[k:]) for p, k in zip(labeled.positives, labeled.n_source, strict=True)]
    assert any(verified_relevant)
    for q, relevant in enumerate(verified_relevant):
        assert relevant <= set(cautious.masked[q]) and not relevant & set(cautious.positives[q])
        assert set(labeled.masked[q]) <= set(cautious.masked[q])
    hp = Hyperparameters(steps=10, batch_size=8)
    infonce, exact = train_config("unfiltered", hp, 3, 40), train_config("exact_labels", hp, 3, 40)
    assert (infonce.loss, infonce.phases, infonce.max_steps_per_phase) == ("infonce", 1, 10)
    assert (exact.loss, exact.phases, exact.max_steps_per_phase) == ("exact", 2, 5)
    assert infonce.epochs_per_phase * 40 >= 10 * 8 and infonce.seed == exact.seed == 3
    assert infonce.lr == exact.lr and infonce.batch_size == exact.batch_size
    with pytest.raises(ValueError, match="no training data for variant 'base'"):
        training_data("base", labeled, unlabeled, encode)
    with pytest.raises(ValueError, match="not trained"):
        train_config("base", hp, 0, 40)
