"""Annotator-model qualification: judged-pair hygiene, references, the metrics, and the registry kombinat serves.

The end-to-end test runs the real tiny model (SmolLM2-135M Q4_1, llama.cpp) with two prompt versions over a small
DL19 judged-pool sample through a real Dagster materialization against a real kombinat on PostgreSQL: at the
mission's bar (κ ≥ 0.8 against GPT-4o's labels) the model is registered but not admitted; with the bar visibly
lowered it is admitted, with the prompt version and the calibration the qualification chose.
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
from embedkomb_pipeline.evaluation.label_quality import split_by_query
from embedkomb_pipeline.evaluation.qualification import (
    QualificationError,
    assert_disjoint,
    offline_candidates,
    parse_sources,
    qualification_pairs,
    resolve_reference,
)
from embedkomb_pipeline.labeling.agreement import accuracy, auc, best_threshold, cohens_kappa
from embedkomb_pipeline.sources.gold import HONEYPOT_SOURCES, GoldSource, build_gold_pairs
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


def test_judged_pairs_carry_human_and_frontier_verdicts_split_by_query_and_never_honeypots(
    shared_data: Path, tmp_path: Path
) -> None:
    pairs = qualification_pairs(
        shared_data, dl19_per_query=4, sources=[GoldSource("scifact", "test")], per_source=20, seed=0
    )
    dl19 = [p for p in pairs if p.dataset == "dl19"]
    assert len(dl19) == 43 * 4 and len({p.query_id for p in dl19}) == 43  # every judged query, 4 pairs each
    assert all(set(p.references) == {"human", "gpt-4o", "gpt-4"} for p in dl19)
    assert all(p.human == (p.human_grade >= 2) for p in dl19)  # TREC's binary cut
    scifact = [p for p in pairs if p.dataset == "scifact"]
    assert len(scifact) == 20 and sum(p.human for p in scifact) == 10
    honeypots = build_gold_pairs(shared_data, HONEYPOT_SOURCES, per_source=200, seed=0)
    assert_disjoint(pairs, [h["pair_id"] for h in honeypots])
    with pytest.raises(QualificationError, match="also honeypots"):
        assert_disjoint(pairs, [scifact[0].pair_id.split(":", 1)[1]])
    calibration, evaluation = split_by_query(pairs, seed=0)
    assert not calibration & evaluation
    assert {d for d, _ in calibration} == {d for d, _ in evaluation} == {"dl19", "scifact"}
    with pytest.raises(QualificationError, match="test qrels only"):
        parse_sources(["scifact:train"])
    assert parse_sources(["nfcorpus:test:2"])[0].min_relevant_grade == 2

    # a reference is a frontier judge, humans, or a label file for the same pool
    assert resolve_reference("gpt-4o") == ("gpt-4o", None) and resolve_reference("human") == ("human", None)
    with pytest.raises(QualificationError, match="expected one of human, gpt-4o, gpt-4"):
        resolve_reference("claude")
    with pytest.raises(QualificationError, match="does not exist"):
        resolve_reference(str(tmp_path / "missing.tsv"))
    mine = tmp_path / "my-judge.tsv"
    first = dl19[0]
    _, qid, did = first.pair_id.split(":")
    mine.write_text(f"query-id\tcorpus-id\tscore\n{qid}\t{did}\t3\n{qid}\t{did}\t0\n")
    (with_file,) = [
        p
        for p in qualification_pairs(shared_data, reference=str(mine), dl19_per_query=4, dl19_max_queries=1)
        if p.pair_id == first.pair_id
    ]
    assert with_file.references["my-judge"] is True  # the first label of a pair counts


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
def test_qualification_admits_by_kappa_against_the_reference_and_kombinat_serves_prompt_and_calibration(
    shared_data: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    lake = LakeResource(storage_dir=str(tmp_path / "lake"))
    config = {
        "models": ["smollm2-135m"],
        "models_dir": str(tiny_model_path.parent),
        # 10 DL19 queries × 4 short passages × 2 prompt versions: seconds for the tiny model
        "dl19_per_query": 4,
        "dl19_max_queries": 10,
        "prompt_versions": ["p1", "g1"],
        "n_ctx": 1024,
        "threads": 2,
        "resamples": 50,
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
        assert report["reference"] == "gpt-4o" and meta["reference"].value == "gpt-4o"
        assert report["pairs_calibration"] + report["pairs_evaluation"] == 40 and report["scored_now"] == 80
        assert set(report["prompt_auc_calibration"]) == {"p1", "g1"}
        chosen = max(report["prompt_auc_calibration"], key=report["prompt_auc_calibration"].get)
        assert report["prompt_version"] == chosen  # the best on the calibration queries
        assert set(report["kappa_by_reference"]) == {"human", "gpt-4o", "gpt-4"}
        for key in ("auc", "kappa", "kappa_human", "threshold", "ece_calibrated"):
            assert report[key] is not None, key
        calibration = report["calibration"]
        assert calibration["method"] == "platt" and 0 < calibration["threshold"] < 1
        assert report["kappa"] < 0.8 and not report["admitted"]  # the tiny model labels near chance
        assert meta["admitted"].value == [] and meta["bar_lowered"].value is False
        (check,) = strict.get_asset_check_evaluations()
        assert not check.passed
        entry = _registry(server.url)["smollm2-135m-q4_1"]
        assert entry["admitted"] is False and entry["sha256"] == TINY_SHA256
        assert entry["prompt_version"] == report["prompt_version"]
        assert entry["calibration"] == pytest.approx(calibration)
        assert entry["qualification"]["kappa"] == pytest.approx(report["kappa"])
        assert entry["qualification"]["reference"] == "gpt-4o" and entry["qualification"]["kappa_min"] == 0.8

        # the bar visibly lowered below the model's κ: admitted; the annotator renders the chosen wording
        lowered = dg.materialize(
            [model_qualification],
            resources=resources,
            run_config={"ops": {"model_qualification": {"config": {**config, "kappa_min": -1.0}}}},
        )
        meta = lowered.asset_materializations_for_node("model_qualification")[0].metadata
        (report2,) = meta["models"].value
        assert report2["scored_now"] == 0  # same model, same pairs, same prompts: scores come from the cache
        assert report2["kappa"] == report["kappa"] and report2["admitted"]
        assert meta["bar_lowered"].value is True and "lowered" in meta["report"].value
        entry = _registry(server.url)["smollm2-135m-q4_1"]
        assert entry["admitted"] is True
        annotator_view = RegistryEntry.from_api(entry)
        assert annotator_view.prompt_version == report["prompt_version"]
        assert annotator_view.threshold == pytest.approx(report["threshold"])
    stored = json.loads((tmp_path / "lake" / "qualification" / "report.json").read_text())
    assert [m["name"] for m in stored["models"]] == ["smollm2-135m-q4_1"] and stored["kappa_min"] == -1.0
    assert "smollm2-135m-q4_1" in (tmp_path / "lake" / "qualification" / "report.md").read_text()
