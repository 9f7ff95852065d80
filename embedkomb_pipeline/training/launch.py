"""Training as a process of its own: data-parallel over N processes under torchrun, from a JSON job spec.

    python -m embedkomb_pipeline.training.launch run JOB.json [--nproc N]    # starts torchrun itself
    torchrun --standalone --nproc-per-node N -m embedkomb_pipeline.training.launch worker JOB.json   # by hand

`run` starts `python -m torch.distributed.run --standalone --nproc-per-node N` with `worker JOB.json` as every
process's program: gloo on CPU, NCCL when CUDA is there (one GPU per process, cuda:LOCAL_RANK). Each rank's
output goes to the console and to torchrun's log folder. Started by Dagster Pipes (the `checkpoint` asset with
`nproc` > 1), it reports the checkpoint's metrics, loss curve and model path back as the materialization's
metadata. When a rank fails, `run` finds the first rank that raised (its error file, written by torchrun's
`record`), reports its error and the tail of its log through Pipes, writes them to failure.json and exits 1:
the Dagster run fails with that log.

Every rank builds the same training set from the lake, trains on its part of each global batch (DDP), holds
1/N of the frozen cache, and rank 0 writes the checkpoint. Files under the job's out_dir: `_launch/job.json`
(where the asset writes the spec), `_launch/logs/` (torchrun's per-rank stdout.log, stderr.log, error.json),
`_launch/result.json` (rank 0's metadata), `_launch/failure.json`, and `_resume/` while a run is unfinished:
started again on the same spec, a run goes on from its last saved step (resume.py).

For tests of failure handling and resume: EMBEDKOMB_TRAINING_FAULT="rank=R,step=S" makes rank R raise just before
its optimizer step S (0-based, all phases counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the launching process itself needs no torch: it only starts torchrun
    from embedkomb_pipeline.training.checkpoint import CheckpointReport
    from embedkomb_pipeline.training.coordinate_ascent import TrainConfig
    from embedkomb_pipeline.training.distributed import Topology

LAUNCH_DIR = "_launch"
RESUME_DIR = "_resume"
FAULT_ENV = "EMBEDKOMB_TRAINING_FAULT"
LOG_TAIL_CHARS = 6000


@dataclass
class TrainingJob:
    """Everything one checkpoint's training needs, as JSON: what train_checkpoint takes, plus how to launch it."""

    cycle: str
    base_model: str  # a local folder or a Hub id
    export_root: str
    out_dir: str
    config: dict[str, Any]  # TrainConfig's fields
    source_pairs: dict[str, str] = field(default_factory=dict)
    candidate_files: list[str] = field(default_factory=list)
    splits: list[str] | None = None
    max_queries: int | None = None
    mask_top_k: int | None = None
    track_objective: bool = True
    preset: str | None = None
    nproc: int = 1
    backend: str = "auto"  # "gloo" (CPU), "nccl" (GPUs) or "auto": nccl when CUDA is available
    save_every_steps: int | None = None  # resume state every K steps besides each phase's end; None: phase ends
    resume: bool = True  # keep a resume state in out_dir/_resume and go on from the one there

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"nproc must be at least 1, got {self.nproc}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {self.backend!r}")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise ValueError(f"save_every_steps must be positive, got {self.save_every_steps}")

    @property
    def launch_dir(self) -> Path:
        return Path(self.out_dir) / LAUNCH_DIR

    @property
    def resume_dir(self) -> Path:
        return Path(self.out_dir) / RESUME_DIR

    def train_config(self) -> TrainConfig:
        from embedkomb_pipeline.training.coordinate_ascent import TrainConfig

        fields = dict(self.config)
        if fields.get("matryoshka_dims"):
            fields["matryoshka_dims"] = tuple(fields["matryoshka_dims"])
        return TrainConfig(**fields)

    def write(self, path: Path | None = None) -> Path:
        path = path or self.launch_dir / "job.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> TrainingJob:
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def train(
        self,
        log: Callable[[str], None] = print,
        topology: Topology | None = None,
        before_step: Callable[[int], None] | None = None,
    ) -> CheckpointReport:
        """train_checkpoint with this job's arguments, in this process (one rank of several under torchrun)."""
        from embedkomb_pipeline.training.checkpoint import train_checkpoint
        from embedkomb_pipeline.training.presets import get_preset

        return train_checkpoint(
            cycle=self.cycle,
            base_model=self.base_model,
            export_root=Path(self.export_root),
            source_pairs={split: Path(p) for split, p in self.source_pairs.items()},
            candidate_files=[Path(p) for p in self.candidate_files],
            out_dir=Path(self.out_dir),
            config=self.train_config(),
            splits=self.splits,
            max_queries=self.max_queries,
            mask_top_k=self.mask_top_k,
            track_objective=self.track_objective,
            log=log,
            preset=get_preset(self.preset) if self.preset else None,
            topology=topology,
            resume_dir=self.resume_dir if self.resume else None,
            save_every_steps=self.save_every_steps,
            before_step=before_step,
        )


@dataclass
class RankFailure:
    """The first rank that failed, its error and the end of its log."""

    rank: int | None  # None: no rank left an error file (killed by a signal, out of memory)
    exitcode: int
    error: str
    traceback: str
    log_path: str | None
    log_tail: str

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "a rank"
        return (
            f"training failed: {who} exited with {self.exitcode}: {self.error}\n"
            f"--- end of its log ({self.log_path}) ---\n{self.log_tail}"
        )


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-chars:]


def first_failure(log_dir: Path, exitcode: int) -> RankFailure:
    """The rank whose error file was written first (the others fail after it, on the broken collective)."""
    errors = sorted(log_dir.glob("*/attempt_*/*/error.json"), key=lambda p: p.stat().st_mtime_ns)
    if errors:
        first = errors[0]
        body = json.loads(first.read_text(encoding="utf-8")).get("message", {})
        error = body.get("message", str(body)) if isinstance(body, dict) else str(body)
        traceback = body.get("extraInfo", {}).get("py_callstack", "") if isinstance(body, dict) else ""
        rank_dir = first.parent
        tail = "\n".join(t for t in (_tail(rank_dir / "stdout.log", 2000), _tail(rank_dir / "stderr.log")) if t)
        return RankFailure(int(rank_dir.name), exitcode, error, traceback, str(rank_dir / "stderr.log"), tail)
    logs = sorted(log_dir.glob("*/attempt_*/*/stderr.log"))
    tails = "\n".join(f"[rank {p.parent.name}] {_tail(p, LOG_TAIL_CHARS // max(1, len(logs)))}" for p in logs)
    return RankFailure(None, exitcode, "no rank left an error file (killed by a signal?)", "", str(log_dir), tails)


def launch_command(job_path: Path, nproc: int, log_dir: Path) -> list[str]:
    """torchrun on one machine, N processes, every rank's stdout and stderr teed into log_dir."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--log-dir", str(log_dir), "--tee", "3",
        "-m", "embedkomb_pipeline.training.launch", "worker", str(job_path),
    ]  # fmt: skip


def _run_torchrun(command: list[str], grace_seconds: float = 60) -> int:
    """Run torchrun and wait. Stopped ourselves (Dagster cancels a run with SIGINT, Kubernetes with SIGTERM), we
    hand torchrun a SIGTERM, on which it stops its workers; a SIGKILL (what subprocess.run sends) would orphan them."""
    process = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def pipes_metadata(entries: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """result.json's (kind, value) pairs as Dagster Pipes metadata."""
    return {name: {"type": kind, "raw_value": value} for name, (kind, value) in entries.items()}


def run(job_path: Path, nproc: int | None = None, pipes: Any = None) -> dict[str, Any]:
    """torchrun the job's workers and wait; the result rank 0 wrote, or RankFailure's description raised."""
    job = TrainingJob.read(job_path)
    n = nproc or job.nproc
    if n < 1:
        raise ValueError(f"nproc must be at least 1, got {n}")
    log_dir = job.launch_dir / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    for stale in ("result.json", "failure.json"):
        (job.launch_dir / stale).unlink(missing_ok=True)
    if pipes is not None:
        pipes.log.info(f"torchrun: {n} processes, logs in {log_dir}")
    returncode = _run_torchrun(launch_command(job_path, n, log_dir))
    if returncode != 0:
        failure = first_failure(log_dir, returncode)
        (job.launch_dir / "failure.json").write_text(json.dumps(asdict(failure), indent=2), encoding="utf-8")
        if pipes is not None:
            pipes.log.error(failure.describe())
        raise TrainingFailed(failure)
    result: dict[str, Any] = json.loads((job.launch_dir / "result.json").read_text(encoding="utf-8"))
    if pipes is not None:
        pipes.report_asset_materialization(metadata=pipes_metadata(result["metadata"]))
    return result


class TrainingFailed(RuntimeError):
    def __init__(self, failure: RankFailure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


def read_failure(job: TrainingJob) -> RankFailure | None:
    path = job.launch_dir / "failure.json"
    return RankFailure(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def fault_from_env(rank: int) -> Callable[[int], None] | None:
    """The before-step hook EMBEDKOMB_TRAINING_FAULT asks for on this rank (tests of failure and resume)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fields = dict(part.split("=", 1) for part in spec.split(","))
    if int(fields["rank"]) != rank:
        return None
    at = int(fields["step"])

    def fail(steps_done: int) -> None:
        if steps_done == at:
            raise RuntimeError(f"injected fault ({FAULT_ENV}={spec}): rank {rank} stops before step {at}")

    return fail


def worker(job_path: Path) -> None:
    """One rank: join torchrun's process group, train, rank 0 writes the checkpoint and result.json."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @record  # a raised exception lands in torchrun's error file for this rank: `run` reports it
    def train_rank() -> None:
        from embedkomb_pipeline.training.distributed import init_from_env, shutdown

        job = TrainingJob.read(job_path)
        topology = init_from_env(job.backend)
        try:

            def log(message: str) -> None:
                print(f"[rank {topology.rank}/{topology.world_size}] {message}", flush=True)

            report = job.train(log=log, topology=topology, before_step=fault_from_env(topology.rank))
            if topology.is_main:
                result = {"metadata": report.metadata(job.base_model), "model_dir": str(report.model_dir)}
                path = job.launch_dir / "result.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, default=str), encoding="utf-8")
                log(f"checkpoint written: {report.model_dir}")
        finally:
            shutdown(topology)

    train_rank()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m embedkomb_pipeline.training.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="start torchrun with N workers on the job and wait for them")
    run_parser.add_argument("job", type=Path)
    run_parser.add_argument("--nproc", type=int, default=None, help="processes (default: the job's nproc)")
    worker_parser = commands.add_parser("worker", help="one rank (what torchrun starts)")
    worker_parser.add_argument("job", type=Path)
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args.job)
        return
    from dagster_pipes import PipesEnvVarParamsLoader

    try:
        if PipesEnvVarParamsLoader().is_dagster_pipes_process():
            from dagster_pipes import open_dagster_pipes

            with open_dagster_pipes() as pipes:
                run(args.job, args.nproc, pipes)
        else:
            result = run(args.job, args.nproc)
            print(f"checkpoint: {result['model_dir']}")
    except TrainingFailed as failed:
        print(failed, file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()


def launch_run_command(job_path: Path) -> list[str]:
    """The command that trains a written job (what the checkpoint asset hands Dagster Pipes)."""
    return [sys.executable, "-m", "embedkomb_pipeline.training.launch", "run", str(job_path)]
