"""Per-query nDCG@10 from the harness's kept predictions: their mean is mteb's score, graded judgments included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedkomb_pipeline.evaluation.harness import (
    EvaluationError,
    evaluate_model,
    per_query_ndcg_at_10,
    resolve_tasks,
    task_qrels,
)
from embedkomb_pipeline.mining.embedding import default_base_model_path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def test_per_query_scores_average_to_mtebs_score_and_are_cached(shared_data: Path, tmp_path: Path) -> None:
    tasks = resolve_tasks(
        ["scifact", "msmarco-dl19-judged"], shared_data, source="local", max_corpus=200, max_queries=12
    )
    results = tmp_path / "mteb"
    # results without predictions first: asking for predictions later evaluates those tasks again
    plain = evaluate_model(default_base_model_path(), tasks, results, MODEL, precision="fp32")
    assert plain.prediction_paths == {}
    kept = evaluate_model(default_base_model_path(), tasks, results, MODEL, precision="fp32", keep_predictions=True)
    assert kept.from_cache == {t.name: False for t in tasks}
    for task in tasks:
        qrels = task_qrels(task)
        per_query = per_query_ndcg_at_10(kept.prediction_paths[task.name], qrels)
        assert len(per_query) == len(qrels) == 12
        mean = sum(per_query.values()) / len(per_query)
        assert mean == pytest.approx(kept.tasks[task.name]["ndcg_at_10"], abs=1e-4), task.name
        assert mean == pytest.approx(plain.tasks[task.name]["ndcg_at_10"], abs=1e-4), task.name
    # DL19's judgments are graded 0-3: the gains are the grades, as trec_eval's ndcg_cut takes them
    assert max(g for docs in task_qrels(tasks[1]).values() for g in docs.values()) == 3
    again = evaluate_model(default_base_model_path(), tasks, results, MODEL, precision="fp32", keep_predictions=True)
    assert all(again.from_cache.values()) and again.prediction_paths == kept.prediction_paths


def test_predictions_that_lack_judged_queries_are_refused(tmp_path: Path) -> None:
    saved = tmp_path / "Task_predictions.json"
    saved.write_text(json.dumps({"default": {"test": {"q1": {"d1": 0.9, "d2": 0.1}}}}))
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 2}}
    with pytest.raises(EvaluationError, match="lacks 1 judged queries"):
        per_query_ndcg_at_10(saved, qrels)
    assert per_query_ndcg_at_10(saved, {"q1": {"d1": 1}}) == {"q1": 1.0}
    assert per_query_ndcg_at_10(saved, {"q1": {"d2": 1}})["q1"] == pytest.approx(1 / 1.5849625, abs=1e-6)
    saved.write_text(json.dumps({"default": {"dev": {}}}))
    with pytest.raises(EvaluationError, match="no predictions for the test split"):
        per_query_ndcg_at_10(saved, qrels)
