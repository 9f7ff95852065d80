"""Offline labels for training: the real tiny model over real mined SciFact candidates, resumable, refusing to mix
labelers, and read back as verified rows the training-set builder takes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from embedkomb_pipeline.evaluation.label_quality import PlattCalibration
from embedkomb_pipeline.labeling.offline_labels import (
    LABEL_SCHEMA,
    OfflineLabeler,
    OfflineLabelError,
    hardest_candidates,
    label_candidates,
    labeler_from_results,
    read_offline_labels,
    verified_rows,
)
from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache
from embedkomb_pipeline.mining.retrieval import MiningConfig, mine_split
from embedkomb_pipeline.training.data import build_training_set
from tests.annotator.conftest import TINY, TINY_MODEL, TINY_SHA256

pytestmark = pytest.mark.skipif(not TINY_MODEL.exists(), reason="make models-tiny")

CALIBRATION = PlattCalibration(a=1.5, b=-0.2, threshold=0.4)


@pytest.fixture(scope="module")
def candidates(small_source: Path, encoder: DenseEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("offline-labels")
    out = root / "candidates.parquet"
    mine_split(small_source, out, "small", "c000", encoder, EmbeddingCache(root / "cache", encoder.identity),
               MiningConfig(top_k=10))  # fmt: skip
    return out


def texts_of(source: Path) -> Callable[[str, str], tuple[str, str]]:
    frame = pl.read_parquet(source)
    queries = dict(zip(frame["query_id"], frame["query"], strict=True))
    documents = dict(zip(frame["doc_id"], frame["document"], strict=True))
    return lambda q, d: (queries[q], documents[d])


def tiny_labeler(calibration: PlattCalibration = CALIBRATION, prompt: str = "p1") -> OfflineLabeler:
    return OfflineLabeler(TINY.registry_name, TINY_MODEL, TINY_SHA256, prompt, calibration)


def test_hardest_candidates_takes_the_top_ranks_of_random_queries_in_a_fixed_order(candidates: Path) -> None:
    chosen = hardest_candidates(candidates, per_query=3, queries=5, seed=1)
    assert chosen.height == 15 and chosen["query_id"].n_unique() == 5
    assert chosen["rank"].max() == 3
    assert chosen.equals(hardest_candidates(candidates, per_query=3, queries=5, seed=1))
    assert chosen["query_id"].to_list() != hardest_candidates(candidates, 3, 5, seed=2)["query_id"].to_list()
    orders = chosen["query_order"].to_list()
    assert orders == sorted(orders)
    with pytest.raises(OfflineLabelError, match="per_query"):
        hardest_candidates(candidates, per_query=0, queries=5)


def test_labels_are_calibrated_resumable_and_never_mixed(candidates: Path, small_source: Path, tmp_path: Path) -> None:
    chosen = hardest_candidates(candidates, per_query=2, queries=4, seed=0)
    out = tmp_path / "labels.parquet"
    first = label_candidates(tiny_labeler(), chosen.head(4), texts_of(small_source), out, save_every=2, log=print)
    assert first.height == 4 and read_offline_labels(out).height == 4
    # a second run labels only what is missing, and keeps what was there byte for byte
    messages: list[str] = []
    labels = label_candidates(tiny_labeler(), chosen, texts_of(small_source), out, log=messages.append)
    assert "labeling 4 pairs (4 done)" in messages[0]
    assert labels.height == chosen.height and labels.head(4).equals(first)
    assert set(labels["pair_id"]) == set(chosen["pair_id"])
    assert labels.schema == pl.Schema(LABEL_SCHEMA)
    expected = CALIBRATION.apply(labels["p_raw"].to_numpy())
    assert labels["p_calibrated"].to_list() == pytest.approx(expected.tolist())
    assert labels["label"].to_list() == [p >= 0.4 for p in labels["p_calibrated"]]
    row = labels.row(0, named=True)
    assert row["prompt_version"] == "p1" and json.loads(row["calibration"])["a"] == 1.5
    # labels of another calibration or prompt are refused, and the file is left as it was
    before = out.read_bytes()
    with pytest.raises(OfflineLabelError, match="calibration"):
        label_candidates(tiny_labeler(PlattCalibration(1.0, 0.0)), chosen, texts_of(small_source), out)
    with pytest.raises(OfflineLabelError, match="prompt_version"):
        label_candidates(tiny_labeler(prompt="g1"), chosen, texts_of(small_source), out)
    assert out.read_bytes() == before
    # read back as verified rows: the training set takes relevant ones as positives, the rest as hard negatives
    rows = verified_rows(labels, [small_source])
    verified = tmp_path / "verified.parquet"
    rows.write_parquet(verified)
    training = build_training_set([small_source], [verified], [candidates])
    assert training.counts["verified_relevant"] == int(labels["label"].sum())
    assert training.counts["verified_not_relevant"] == labels.height - int(labels["label"].sum())


def test_damaged_or_foreign_label_files_are_refused(tmp_path: Path, small_source: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(OfflineLabelError, match="not a readable Parquet"):
        read_offline_labels(broken)
    foreign = tmp_path / "foreign.parquet"
    pl.DataFrame({"pair_id": ["a"]}).write_parquet(foreign)
    with pytest.raises(OfflineLabelError, match="lacks the column"):
        read_offline_labels(foreign)
    with pytest.raises(OfflineLabelError, match="does not exist"):
        read_offline_labels(tmp_path / "missing.parquet")
    stray = pl.DataFrame(
        [{**{k: None for k in LABEL_SCHEMA}, "pair_id": "x", "query_id": "nope", "doc_id": "nope", "split": "small"}],
        schema=LABEL_SCHEMA,
    )
    with pytest.raises(OfflineLabelError, match="no text"):
        verified_rows(stray, [small_source])


def test_the_labeler_comes_from_the_labeling_benchmarks_results(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "best_prompt": {TINY.registry_name: f"{TINY.registry_name}/r1"},
        "labelers": [
            {"labeler": f"{TINY.registry_name}/p1", "dataset": "dl19",
             "calibration": {"method": "platt", "a": 9.0, "b": 9.0, "threshold": 0.5}},
            {"labeler": f"{TINY.registry_name}/r1", "dataset": "scifact",
             "calibration": {"method": "platt", "a": 8.0, "b": 8.0, "threshold": 0.5}},
            {"labeler": f"{TINY.registry_name}/r1", "dataset": "dl19",
             "calibration": {"method": "platt", "a": 1.1, "b": 0.3, "threshold": 0.47}},
        ],
    }))  # fmt: skip
    labeler = labeler_from_results(results, TINY.registry_name, TINY_MODEL, TINY_SHA256)
    assert labeler.prompt_version == "r1" and labeler.calibration == PlattCalibration(1.1, 0.3, 0.47)
    with pytest.raises(OfflineLabelError, match="no best prompt for 'other'"):
        labeler_from_results(results, "other", TINY_MODEL, TINY_SHA256)
    with pytest.raises(OfflineLabelError, match="does not exist"):
        labeler_from_results(tmp_path / "none.json", TINY.registry_name, TINY_MODEL, TINY_SHA256)


def test_the_committed_benchmark_results_name_a_labeler_for_every_offline_model() -> None:
    from embedkomb_pipeline.offline_models import MODELS
    from tests.conftest import REPO_ROOT

    results = REPO_ROOT / "bench" / "results" / "labeling" / "results.json"
    for model in MODELS.values():
        labeler = labeler_from_results(results, model.registry_name, model.path(), model.sha256)
        assert labeler.prompt_version in {"p1", "g1", "r1"}
