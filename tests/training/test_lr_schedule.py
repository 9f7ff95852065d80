"""The learning-rate schedule: warm-up then linear decay over exactly the steps each optimizer takes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from embedkomb_pipeline.mining.embedding import default_base_model_path
from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer, TrainConfig, lr_factor
from embedkomb_pipeline.training.data import build_training_set, export_files
from tests.training.conftest import SPLIT, build_lake


def test_lr_factor_warms_up_then_decays_to_zero() -> None:
    factors = [lr_factor(step, 10, 0.2, "linear") for step in range(10)]
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3])  # two warm-up steps below the full rate
    assert factors[2] == 1.0 and all(a > b for a, b in itertools.pairwise(factors[2:]))
    assert lr_factor(10, 10, 0.2, "linear") == 0.0
    assert [lr_factor(s, 10, 0.0, "constant") for s in range(10)] == [1.0] * 10


@pytest.mark.parametrize("bad", [{"warmup_ratio": -0.1}, {"warmup_ratio": 1.0}, {"lr_decay": "cosine"}])
def test_bad_schedules_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"warmup_ratio|lr_decay"):
        TrainConfig(**bad)  # type: ignore[arg-type]


def test_a_shared_tower_schedule_spans_both_phases(shared_data: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    lake = build_lake(tmp_path, shared_data, n=48, max_chars=120)
    data = build_training_set([lake.source], export_files(lake.export_root, [SPLIT], "c000"), [lake.candidates])
    config = TrainConfig(phases=2, max_steps_per_phase=3, batch_size=8, max_seq_length=32, lr=1e-4,
                         warmup_ratio=0.2, lr_decay="linear")  # fmt: skip
    trainer = TowerTrainer(default_base_model_path(), data, config)
    result = trainer.train(log=lambda _: None, track_objective=False)
    assert len(result.steps) == 6
    # one optimizer (the shared tower) scheduled over both phases: 6 steps, 2 of them warm-up, ending at zero
    (optimizer,) = trainer.optimizers.values()
    schedule = trainer.schedules[id(optimizer)]
    assert schedule.last_epoch == 6
    assert [schedule.lr_lambdas[0](s) for s in range(6)] == pytest.approx(
        [lr_factor(s, 6, 0.2, "linear") for s in range(6)]
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
