"""Annotator-model qualification: gold set hygiene, the metrics, and the registry kombinat serves.

The end-to-end test runs the real tiny model (SmolLM2-135M Q4_1, llama.cpp) over a small gold set through a real
Dagster materialization against a real kombinat on PostgreSQL: at the mission's bar κ ≥ 0.8 the model is
registered but not admitted; with the bar visibly lowered it is admitted, with its calibrated threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import httpx
import pytest

from annotator.models import RegistryEntry
from embedkomb_pipeline.defs.evaluation import model_qualification
from embedkomb_pipeline.defs.resources import KombinatResource, LakeResource
from embedkomb_pipeline.evaluation.qualification import (
    QualificationError,
    assert_disjoint,
    offline_candidates,
    parse_sources,
    qualification_gold,
    split_gold,
)
from embedkomb_pipeline.labeling.agreement import accuracy, auc, best_threshold, cohens_kappa
from embedkomb_pipeline.sources.gold import HONEYPOT_SOURCES, QUALIFICATION_SOURCES, build_gold_pairs
from tests.annotator.conftest import TINY_ENTRY, TINY_SHA256
from tests.support.kombinat_server import running_kombinat


def test_metrics_on_known_values() -> None:
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    assert auc([0.5], [0.5]) == 0.5
    scores = [0.9, 0.7, 0.4, 0.3, 0.2, 0.1]
    gold = [True, True, True, False, False, False]
    kappa, threshold = best_threshold(scores, gold)
    assert kappa == 1.0 and 0.3 < threshold < 0.4
    assert accuracy(scores, gold, 0.5) == pytest.approx(5 / 6)
    assert cohens_kappa([s >= 0.5 for s in scores], gold) == pytest.approx(2 / 3)


def test_gold_set_is_test_qrels_split_by_query_and_never_honeypots(shared_data: Path) -> None:
    gold = qualification_gold(shared_data, QUALIFICATION_SOURCES, per_source=40, seed=0)
    assert {r["source"] for r in gold} == {"scifact/qrels/test", "msmarco-dl19-subset5k/qrels/test"}
    assert sum(r["relevant"] for r in gold) == len(gold) // 2
    honeypots = build_gold_pairs(shared_data, HONEYPOT_SOURCES, per_source=200, seed=0)
    assert_disjoint(gold, [h["pair_id"] for h in honeypots])
    with pytest.raises(QualificationError, match="also honeypots"):
        assert_disjoint(gold, [gold[0]["pair_id"]])
    calibration, evaluation = split_gold(gold, 0.5, seed=0)
    assert len(calibration) + len(evaluation) == len(gold)
    assert not {r["query"] for r in calibration} & {r["query"] for r in evaluation}
    assert {r["source"] for r in calibration} == {r["source"] for r in evaluation}
    with pytest.raises(QualificationError, match="test qrels only"):
        parse_sources(["scifact:train"])
    assert parse_sources(["nfcorpus:test:2"])[0].min_relevant_grade == 2


def test_offline_candidates_are_the_pinned_offline_models(tmp_path: Path) -> None:
    from tests.annotator.conftest import TINY_MODEL

    (tiny,) = offline_candidates(TINY_MODEL.parent, ["smollm2-135m"], sha256_of=lambda _p: TINY_SHA256)
    # what qualification would publish is, but for its figures, what the demo and the tests admit
    published = tiny.file.registry_entry(admitted=True, qualification={"note": "test model: code path only"})
    assert published == TINY_ENTRY
    assert tiny.sha256 == TINY_SHA256 and tiny.file.hub_repo == ""
    with pytest.raises(QualificationError, match="make models"):
        offline_candidates(tmp_path, ["qwen2.5-coder-1.5b"])
    with pytest.raises(QualificationError, match="pinned"):
        offline_candidates(TINY_MODEL.parent, ["smollm2-135m"], sha256_of=lambda _p: "0" * 64)


def _registry(url: str) -> dict[str, dict]:
    response = httpx.get(f"{url}/api/v1/models")
    response.raise_for_status()
    return {e["name"]: e for e in response.json()["models"]}


@pytest.mark.subprocess
def test_qualification_admits_by_kappa_and_kombinat_serves_the_decision(
    shared_data: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    lake = LakeResource(storage_dir=str(tmp_path / "lake"))
    config = {
        "models": ["smollm2-135m"],
        "models_dir": str(tiny_model_path.parent),
        # MS MARCO passages are short: 16 pairs cost the tiny model seconds, where SciFact abstracts cost minutes
        "sources": ["msmarco-dl19-subset5k:test:2"],
        "pairs_per_source": 16,
        "n_ctx": 1024,
        "threads": 2,
    }
    with running_kombinat() as server:
        resources = {"lake": lake, "kombinat": KombinatResource(url=server.url, admin_token=server.admin_token)}
        strict = dg.materialize(
            [model_qualification],
            resources=resources,
            run_config={"ops": {"model_qualification": {"config": {**config, "kappa_min": 0.8}}}},
        )
        assert strict.success
        meta = strict.asset_materializations_for_node("model_qualification")[0].metadata
        (report,) = meta["models"].value
        assert report["name"] == "smollm2-135m-q4_1" and report["error"] is None
        assert report["pairs_calibration"] + report["pairs_evaluation"] == 16 and report["scored_now"] == 16
        for key in ("auc", "accuracy_at_0_5", "kappa_at_0_5", "threshold", "kappa", "accuracy"):
            assert report[key] is not None, key
        assert report["kappa"] < 0.8 and not report["admitted"]  # the tiny model labels near chance
        assert meta["admitted"].value == [] and meta["bar_lowered"].value is False
        (check,) = strict.get_asset_check_evaluations()
        assert not check.passed
        entry = _registry(server.url)["smollm2-135m-q4_1"]
        assert entry["admitted"] is False and entry["sha256"] == TINY_SHA256
        assert entry["qualification"]["kappa"] == pytest.approx(report["kappa"])
        assert entry["qualification"]["kappa_min"] == 0.8

        # the bar visibly lowered below the model's κ: admitted, and the annotator reads the calibrated threshold
        lowered = dg.materialize(
            [model_qualification],
            resources=resources,
            run_config={"ops": {"model_qualification": {"config": {**config, "kappa_min": -1.0}}}},
        )
        meta = lowered.asset_materializations_for_node("model_qualification")[0].metadata
        (report2,) = meta["models"].value
        assert report2["scored_now"] == 0  # same model, same gold: scores come from the cache
        assert report2["kappa"] == report["kappa"] and report2["admitted"]
        assert meta["bar_lowered"].value is True and "lowered" in meta["report"].value
        entry = _registry(server.url)["smollm2-135m-q4_1"]
        assert entry["admitted"] is True
        assert RegistryEntry.from_api(entry).threshold == pytest.approx(report["threshold"])
    stored = json.loads((tmp_path / "lake" / "qualification" / "report.json").read_text())
    assert [m["name"] for m in stored["models"]] == ["smollm2-135m-q4_1"] and stored["kappa_min"] == -1.0
    assert "smollm2-135m-q4_1" in (tmp_path / "lake" / "qualification" / "report.md").read_text()
