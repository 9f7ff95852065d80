"""Data-parallel training for real: torchrun with two gloo processes on CPU, the real all-MiniLM-L6-v2 and a tiny
lake cut from SciFact; the launcher on its own, and the `checkpoint` asset launching it through Dagster Pipes.

The Dagster run is interrupted by a fault on rank 1 (EMBEDKOMB_TRAINING_FAULT): the materialization fails with
that rank's error and log; materialized again, it resumes from the last saved step and ends exactly where an
uninterrupted run of the same job ends.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME
from embedkomb_pipeline.defs.resources import CheckpointPublisherResource, DenseModelResource, LakeResource
from embedkomb_pipeline.defs.training import checkpoint
from embedkomb_pipeline.training import launch
from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer
from embedkomb_pipeline.training.data import build_training_set, export_files
from embedkomb_pipeline.training.launch import TrainingJob
from embedkomb_pipeline.training.presets import get_preset
from tests.training.conftest import SPLIT, build_lake

# small enough for two busy cores: 64 documents, 32-token windows, two steps of 8 per phase, two phases
KNOBS: dict[str, Any] = {"phases": 2, "max_steps_per_phase": 2, "batch_size": 8, "max_seq_length": 32,
                         "label_smoothing": 0.01, "matryoshka_dims": [64, 384]}  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(1200)]


def job_for(lake_root: Path, out_dir: Path, **changes: Any) -> TrainingJob:
    """The job the checkpoint asset writes for KNOBS (same preset, same TrainConfig), into out_dir."""
    lake = LakeResource(storage_dir=str(lake_root))
    preset = get_preset("mini")
    config = preset.configure(**{**KNOBS, **changes})
    return TrainingJob(
        cycle="c000",
        base_model=preset.resolve_model(),
        export_root=str(lake.export_dir),
        out_dir=str(out_dir),
        config=asdict(config),
        source_pairs={SPLIT: str(lake.source_pairs_path(SPLIT))},
        candidate_files=[str(lake.candidates_path(SPLIT, "c000"))],
        splits=[SPLIT],
        preset="mini",
        nproc=2,
        save_every_steps=1,
    )


@pytest.fixture(scope="module")
def lake_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    build_lake(root, shared_data, n=64, max_chars=160)
    return root


@pytest.fixture(scope="module")
def reference(lake_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingJob, dict[str, Any]]:
    """An uninterrupted two-process run of the job."""
    job = job_for(lake_root, tmp_path_factory.mktemp("reference"))
    return job, launch.run(job.write())


def test_two_processes_lower_the_objective_and_write_one_loadable_checkpoint(
    reference: tuple[TrainingJob, dict[str, Any]],
) -> None:
    job, result = reference
    out = Path(job.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4 and metrics["examples"] == 32
    assert metrics["objective_after"] < metrics["objective_before"] - 0.01, metrics
    # each rank held half the frozen cache in each phase
    assert [(c["rows"], c["total_rows"]) for c in metrics["cache_per_rank"]] == [(32, 64), (32, 64)]
    config = json.loads((out / "training_config.json").read_text())
    assert config["preset"]["name"] == "mini" and config["world_size"] == 2 and config["batch_size"] == 8
    assert config["matryoshka_dims"] == [64, 384]
    # one checkpoint, written by rank 0; the resume state is gone once it is
    assert sorted(p.name for p in out.iterdir()) == [
        "_launch", "loss_curve.png", "loss_steps.json", "metrics.json", "model", "training_config.json"]  # fmt: skip
    model = SentenceTransformer(str(out / "model"), device="cpu", local_files_only=True)
    assert model.encode(["a claim about T cells"]).shape == (1, 384)
    assert result["model_dir"] == str(out / "model")
    assert result["metadata"]["loss_curve"][1].startswith("![loss curve](data:image/png;base64,iVBOR")


def test_the_sharded_objective_equals_the_one_process_objective(
    reference: tuple[TrainingJob, dict[str, Any]], lake_root: Path
) -> None:
    """objective_before was computed by two ranks, each encoding half of each side; one process agrees."""
    job, _ = reference
    torch.set_num_threads(2)
    data = build_training_set([Path(p) for p in job.source_pairs.values()],
                              export_files(Path(job.export_root), [SPLIT], "c000"),
                              [Path(p) for p in job.candidate_files])  # fmt: skip
    one = TowerTrainer(job.base_model, data, job.train_config()).objectives()["mean"]
    two = json.loads((Path(job.out_dir) / "metrics.json").read_text())["objective_before"]
    assert abs(one - two) < 1e-5, (one, two)


def test_infonce_with_separate_towers_trains_on_two_processes(lake_root: Path, tmp_path: Path) -> None:
    """In-batch candidates gathered across ranks; two towers under DDP; both saved."""
    job = job_for(lake_root, tmp_path / "infonce", loss="infonce", towers="separate", phases=1, max_steps_per_phase=3)
    job.save_every_steps = None
    launch.run(job.write())
    metrics = json.loads((tmp_path / "infonce" / "metrics.json").read_text())
    assert metrics["loss"] == "infonce" and metrics["world_size"] == 2 and metrics["steps"] == 3
    assert metrics["objective_after"] < metrics["objective_before"], metrics
    texts = ["a claim about T cells", "gene expression in yeast"]
    query = SentenceTransformer(str(tmp_path / "infonce" / "query_model"), device="cpu", local_files_only=True)
    document = SentenceTransformer(str(tmp_path / "infonce" / "model"), device="cpu", local_files_only=True)
    assert np.abs(query.encode(texts) - document.encode(texts)).max() > 1e-4


def test_checkpoint_asset_trains_on_two_processes_fails_with_the_rank_log_and_resumes(
    reference: tuple[TrainingJob, dict[str, Any]], lake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference_job, _ = reference
    lake = LakeResource(storage_dir=str(lake_root))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, ["c000"])
    run_config = {"ops": {"checkpoint": {"config": {**KNOBS, "nproc": 2, "save_every_steps": 1}}}}
    resources = {
        "lake": lake,
        "dense_model": DenseModelResource(),
        "checkpoint_publisher": CheckpointPublisherResource(),  # unconfigured: no Hub push
    }

    def materialize() -> dg.ExecuteInJobResult:
        return dg.materialize([checkpoint], partition_key="c000", resources=resources, run_config=run_config,
                              instance=instance, raise_on_error=False)  # fmt: skip

    # rank 1 fails before step 2: the run fails with that rank's error and the end of its log
    monkeypatch.setenv(launch.FAULT_ENV, "rank=1,step=2")
    failed = materialize()
    assert not failed.success
    failure = next(e for e in failed.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.step_failure_data.user_failure_data.description
    assert "rank 1 exited with 1" in message and "stops before step 2" in message
    assert "[rank 1/2] phase 0 (query tower, cache 32 of 64 rows on this rank" in message  # its log
    failure_metadata = failure.step_failure_data.user_failure_data.metadata
    assert failure_metadata["failed_rank"].value == 1
    assert (lake.checkpoint_dir("c000") / "_resume" / "state.pt").is_file()

    # materialized again: it goes on from the saved step and ends where the uninterrupted run ends
    monkeypatch.delenv(launch.FAULT_ENV)
    result = materialize()
    assert result.success
    metadata = result.asset_materializations_for_node("checkpoint")[0].metadata
    out = lake.checkpoint_dir("c000")
    assert metadata["resumed_from_step"].value == 2 and metadata["world_size"].value == 2
    assert metadata["model_path"].value == str(out / "model")
    assert metadata["loss_curve"].value.startswith("![loss curve](data:image/png;base64,iVBOR")
    assert metadata["loss_curve_path"].value == str(out / "loss_curve.png")
    assert metadata["metrics"].value["world_size"] == 2
    assert metadata["objective_after"].value < metadata["objective_before"].value
    assert metadata["hub_commit"].value == "not published"
    reference_out = Path(reference_job.out_dir)
    want = [s["loss"] for s in json.loads((reference_out / "loss_steps.json").read_text())]
    got = [s["loss"] for s in json.loads((out / "loss_steps.json").read_text())]
    assert got == pytest.approx(want, abs=1e-6)
    weights, reference_weights = load_file(out / "model" / "model.safetensors"), load_file(
        reference_out / "model" / "model.safetensors")  # fmt: skip
    assert all(torch.allclose(weights[k], reference_weights[k], atol=1e-6) for k in reference_weights)
    config = json.loads((out / "training_config.json").read_text())
    assert config["preset"]["name"] == "mini" and config["world_size"] == 2 and config["cycle"] == "c000"
    model = SentenceTransformer(str(out / "model"), device="cpu", local_files_only=True)
    assert model.encode(["a claim about T cells"]).shape == (1, 384)
