"""Coordinate ascent with the exact softmax on real SciFact texts and the real all-MiniLM-L6-v2, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embedkomb_pipeline.mining.embedding import default_base_model_path
from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer, TrainConfig, TrainResult, write_checkpoint
from embedkomb_pipeline.training.data import TrainingSet, build_training_set, export_files
from tests.training.conftest import SPLIT, build_lake

# small enough for two busy cores: 96 documents, 48-token windows, two steps of 16 per phase
SMALL = {"max_seq_length": 48, "batch_size": 16, "max_steps_per_phase": 2, "encode_batch_size": 64}


@pytest.fixture(scope="module")
def small_set(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainingSet:
    lake = build_lake(tmp_path_factory.mktemp("small_lake"), shared_data, n=96, max_chars=160)
    return build_training_set([lake.source], export_files(lake.export_root, [SPLIT], "c000"), [lake.candidates])


@pytest.fixture(scope="module")
def trained(small_set: TrainingSet, tmp_path_factory: pytest.TempPathFactory) -> tuple[TowerTrainer, TrainResult, Path]:
    torch.set_num_threads(2)
    trainer = TowerTrainer(default_base_model_path(), small_set, TrainConfig(phases=2, **SMALL))  # type: ignore[arg-type]
    result = trainer.train(log=lambda _: None)
    out = tmp_path_factory.mktemp("checkpoint")
    write_checkpoint(trainer, result, out, {"splits": [SPLIT]})
    return trainer, result, out


def test_each_phase_lowers_its_side_and_the_full_corpus_objective(
    trained: tuple[TowerTrainer, TrainResult, Path],
) -> None:
    _, result, _ = trained
    assert [s["side"] for s in result.steps] == ["query", "query", "document", "document"]
    for phase, side in zip(result.phase_objectives, ("query", "document"), strict=True):
        assert phase["after"][side] < phase["before"][side], phase
    first, last = result.phase_objectives[0]["before"], result.phase_objectives[-1]["after"]
    assert last["mean"] < first["mean"] - 0.01, (first, last)
    assert all(np.isfinite(s["loss"]) for s in result.steps)


def test_checkpoint_loads_with_sentence_transformers_and_encodes(
    trained: tuple[TowerTrainer, TrainResult, Path], small_set: TrainingSet
) -> None:
    trainer, _result, out = trained
    model = SentenceTransformer(str(out / "model"), device="cpu", local_files_only=True)
    assert model.max_seq_length == 256  # the base model's window, not the 48 tokens it trained with
    model.max_seq_length = 48  # compare with the trainer's encodings at its window
    texts = small_set.documents[:4]
    got = model.encode(texts, normalize_embeddings=True)
    assert got.shape == (4, 384)
    want = trainer.encode("document", texts).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    base = SentenceTransformer(str(default_base_model_path()), device="cpu", local_files_only=True)
    assert np.abs(base.encode(texts, normalize_embeddings=True) - got).max() > 1e-4  # training changed the weights
    config = json.loads((out / "training_config.json").read_text())
    assert config["loss"] == "exact" and config["lr"] == 1e-4 and config["splits"] == [SPLIT]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["objective_after"] < metrics["objective_before"]
    assert metrics["data"]["verified_relevant"] > 0
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (out / "query_model").exists()  # shared towers: one model


def test_a_bf16_cache_matches_the_fp32_cache(small_set: TrainingSet) -> None:
    texts = small_set.documents[:32]
    encodings = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(phases=1, cache_precision=precision, **SMALL)  # type: ignore[arg-type]
        encodings[precision] = TowerTrainer(default_base_model_path(), small_set, config).encode("document", texts)
    fp32, bf16 = encodings["fp32"], encodings["bf16"]
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape  # the loss reads float32 on a CPU
    assert not torch.equal(fp32, bf16)  # bf16 really ran
    cosine = (fp32 * bf16).sum(-1)
    assert float(cosine.min()) > 0.999, cosine
