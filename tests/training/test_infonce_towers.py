"""The InfoNCE baseline and separate towers, trained for a few CPU steps on real SciFact texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embedkomb_pipeline.mining.embedding import default_base_model_path
from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer, TrainConfig
from embedkomb_pipeline.training.data import build_training_set, export_files
from tests.training.conftest import SPLIT, build_lake


@pytest.mark.parametrize("loss", ["infonce", "exact"])
def test_separate_towers_train_and_save_both(
    loss: str, shared_data: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    torch.set_num_threads(2)
    lake = build_lake(tmp_path_factory.mktemp("lake"), shared_data, n=64, max_chars=160)
    data = build_training_set([lake.source], export_files(lake.export_root, [SPLIT], "c000"), [lake.candidates])
    config = TrainConfig(
        loss=loss,  # type: ignore[arg-type]
        towers="separate",
        phases=2 if loss == "exact" else 1,
        max_steps_per_phase=2,
        batch_size=16,
        max_seq_length=48,
        hard_negatives_per_query=1,
        matryoshka_dims=(64, 384) if loss == "infonce" else None,
    )
    trainer = TowerTrainer(default_base_model_path(), data, config)
    assert trainer.query_tower is not trainer.document_tower
    result = trainer.train(log=lambda _: None)
    before, after = result.phase_objectives[0]["before"]["mean"], result.phase_objectives[-1]["after"]["mean"]
    assert after < before, (before, after)
    paths = trainer.save(tmp_path)
    texts = data.queries[:3]
    q = SentenceTransformer(str(paths["query_model"]), device="cpu", local_files_only=True)
    d = SentenceTransformer(str(paths["model"]), device="cpu", local_files_only=True)
    # both towers moved, differently (exact: phase 0 trains the query tower, phase 1 the document tower)
    assert np.abs(q.encode(texts) - d.encode(texts)).max() > 1e-4
    base = SentenceTransformer(str(default_base_model_path()), device="cpu", local_files_only=True)
    assert np.abs(base.encode(texts) - d.encode(texts)).max() > 1e-4
    assert np.abs(base.encode(texts) - q.encode(texts)).max() > 1e-4
