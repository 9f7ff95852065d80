"""mteb_scores materializes for two cycles through Dagster, shows the trend and guards against regressions.

Cycle c000's checkpoint is trained for real by the checkpoint asset (two steps on a tiny verified export);
cycle c001's is a planted worse model: c000's weights with Gaussian noise added. SciFact is capped so the test
stays short (a capped task is named SciFact-cap…, never confused with the published task).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embedkomb_pipeline.defs.evaluation import mteb_scores
from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME
from embedkomb_pipeline.defs.resources import (
    CheckpointPublisherResource,
    DenseModelResource,
    LakeResource,
    QualityThresholds,
)
from embedkomb_pipeline.defs.training import checkpoint
from tests.training.conftest import build_lake

TASK = "SciFact-cap400q60"


def plant_worse_model(good: Path, out: Path, noise: float = 0.6, seed: int = 0) -> None:
    """A copy of the model whose every weight matrix got noise of `noise` times its own spread."""
    model = SentenceTransformer(str(good), device="cpu", local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * noise)
    if out.exists():
        shutil.rmtree(out)
    model.save(str(out))


def scores_run_config(**overrides: object) -> dict:
    config = {"tasks": ["scifact"], "source": "local", "max_corpus": 400, "max_queries": 60, **overrides}
    return {"ops": {"mteb_scores": {"config": config}}}


@pytest.mark.slow
def test_mteb_scores_for_two_cycles_shows_the_trend_and_catches_a_regression(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("lake")
    build_lake(root, shared_data, n=64, max_chars=160)
    lake = LakeResource(storage_dir=str(root))
    resources = {
        "lake": lake,
        "dense_model": DenseModelResource(),
        "quality": QualityThresholds(),
        "checkpoint_publisher": CheckpointPublisherResource(),  # unconfigured: no Hub push
    }
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, ["c000", "c001"])
    trained = dg.materialize(
        [checkpoint],
        partition_key="c000",
        resources=resources,
        run_config={"ops": {"checkpoint": {"config": {"phases": 2, "max_steps_per_phase": 1, "batch_size": 16,
                                                       "max_seq_length": 48, "track_objective": False}}}},
        instance=instance,
    )  # fmt: skip
    assert trained.success
    plant_worse_model(lake.checkpoint_dir("c000") / "model", lake.checkpoint_dir("c001") / "model")

    first = dg.materialize(
        [mteb_scores], partition_key="c000", resources=resources, run_config=scores_run_config(), instance=instance
    )
    assert first.success
    meta0 = first.asset_materializations_for_node("mteb_scores")[0].metadata
    assert meta0["base_from_cache"].value is False
    assert meta0["cycles_in_trend"].value == 1
    (check0,) = first.get_asset_check_evaluations()
    assert check0.passed and "first scored cycle" in check0.metadata["note"].value
    good = meta0[f"{TASK}/ndcg_at_10"].value
    base = meta0[f"{TASK}/base/ndcg_at_10"].value
    assert 0.3 < good < 1.0 and 0.3 < base < 1.0  # two training steps barely move the model

    second = dg.materialize(
        [mteb_scores],
        partition_key="c001",
        resources=resources,
        run_config=scores_run_config(),
        instance=instance,
        raise_on_error=False,
    )
    assert second.success  # a failed ERROR check marks the check, the materialization itself stands
    meta1 = second.asset_materializations_for_node("mteb_scores")[0].metadata
    assert meta1["base_from_cache"].value is True  # same base model fingerprint: not encoded twice
    assert meta1[f"{TASK}/base/ndcg_at_10"].value == base
    worse = meta1[f"{TASK}/ndcg_at_10"].value
    assert worse < good - 0.01
    (check1,) = second.get_asset_check_evaluations()
    assert not check1.passed
    assert check1.metadata["previous_cycle"].value == "c000"
    assert check1.metadata["drops"].value[TASK] == pytest.approx(good - worse)
    # the trend: both cycles in the table, the plot inline
    table = meta1["scores"].value
    rows = [line for line in table.splitlines() if line.startswith("| c0")]
    assert [row.split("|")[1].strip() for row in rows] == ["c000", "c001"]
    assert f"{100 * good:.2f}" in rows[0] and f"{100 * worse:.2f}" in rows[1]
    assert meta1["trend"].value.startswith("![nDCG@10 across cycles](data:image/png;base64,iVBOR")
    assert meta1["cycles_in_trend"].value == 2
    # scores kept in the lake per cycle, mteb's own results beside them
    stored = json.loads((root / "mteb_scores" / "c001.json").read_text())
    assert stored["checkpoint"]["tasks"][TASK]["ndcg_at_10"] == worse
    revision = stored["checkpoint"]["revision"]
    assert (root / "mteb" / "results" / "embedkomb__checkpoint-c001" / revision / f"{TASK}.json").exists()

    # a generous tolerance lets the same drop pass; nothing is re-encoded
    lenient = dg.materialize(
        [mteb_scores],
        partition_key="c001",
        resources=resources,
        run_config=scores_run_config(regression_tolerance=1.0),
        instance=instance,
    )
    (check2,) = lenient.get_asset_check_evaluations()
    assert check2.passed
    meta2 = lenient.asset_materializations_for_node("mteb_scores")[0].metadata
    assert meta2[f"{TASK}/ndcg_at_10"].value == worse and meta2["seconds"].value < 30
