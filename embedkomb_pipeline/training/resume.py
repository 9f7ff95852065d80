"""Resume state of a training run: rank 0 writes it every K optimizer steps and at the end of each phase; a run
started on the same folder goes on from the last state written, as if it had never stopped.

One file, `state.pt`, replaced atomically (written beside it, then renamed: a run killed while writing leaves the
previous state intact). It holds the towers' weights, the optimizers' and learning-rate schedules' states, the
batch order of the current phase and how far it got, the Python batch-order RNG, every rank's torch RNG (dropout),
the result so far (losses per step, objectives, seconds) and the full-corpus objective at the phase's start.

One more thing decides an exact-softmax phase: the frozen cache. With separate towers it is the other tower,
which the phase does not change, so re-encoding it on resume gives the same cache. With a shared tower the cache
was encoded by the very model the phase trains, as it was at the phase's start; those weights are kept in
`phase_start.pt` so that a phase resumed half-way re-encodes its cache exactly.

Every rank reads the state on start (the folder is on the lake every process mounts); a state written with another
training config or another number of processes belongs to another run: that run starts over instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from embedkomb_pipeline.training.distributed import Topology, all_gather_objects

if TYPE_CHECKING:
    from torch import nn

    from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer, TrainResult

STATE_FILE = "state.pt"
PHASE_START_FILE = "phase_start.pt"


@dataclass
class PhaseProgress:
    """A phase's global batches (drawn once at its start, identical on every rank) and how many are trained."""

    batches: list[list[int]]
    done: int = 0


@dataclass
class ResumePoint:
    phase: int  # the phase to run next
    progress: PhaseProgress | None  # None: that phase has not started
    before: dict | None  # the full-corpus objective at that phase's start
    step: int  # optimizer steps done so far, all phases


def _config_key(config: Any) -> str:
    return json.dumps(asdict(config), sort_keys=True, default=str)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(device: str) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


class Checkpointing:
    """Writes and restores one trainer's resume state in `folder` (rank 0 writes, every rank reads)."""

    def __init__(self, trainer: TowerTrainer, folder: Path, every_steps: int | None = None) -> None:
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"save_every_steps must be positive, got {every_steps}")
        self.trainer = trainer
        self.folder = folder
        self.every_steps = every_steps
        self.phase = 0
        self.before: dict | None = None
        self.phase_started = time.perf_counter()

    @property
    def topology(self) -> Topology:
        return self.trainer.topology

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def _towers(self) -> dict[str, nn.Module]:
        t = self.trainer
        return {"query": t.query_tower} if t.document_tower is t.query_tower else {
            "query": t.query_tower, "document": t.document_tower}  # fmt: skip

    def begin_phase(self, phase: int, before: dict | None) -> None:
        self.phase, self.before, self.phase_started = phase, before, time.perf_counter()

    def after_step(self, progress: PhaseProgress, result: TrainResult) -> None:
        """Every `every_steps` optimizer steps, unless the phase just ended (end_phase saves that)."""
        step = len(result.steps)
        if self.every_steps and step % self.every_steps == 0 and progress.done < len(progress.batches):
            self.save(result, self.phase, progress, self.before)

    def end_phase(self, result: TrainResult, next_phase: int, before: dict | None) -> None:
        self.save(result, next_phase, None, before, phase_seconds=0.0)

    def save(
        self,
        result: TrainResult,
        phase: int,
        progress: PhaseProgress | None,
        before: dict | None,
        phase_seconds: float | None = None,
    ) -> None:
        """Collective: every rank hands rank 0 its torch RNG state; rank 0 writes; all wait until it has."""
        t = self.trainer
        rng_states = all_gather_objects(_rng_state(t.device), self.topology)
        if self.topology.is_main:
            elapsed = time.perf_counter() - self.phase_started if phase_seconds is None else phase_seconds
            state = {
                "config": _config_key(t.config),
                "world_size": self.topology.world_size,
                "phase": phase,
                "batches": progress.batches if progress else None,
                "done": progress.done if progress else 0,
                "before": before,
                "python_rng": list(t.rng.getstate()[1]),
                "torch_rng": rng_states,
                "towers": {name: tower.state_dict() for name, tower in self._towers().items()},
                "optimizers": [o.state_dict() for o in t.optimizers.values()],
                "schedules": [s.state_dict() for s in t.schedules.values()],
                "result": {
                    "steps": result.steps,
                    "phase_objectives": result.phase_objectives,
                    "examples": result.examples,
                    "seconds": result.seconds + elapsed,
                    "cache": result.cache,
                },
            }
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_save(state, self.state_path)
        self.topology.barrier()

    def restore(self, result: TrainResult, log: Callable[[str], None] = print) -> ResumePoint | None:
        """Load the state into the trainer and `result`; None when the folder holds none this run can use."""
        if not self.state_path.is_file():
            return None
        t = self.trainer
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        # another config or another number of processes is another run: it starts over (its batches, its RNG
        # streams and its schedule would not line up with the saved ones)
        if state["config"] != _config_key(t.config) or state["world_size"] != self.topology.world_size:
            log(f"not resuming from {self.folder}: it was written by another run "
                f"({state['world_size']} processes, config {state['config']}); starting over")  # fmt: skip
            return None
        for name, tower in self._towers().items():
            tower.load_state_dict(state["towers"][name])
        for optimizer, saved in zip(t.optimizers.values(), state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for schedule, saved in zip(t.schedules.values(), state["schedules"], strict=True):
            schedule.load_state_dict(saved)
        t.rng.setstate((3, tuple(state["python_rng"]), None))
        mine = state["torch_rng"][self.topology.rank]
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], torch.device(t.device))
        saved_result = state["result"]
        result.steps = list(saved_result["steps"])
        result.phase_objectives = list(saved_result["phase_objectives"])
        result.examples = saved_result["examples"]
        result.seconds = saved_result["seconds"]
        result.cache = list(saved_result["cache"])
        progress = PhaseProgress(state["batches"], state["done"]) if state["batches"] is not None else None
        result.resumed_from_step = len(result.steps)
        return ResumePoint(state["phase"], progress, state["before"], len(result.steps))

    def save_phase_start(self, tower: nn.Module) -> None:
        """The shared tower's weights as the phase starts: what its cache is encoded with (collective)."""
        if self.topology.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_save(tower.state_dict(), self.folder / PHASE_START_FILE)
        self.topology.barrier()

    @contextmanager
    def phase_start_weights(self, tower: nn.Module) -> Iterator[None]:
        """The tower with the weights its phase started from, for as long as the block runs."""
        current = {k: v.detach().clone() for k, v in tower.state_dict().items()}
        tower.load_state_dict(torch.load(self.folder / PHASE_START_FILE, map_location="cpu", weights_only=True))
        try:
            yield
        finally:
            tower.load_state_dict(current)


def discard_resume_state(folder: Path, topology: Topology) -> None:
    """Once the checkpoint is written the resume state has served (and weighs a model and its Adam state)."""
    topology.barrier()  # no rank may still be reading it
    if topology.is_main:
        shutil.rmtree(folder, ignore_errors=True)
