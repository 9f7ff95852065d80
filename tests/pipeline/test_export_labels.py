"""Verified exports in Hugging Face layout, the upload to a (fake) Hub, label statistics and gold pairs."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from datasets import load_dataset

from embedkomb_pipeline.labeling.agreement import cohens_kappa
from embedkomb_pipeline.labeling.export import push_to_hub, write_verified
from embedkomb_pipeline.labeling.snapshots import LABEL_SCHEMA, contributor_kappas, pairwise_kappa
from embedkomb_pipeline.sources.gold import HONEYPOT_SOURCES, QUALIFICATION_SOURCES, build_gold_pairs
from tests.support.fake_hub import FakeHub


def _rows(split: str, cycle: str, n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "query": f"query {i}",
            "document": f"document {i}",
            "label": i % 3 == 0,
            "p_relevant": 0.9 if i % 3 == 0 else 0.1,
            "n_labels": 2,
            "agreement": 1.0,
            "status": "verified",
            "pair_id": f"00000000-0000-4000-8000-{i + offset:012d}",
            "split": split,
            "cycle": cycle,
            "models": ["llama_cpp/Qwen/Qwen2.5-1.5B-Instruct/Q4_K_M"],
        }
        for i in range(n)
    ]


def test_export_loads_with_datasets_one_config_per_split(tmp_path: Path) -> None:
    write_verified(_rows("scifact_title_abstract", "c000", 6), tmp_path, "scifact_title_abstract", "c000")
    write_verified(_rows("scifact_title_abstract", "c001", 4, offset=100), tmp_path, "scifact_title_abstract", "c001")
    result = write_verified(_rows("nfcorpus_title_abstract", "c000", 3), tmp_path, "nfcorpus_title_abstract", "c000")
    assert result.rows == 3 and result.relevant == 1
    scifact = load_dataset(str(tmp_path), "scifact_title_abstract", split="train")
    assert len(scifact) == 10
    assert sorted(set(scifact["cycle"])) == ["c000", "c001"]
    nfcorpus = load_dataset(str(tmp_path), "nfcorpus_title_abstract", split="train")
    assert len(nfcorpus) == 3
    card = (tmp_path / "README.md").read_text()
    assert "license: other" in card  # SciFact (CC BY-NC) and NFCorpus (academic) differ
    assert "CC BY-NC 2.0" in card and "| scifact_title_abstract | c000, c001 | 10 |" in card


def test_reexport_replaces_rather_than_appends(tmp_path: Path) -> None:
    rows = _rows("s", "c000", 5)
    write_verified(rows, tmp_path, "s", "c000")
    write_verified(rows + rows[:2], tmp_path, "s", "c000")
    assert pl.read_parquet(tmp_path / "data" / "s" / "*.parquet").height == 5


@pytest.mark.usefixtures("hub_reachable")
def test_push_uploads_the_folder_to_the_hub_api(tmp_path: Path) -> None:
    write_verified(_rows("scifact_title_abstract", "c000", 4), tmp_path, "scifact_title_abstract", "c000")
    with FakeHub() as hub:
        url = push_to_hub(tmp_path, "embedkomb/verified-pairs", token=hub.token, endpoint=hub.url)
        stored = hub.files["embedkomb/verified-pairs"]
    assert url.startswith(f"{hub.url}/datasets/embedkomb/verified-pairs/commit/")
    assert set(stored) == {"README.md", "data/scifact_title_abstract/c000.parquet"}
    assert stored["README.md"] == (tmp_path / "README.md").read_bytes()
    assert (
        stored["data/scifact_title_abstract/c000.parquet"]
        == (tmp_path / "data" / "scifact_title_abstract" / "c000.parquet").read_bytes()
    )


@pytest.mark.usefixtures("hub_reachable")
def test_push_with_a_bad_token_fails_loudly(tmp_path: Path) -> None:
    write_verified(_rows("s", "c000", 2), tmp_path, "s", "c000")
    with FakeHub() as hub, pytest.raises(Exception, match=r"401|Invalid credentials"):
        push_to_hub(tmp_path, "embedkomb/verified-pairs", token="wrong", endpoint=hub.url)


def test_cohens_kappa_known_values() -> None:
    assert cohens_kappa([True, False, True, False], [True, False, True, False]) == 1.0
    # observed 0.5, expected 0.5 → 0
    assert cohens_kappa([True, True, False, False], [True, False, True, False]) == 0.0
    # p_o = 0.8, p_e = 0.6*0.4 + 0.4*0.6 = 0.48 → (0.8 - 0.48) / 0.52
    a = [True, True, True, False, False]
    b = [True, True, False, False, True]
    assert cohens_kappa(a * 2, b * 2) == pytest.approx((0.6 - 0.52) / 0.48)
    with pytest.raises(ValueError):
        cohens_kappa([], [])


def _labels(rows: list[tuple[int, str, int, bool]]) -> pl.DataFrame:
    base = {name: None for name in LABEL_SCHEMA}
    return pl.DataFrame(
        [
            {**base, "label_id": lid, "pair_id": pid, "contributor_id": cid, "relevant": rel, "quarantined": False}
            for lid, pid, cid, rel in rows
        ],
        schema=LABEL_SCHEMA,
    )


def test_contributor_kappas_single_out_a_random_labeler() -> None:
    truth = [i % 2 == 0 for i in range(20)]
    rows, lid = [], 0
    for i, verdict in enumerate(truth):
        for contributor, answer in ((1, verdict), (2, verdict), (3, i % 4 < 2)):
            lid += 1
            rows.append((lid, f"p{i}", contributor, answer))
    kappas = contributor_kappas(_labels(rows), min_overlap=10)
    assert [(k["contributor_a"], k["contributor_b"]) for k in kappas][-1] == (1, 2)
    assert kappas[-1]["kappa"] == 1.0
    assert kappas[0]["kappa"] == pytest.approx(0.0)
    kappa, doubled = pairwise_kappa(_labels(rows))
    assert kappa == 1.0 and doubled == 20


def test_agreement_is_split_by_model_configuration() -> None:
    from embedkomb_pipeline.labeling.snapshots import kappa_by_model_config

    rows, lid = [], 0
    for i in range(20):
        # contributors 1 and 2 run one model (they agree by construction); contributor 3 runs another
        for contributor in (1, 2) if i < 12 else (1, 3):
            lid += 1
            rows.append((lid, f"p{i}", contributor, i % 2 == 0 if contributor != 3 else i % 4 < 2))
    labels = _labels(rows).with_columns(
        pl.when(pl.col("contributor_id") == 3).then(pl.lit("other/model")).otherwise(pl.lit("one/model"))
        .alias("model_id"),
        pl.lit("Q4_K_M").alias("quantization"),
        pl.lit("0.1.0+p1").alias("annotator_version"),
    )  # fmt: skip
    split = kappa_by_model_config(labels)
    assert split["same_model_config"] == {"kappa": 1.0, "pairs": 12}
    assert split["different_model_configs"]["pairs"] == 8
    assert split["different_model_configs"]["kappa"] == pytest.approx(0.0)
    # the same model with another prompt wording is another configuration
    reworded = labels.with_columns(
        pl.when(pl.col("contributor_id") == 2).then(pl.lit("0.1.0+g1")).otherwise(pl.col("annotator_version"))
        .alias("annotator_version")
    )  # fmt: skip
    assert kappa_by_model_config(reworded)["same_model_config"]["pairs"] == 0


def test_gold_pairs_are_balanced_keyed_and_disjoint_between_uses(shared_data: Path) -> None:
    honey = build_gold_pairs(shared_data, HONEYPOT_SOURCES, per_source=20)
    qualification = build_gold_pairs(shared_data, QUALIFICATION_SOURCES, per_source=20)
    assert len(honey) == 40 and sum(r["relevant"] for r in honey) == 20
    assert build_gold_pairs(shared_data, HONEYPOT_SOURCES, per_source=20) == honey  # deterministic
    assert not {r["pair_id"] for r in honey} & {r["pair_id"] for r in qualification}
    assert {r["source"] for r in honey} == {"scifact/qrels/train", "nfcorpus/qrels/dev"}
