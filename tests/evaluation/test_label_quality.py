"""The label-quality measurement: calibration, ECE, AUC, bootstrap over queries, false negatives among mined
candidates, quorums, and the real DL19 judged pool (texts, human grades, frontier labels, mining)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from embedkomb_pipeline.evaluation.label_quality import (
    HUMAN,
    JudgedPair,
    LabelQualityError,
    PairScore,
    PlattCalibration,
    ScoreRun,
    _auc,
    _pool_ranking,
    assess_labeler,
    best_labeler,
    bootstrap,
    dl19_pairs,
    expected_calibration_error,
    false_negative_recall,
    fit_platt,
    quorum_accuracy,
    read_label_file,
    split_by_query,
)
from embedkomb_pipeline.labeling.agreement import auc
from embedkomb_pipeline.sources.beir import load_beir


def test_platt_fit_recovers_a_logistic_model_and_maps_the_threshold_back_to_raw_scores() -> None:
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.01, 0.99, 20_000)
    true = PlattCalibration(a=2.0, b=-1.0)
    gold = rng.uniform(size=raw.size) < true.apply(raw)
    fitted = fit_platt(raw.tolist(), gold.tolist())
    assert fitted.a == pytest.approx(2.0, abs=0.1) and fitted.b == pytest.approx(-1.0, abs=0.1)
    cut = PlattCalibration(fitted.a, fitted.b, threshold=0.4)
    assert cut.apply([cut.raw_threshold()])[0] == pytest.approx(0.4, abs=1e-6)
    assert cut.registry_form()["method"] == "platt"
    with pytest.raises(LabelQualityError, match="both relevant and non-relevant"):
        fit_platt([0.2, 0.9], [True, True])


def test_ece_is_near_zero_when_calibrated_and_large_when_not() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(size=50_000)
    gold = rng.uniform(size=p.size) < p
    assert expected_calibration_error(p, gold) < 0.01
    assert expected_calibration_error(np.full(1000, 0.9), np.zeros(1000, dtype=bool)) == pytest.approx(0.9)


def test_rank_auc_equals_the_pairwise_definition_with_ties() -> None:
    rng = random.Random(2)
    scores = np.array([rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(300)])
    gold = np.array([rng.random() < 0.4 for _ in range(300)])
    assert _auc(scores, gold) == pytest.approx(auc(scores[gold].tolist(), scores[~gold].tolist()))


def test_bootstrap_over_queries_brackets_the_value() -> None:
    groups = [np.arange(i * 5, i * 5 + 5) for i in range(40)]
    values = np.random.default_rng(3).normal(size=200)
    estimate = bootstrap(groups, lambda picked: float(values[picked].mean()), resamples=300)
    assert estimate.low < estimate.value < estimate.high
    assert estimate.value == pytest.approx(values.mean())


def _pairs(n_queries: int = 12, per_query: int = 10) -> list[JudgedPair]:
    return [
        JudgedPair(
            pair_id=f"q{q}:{d}",
            dataset="dl19",
            query_id=f"q{q}",
            query=f"query {q}",
            document=f"doc {d}",
            human_grade=3 if d < 3 else 0,
            references={HUMAN: d < 3, "gpt-4o": d < 4},
            mined_rank=d + 1 if d < 5 else None,
        )
        for q in range(n_queries)
        for d in range(per_query)
    ]


def test_assess_fits_on_calibration_queries_and_reports_on_the_others() -> None:
    pairs = _pairs()
    calibration, evaluation = split_by_query(pairs, seed=0)
    assert len(calibration) == len(evaluation) == 6 and not calibration & evaluation
    # a perfect labeler for humans: relevant pairs score high
    scores = {p.pair_id: 0.8 + 0.01 * int(p.query_id[1:]) if p.human else 0.2 for p in pairs}
    report = assess_labeler("perfect", "dl19", pairs, scores, calibration, resamples=100)
    assert report.pairs_calibration == report.pairs_evaluation == 60
    assert report.auc_human[0] == 1.0 and report.kappa[HUMAN][0] == 1.0
    assert report.kappa["gpt-4o"][0] < 1.0  # GPT-4o also calls the 4th document relevant
    assert report.reference_kappa_vs_human["gpt-4o"][0] == pytest.approx(report.kappa["gpt-4o"][0])
    # every relevant mined candidate scores above every non-relevant one: all flagged at either keep rate
    assert report.false_negatives["flagged_at_keep_95"] == 1.0
    assert report.false_negatives["gpt-4o_flagged"] == 1.0 and report.false_negatives["gpt-4o_keeps"] == 0.5
    with pytest.raises(LabelQualityError, match="calibrate against"):
        assess_labeler("perfect", "dl19", pairs, scores, calibration, resamples=10, calibrate_against="gpt-9")


def test_false_negative_recall_uses_the_non_relevant_quantiles() -> None:
    scores = np.array([0.1] * 90 + [0.5] * 5 + [0.95] * 5 + [0.5, 0.99])
    human = np.array([False] * 100 + [True, True])
    out = false_negative_recall(scores, human, {HUMAN: human})
    assert out["candidates"] == 102 and out["relevant"] == 2
    assert out["flagged_at_keep_90"] == 1.0  # the 90% quantile of the non-relevant scores is 0.14
    assert out["flagged_at_keep_95"] == 0.5  # the 95% quantile is 0.52: only the relevant 0.99 is above it


def test_best_labeler_chooses_on_calibration_queries_only() -> None:
    pairs = _pairs()
    calibration, _ = split_by_query(pairs, seed=0)
    good = {p.pair_id: PairScore(0.9 if p.human else 0.1, 10, 5, 0.1, 1.0) for p in pairs}
    # "flattering" is perfect on the evaluation queries only, which the choice must not see
    flattering = {
        p.pair_id: PairScore(
            0.5 if (p.dataset, p.query_id) in calibration else (0.9 if p.human else 0.1), 10, 5, 0.1, 1
        )
        for p in pairs
    }
    runs = [ScoreRun("m/flattering", flattering), ScoreRun("m/good", good)]
    chosen = best_labeler(runs, pairs, calibration)
    assert chosen is not None and chosen.labeler == "m/good"
    assert ScoreRun("m/good", good).pairs_per_second == pytest.approx(10.0)


def test_quorum_of_one_model_twice_verifies_everything_and_two_models_verify_where_they_agree() -> None:
    pairs = _pairs(2, 4)
    a = {p.pair_id: p.human for p in pairs}
    b = {p.pair_id: not p.human if p.query_id == "q0" else p.human for p in pairs}
    rows = {tuple(r["labelers"]): r for r in quorum_accuracy({"a": a, "b": b}, pairs, [HUMAN])}
    assert rows[("a", "a")]["coverage"] == 1.0 and rows[("a", "a")]["accuracy_human"] == 1.0
    assert rows[("a", "b")]["coverage"] == 0.5 and rows[("a", "b")]["accuracy_human"] == 1.0
    assert rows[("b", "b")]["accuracy_human"] == 0.5


def test_label_files_keep_the_first_label_and_refuse_malformed_ones(tmp_path: Path) -> None:
    good = tmp_path / "a.tsv"
    good.write_text("query-id\tcorpus-id\tscore\n1\t2\t3\n1\t2\t0\n")
    assert read_label_file(good) == {("1", "2"): 3}
    bad = tmp_path / "b.tsv"
    bad.write_text("qid\tdid\tgrade\n")
    with pytest.raises(LabelQualityError, match="expected the header"):
        read_label_file(bad)
    bad.write_text("query-id\tcorpus-id\tscore\n1\t2\tmaybe\n")
    with pytest.raises(LabelQualityError, match=r"b.tsv:2: score 'maybe' is not a number"):
        read_label_file(bad)
    with pytest.raises(LabelQualityError, match="does not exist"):
        read_label_file(tmp_path / "none.tsv")


def test_the_whole_dl19_pool_and_its_frontier_labels_load(shared_data: Path) -> None:
    everything = dl19_pairs(shared_data, per_query=0)
    assert len(everything) == 9260
    assert all({HUMAN, "gpt-4o", "gpt-4"} <= set(p.references) for p in everything)
    human = [p.human for p in everything]
    gpt4o = [p.references["gpt-4o"] for p in everything]
    from embedkomb_pipeline.labeling.agreement import cohens_kappa

    # PROVENANCE.md's measured agreement of GPT-4o (UMBRELA) with the NIST assessors on the whole pool
    assert cohens_kappa(gpt4o, human) == pytest.approx(0.524, abs=0.001)


def test_mining_the_judged_pool_ranks_a_querys_judged_passages_as_the_pipeline_does(shared_data: Path) -> None:
    data = load_beir("msmarco-dl19-judged", data_dir=shared_data)
    judged = data.judged("test")
    qids = sorted(judged)[:2]
    documents = {d: data.corpus[d].text for q in qids for d in judged[q]}
    ranking = _pool_ranking(data.queries, documents, {q: judged[q] for q in qids}, cache_dir=None)
    for q in qids:
        assert sorted(ranking[q]) == sorted(judged[q])  # every judged passage, once
        top, rest = ranking[q][:10], ranking[q][10:]
        mean_grade = sum(judged[q][d] for d in top) / 10
        # mined candidates are the hard ones: far more often judged relevant than the rest of the pool
        assert mean_grade > sum(judged[q][d] for d in rest) / len(rest)
    assert not math.isnan(mean_grade)
