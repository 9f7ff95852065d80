"""One cycle's checkpoint: gather every verified export up to the cycle, build the training set, train, save.

Dagster-free; the `checkpoint` asset (defs/training.py) only resolves lake paths and resources and calls this.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer, TrainConfig, TrainResult, write_checkpoint
from embedkomb_pipeline.training.data import TrainingSet, build_training_set, export_files


@dataclass
class CheckpointReport:
    out_dir: Path
    model_dir: Path
    splits: list[str]
    data: TrainingSet
    result: TrainResult
    paths: dict[str, Path]
    seconds: float

    def loss_curve_markdown(self) -> str:
        """The PNG inline (base64), so the Dagster UI shows it without serving files."""
        encoded = base64.b64encode(self.paths["loss_curve"].read_bytes()).decode("ascii")
        return f"![loss curve](data:image/png;base64,{encoded})"


# what travels with the model when a checkpoint is published: the record of how it was trained
TRAINING_RECORD_FILES = ("training_config.json", "metrics.json", "loss_steps.json", "loss_curve.png")


def checkpoint_files(out_dir: Path) -> dict[str, Path]:
    """A saved checkpoint as Hub repository files: the sentence-transformers model at the root (so
    ``SentenceTransformer(repo, revision=cycle)`` loads it) and the training record under ``embedkomb/``."""
    from embedkomb_pipeline.hub import folder_files

    model_dir = out_dir / "model"
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(f"{out_dir} holds no saved sentence-transformers model (no model/modules.json)")
    files = folder_files(model_dir)
    for name in TRAINING_RECORD_FILES:
        if (out_dir / name).is_file():
            files[f"embedkomb/{name}"] = out_dir / name
    return files


def verified_splits(export_root: Path, up_to_cycle: str) -> list[str]:
    """Splits with at least one verified export file at or before the cycle."""
    data = export_root / "data"
    if not data.is_dir():
        return []
    return sorted(p.name for p in data.iterdir() if p.is_dir() and export_files(export_root, [p.name], up_to_cycle))


def train_checkpoint(
    *,
    cycle: str,
    base_model: Path,
    export_root: Path,
    source_pairs: Mapping[str, Path],
    candidate_files: Sequence[Path],
    out_dir: Path,
    config: TrainConfig,
    splits: Sequence[str] | None = None,
    max_queries: int | None = None,
    mask_top_k: int | None = None,
    track_objective: bool = True,
    log: Callable[[str], None] = print,
) -> CheckpointReport:
    """Train from the base model on all verified data of `splits` (default: every verified split) up to `cycle`.

    Always from the base model, not the previous checkpoint: each cycle's model is then a function of the data
    so far alone, and cycles compare cleanly (the previous checkpoint only chooses what gets mined next).
    """
    started = time.perf_counter()
    splits = list(splits) if splits is not None else verified_splits(export_root, cycle)
    if not splits:
        raise ValueError(f"no verified export at or before cycle {cycle} under {export_root}")
    missing = [s for s in splits if not source_pairs.get(s) or not source_pairs[s].exists()]
    if missing:
        log(f"no source pairs for {missing}: their verified pairs train without the source positives")
    data = build_training_set(
        [source_pairs[s] for s in splits if s not in missing],
        export_files(export_root, splits, cycle),
        candidate_files,
        mask_top_k=mask_top_k,
    )
    if max_queries is not None:
        data = data.subset(max_queries, seed=config.seed)
    log(f"training set: {data.counts}")
    trainer = TowerTrainer(base_model, data, config)
    result = trainer.train(log=log, track_objective=track_objective)
    extra = {"cycle": cycle, "splits": splits, "base_model": str(base_model), "max_queries": max_queries,
             "mask_top_k": mask_top_k}  # fmt: skip
    paths = write_checkpoint(trainer, result, out_dir, extra)
    return CheckpointReport(out_dir, paths["model"], splits, data, result, paths, time.perf_counter() - started)
