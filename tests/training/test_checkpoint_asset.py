"""The checkpoint asset materializes for real in Dagster on a tiny verified export, is pushed to a (fake) Hub
model repository with its cycle as a tag, and mining picks it up next."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME
from embedkomb_pipeline.defs.resources import CheckpointPublisherResource, DenseModelResource, LakeResource
from embedkomb_pipeline.defs.training import checkpoint
from tests.support.fake_hub import FakeHub
from tests.training.conftest import SPLIT, build_lake


def test_definitions_include_the_checkpoint_asset_per_cycle() -> None:
    from embedkomb_pipeline.definitions import defs

    loaded = defs()
    assets_def = loaded.resolve_assets_def("checkpoint")
    assert isinstance(assets_def.partitions_def, dg.DynamicPartitionsDefinition)
    assert assets_def.partitions_def.name == CYCLE_PARTITIONS_NAME
    assert dg.AssetKey("verified_pairs") in assets_def.dependency_keys


@pytest.mark.slow
@pytest.mark.usefixtures("hub_reachable")
def test_checkpoint_materializes_and_the_next_cycle_mines_with_it(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("lake")
    build_lake(root, shared_data, n=64, max_chars=160)  # source pairs, a c000 shard and a c000 verified export
    lake = LakeResource(storage_dir=str(root))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, ["c000"])
    run_config = {
        "ops": {
            "checkpoint": {
                "config": {
                    "phases": 2,
                    "max_steps_per_phase": 1,
                    "batch_size": 16,
                    "max_seq_length": 48,
                    "label_smoothing": 0.01,
                }
            }
        }
    }
    with FakeHub() as hub:
        publisher = CheckpointPublisherResource(repo_id="embedkomb/minilm-kombinat", token=hub.token, endpoint=hub.url)
        result = dg.materialize(
            [checkpoint],
            partition_key="c000",
            resources={"lake": lake, "dense_model": DenseModelResource(), "checkpoint_publisher": publisher},
            run_config=run_config,
            instance=instance,
        )
        # publishing the cycle again (a re-trained checkpoint) moves its tag to the new commit
        first_oid = f"{hub.commits:040x}"
        republished = publisher.publish(lake.checkpoint_dir("c000"), "c000")
    assert result.success
    assert republished is not None and republished.tag == "c000" and republished.commit_oid != first_oid
    assert hub.tags["embedkomb/minilm-kombinat"] == {"c000": republished.commit_oid}
    # one commit to the model repo: the model at its root, the training record beside it, tagged with the cycle
    pushed = hub.files["embedkomb/minilm-kombinat"]
    assert {"modules.json", "config.json", "model.safetensors", "embedkomb/metrics.json"} <= set(pushed)
    assert "embedkomb/loss_curve.png" in pushed and "embedkomb/training_config.json" in pushed
    saved = lake.checkpoint_dir("c000") / "model" / "model.safetensors"
    assert pushed["model.safetensors"] == saved.read_bytes()
    metadata = result.asset_materializations_for_node("checkpoint")[0].metadata
    model_dir = lake.checkpoint_dir("c000") / "model"
    assert metadata["model_path"].value == str(model_dir)
    assert metadata["hub_commit"].value.startswith(f"{hub.url}/embedkomb/minilm-kombinat/commit/")
    assert metadata["splits"].value == [SPLIT]
    assert metadata["steps"].value == 2 and metadata["device"].value == "cpu"
    assert metadata["objective_after"].value < metadata["objective_before"].value
    assert metadata["training_set"].value["verified_relevant"] > 0
    assert metadata["training_set"].value["masked_candidates"] > 0
    assert metadata["loss_curve"].value.startswith("![loss curve](data:image/png;base64,iVBOR")
    config = json.loads((lake.checkpoint_dir("c000") / "training_config.json").read_text())
    assert config["cycle"] == "c000" and config["batch_size"] == 16 and config["lr"] == 1e-4
    assert config["label_smoothing"] == 0.01
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    assert model.encode(["a claim about T cells"]).shape == (1, 384)
    # cycle c001 mines with this checkpoint (ANCE-style re-mining)
    encoder, why = DenseModelResource().encoder_for_cycle(lake, "c000")
    assert encoder.path == model_dir and "checkpoint of cycle c000" in why
