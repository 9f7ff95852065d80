"""One cycle's checkpoint: gather every verified export up to the cycle, build the training set, train, save.

Dagster-free; the `checkpoint` asset (defs/training.py) only resolves lake paths and resources and calls this.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer, TrainConfig, TrainResult, write_checkpoint
from embedkomb_pipeline.training.data import TrainingSet, build_training_set, export_files
from embedkomb_pipeline.training.distributed import Topology, single_process
from embedkomb_pipeline.training.presets import ModelPreset
from embedkomb_pipeline.training.resume import discard_resume_state

# a metadata entry as (kind, value), free of Dagster: defs/training.py makes dg.MetadataValue of it in process,
# launch.py Dagster Pipes metadata ({"type": kind, "raw_value": value}) in the training process
MetadataKind = Literal["path", "md", "json", "text", "__infer__"]
MetadataEntry = tuple[MetadataKind, Any]


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

    def metadata(self, base_model: str | Path) -> dict[str, MetadataEntry]:
        """What the checkpoint asset reports, whichever process trained it (rank 0's view under torchrun)."""
        metrics = self.result.metrics()
        objective: dict[str, MetadataEntry] = {
            k: ("__infer__", metrics[k]) for k in ("objective_before", "objective_after") if metrics[k] is not None
        }
        return {
            **objective,
            "model_path": ("path", str(self.model_dir)),
            "base_model": ("text", str(base_model)),
            "device": ("text", self.result.device),
            "world_size": ("__infer__", self.result.world_size),
            "splits": ("json", self.splits),
            "training_set": ("json", self.data.counts),
            "steps": ("__infer__", metrics["steps"]),
            "examples_per_second": ("__infer__", metrics["examples_per_second"]),
            "final_step_loss": ("__infer__", self.result.steps[-1]["loss"] if self.result.steps else None),
            "resumed_from_step": ("__infer__", self.result.resumed_from_step),
            "metrics": ("json", json.loads((self.out_dir / "metrics.json").read_text())),
            "loss_curve": ("md", self.loss_curve_markdown()),
            "loss_curve_path": ("path", str(self.paths["loss_curve"])),
            "seconds": ("__infer__", round(self.seconds, 1)),
        }


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
    base_model: str | Path,
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
    preset: ModelPreset | None = None,
    topology: Topology | None = None,
    resume_dir: Path | None = None,
    save_every_steps: int | None = None,
    before_step: Callable[[int], None] | None = None,
) -> CheckpointReport:
    """Train from the base model on all verified data of `splits` (default: every verified split) up to `cycle`.

    Always from the base model, not the previous checkpoint: each cycle's model is then a function of the data
    so far alone, and cycles compare cleanly (the previous checkpoint only chooses what gets mined next).

    base_model: a local folder or a Hub id; preset: the model preset the config came from (recorded in
    training_config.json). Under torchrun (topology from distributed.init_from_env) every rank calls this with
    the same arguments: each builds the same training set, trains on its part of each batch, and rank 0 alone
    writes the checkpoint. resume_dir: keep a resume state there and go on from it (see resume.py); it is removed
    once the checkpoint is written.
    """
    topology = topology or single_process()
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
    trainer = TowerTrainer(base_model, data, config, topology)
    result = trainer.train(
        log=log, track_objective=track_objective, resume_dir=resume_dir, save_every_steps=save_every_steps,
        before_step=before_step,
    )  # fmt: skip
    extra = {"cycle": cycle, "splits": splits, "base_model": str(base_model), "max_queries": max_queries,
             "mask_top_k": mask_top_k, "world_size": topology.world_size,
             "preset": preset.record() if preset else None}  # fmt: skip
    paths: dict[str, Path] = {"model": out_dir / "model"}
    if topology.is_main:  # one writer: the ranks' towers are identical under DDP
        paths = write_checkpoint(trainer, result, out_dir, extra)
    if resume_dir is not None:
        discard_resume_state(resume_dir, topology)
    return CheckpointReport(out_dir, paths["model"], splits, data, result, paths, time.perf_counter() - started)
